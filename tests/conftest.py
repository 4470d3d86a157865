"""Shared fixtures of the CPU suite: one export cache and one held-out split for the whole session (shared by
pytest-xdist's workers), the CLI in a subprocess or in this process, and the runs of an MLflow store.

Plumbing (sweeps, resume, tracking, caches, config errors) runs yolov8n at 128 px (`PLUMBING`): it exports as fast
as any smaller net and still finds the larger shapes (mAP50-95 0.15 on the held-out split), so validation has
detections to compare. 640 px stays where accuracy is the claim. Nothing here is autouse: the TensorRT tests
(test_trt_*.py) and the report tests see no state of ours.
"""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")  # no test reaches for a hub
REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# isolate_targets.py must be importable by name in the children of runner.isolate: runner.isolate passes
# the parent's sys.path on, so putting tests/ on it here is enough.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

ASSETS = REPO / "runner" / "assets"
DEFAULT_WEIGHTS = ASSETS / "yolov8n.pt"
PRESETS = ("yolov8n", "yolo11n", "yolo26n", "yolov10n", "yolov5nu")  # conf/model/, weights in runner/assets/
END2END_PRESETS = ("yolo26n", "yolov10n")  # with a one-to-one (NMS-free) head
IMGSZ = (640, 640)
OPSETS = {"ultralytics": 17, "torch": 17, "dynamo": 18}  # as the export presets have them
SMALL_IMGSZ = (128, 128)
# plumbing's variant: yolov8n at 128 px, a dynamic profile of 64..128, two images, 3 + 20 timed runs
PLUMBING = ["model.imgsz=[128,128]", "profile.min=[1,3,64,64]", "profile.opt=[1,3,128,128]",
            "profile.max=[1,3,128,128]", "bench=quick", "data.limit=2"]
# the least timing a variant takes (4 runs, no offline batches): for tests whose claim is not about timing
UNTIMED = ["bench=quick", "bench.warmup=1", "bench.iters=3", "bench.offline_batches=[]"]


def pytest_addoption(parser):
    parser.addoption("--sweep-outputs", type=Path, help="run test_sweep.py's 12-variant sweep into this folder "
                                                        "(emptied first), where `make gate-check` checks it")
    parser.addoption("--export-cache", type=Path, help="the ONNX export cache in this folder, kept after the session: "
                                                       "CI gives `make test` and `make test-slow` of one checkout one "
                                                       "folder (the cache key holds no runner code: never reuse it "
                                                       "across changes)")


def cli_env() -> dict:
    """The environment of a `python -m runner` subprocess: offline, quiet, no stray Hydra/MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(YOLO_OFFLINE="1", YOLO_VERBOSE="false", PYTHONUNBUFFERED="1")
    return env


def run_module(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m runner <args>` from the repo root, text output captured."""
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def run_cli(args: list[str], outputs: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m runner <args> outputs=<outputs>`: a sweep or a run."""
    return run_module([*args, f"outputs={outputs}"], timeout)


@pytest.fixture
def runner_main(capsys, monkeypatch):
    """runner_main(args) -> CompletedProcess of `runner <args>` run in this process (`runner.__main__.main`), for
    refusals, where a subprocess would prove nothing more. The environment defaults it sets, and the root logging
    handlers Hydra's job logging adds (on this test's captured stream, closed after it), are undone after."""
    from runner.__main__ import main

    environ = os.environ.copy()
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)

    def run(args: list[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(list(args))
        said = capsys.readouterr()
        return subprocess.CompletedProcess(args, done.value.code or 0, said.out, said.err)

    yield run
    os.environ.clear()
    os.environ.update(environ)


def sweep_runs(uri: str) -> tuple[list, list]:
    """(sweep parent runs, variant runs) of experiment 'runner' in the MLflow store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("runner")
    assert experiment is not None, f"no experiment 'runner' in {uri}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return ([r for r in runs if r.data.tags.get("runner.kind") == "sweep"],
            [r for r in runs if r.data.tags.get("runner.kind") == "variant"])


def mlflow_run_count(db: Path) -> int:
    """Runs in an MLflow sqlite store (0 when the store was never created); reads the file, creates nothing."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        return con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0


def export_spec(tool: str, dynamic: bool = False, half: bool = False, weights: str | Path = DEFAULT_WEIGHTS,
                imgsz: tuple[int, int] = IMGSZ, opset: int | None = None, **head):
    """The ExportSpec of `weights` (the default yolov8n) as the export presets make it; `head`: end2end, nms."""
    from runner.export import ExportSpec

    return ExportSpec(weights=str(weights), tool=tool, dynamic=dynamic, half=half, imgsz=imgsz,
                      opset=opset or OPSETS[tool], simplify=True, **head)


class MlflowServer:
    """A real `mlflow server` on loopback over a sqlite store in `root` (or the database at `store_uri`), its
    artifacts served from `root`; stop() and start() again keep the port and the store, as a server restarted
    after a crash would. Its job-execution consumers (half a dozen
    processes that tracking never uses) are off."""

    STARTUP_LIMIT_S = 60

    def __init__(self, root: Path, store_uri: str | None = None):
        from runner.track import free_port

        self.root, self.port = root, free_port()
        self.store_uri = store_uri or f"sqlite:///{root}/store.db"
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> MlflowServer:
        from runner.track import healthy

        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "1", "--backend-store-uri", self.store_uri, "--artifacts-destination",
             str(self.root / "artifacts")],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**cli_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        log.close()
        deadline = time.monotonic() + self.STARTUP_LIMIT_S
        while not healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers (they share the session it was started in)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this session that pytest-xdist's workers share (their basetemps' common parent); the project's
    own cache locks keep them from making one artifact twice."""
    root = tmp_path_factory.getbasetemp()
    folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def export_cache(request, tmp_path_factory) -> Path:
    """One ONNX export cache for the whole session (the export stage caches by content key, under a lock), in
    --export-cache where given."""
    given = request.config.getoption("--export-cache")
    if given:
        given.mkdir(parents=True, exist_ok=True)
        return given.resolve()
    return shared_folder(tmp_path_factory, "export_cache")


@pytest.fixture(scope="session")
def export_model(export_cache):
    """export_model(tool, dynamic, half, model, end2end, nms) -> OnnxArtifact of a shipped model (the default
    yolov8n unless named), exported once per session."""
    from runner.export import export_onnx

    def _export(tool: str, dynamic: bool = False, half: bool = False, model: str = "yolov8n", end2end: bool = False,
                nms: bool = False):
        return export_onnx(export_spec(tool, dynamic, half, ASSETS / f"{model}.pt", end2end=end2end, nms=nms),
                           export_cache)

    return _export


@pytest.fixture(scope="session")
def held_out_images(tmp_path_factory) -> Path:
    """The default model's generated held-out split (images folder; labels in its YOLO sibling), made once."""
    from runner import cache
    from runner.data import held_out_split

    folder = shared_folder(tmp_path_factory, "data")
    with cache.locked(folder / "shapes.lock"):
        return held_out_split(folder / "shapes")
