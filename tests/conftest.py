"""Shared fixtures of the CPU suite: one session-wide export cache, the held-out split, and the CLI.

Nothing here is autouse: the TensorRT tests (test_trt_*.py) and the report tests see no state of ours.
"""
from __future__ import annotations

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


def mlflow_run_count(db: Path) -> int:
    """Runs in an MLflow sqlite store (0 when the store was never created)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        return con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0


class MlflowServer:
    """A real `mlflow server` on loopback over a sqlite store in `root`; stop() and start() again keep the
    port and the store, as a server restarted after a crash would."""

    STARTUP_LIMIT_S = 60

    def __init__(self, root: Path):
        from runner.track import free_port

        self.root, self.port = root, free_port()
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> MlflowServer:
        from runner.track import healthy

        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "1", "--backend-store-uri", f"sqlite:///{self.root}/store.db", "--artifacts-destination",
             str(self.root / "artifacts")],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
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


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory) -> Path:
    """One ONNX export cache for the whole session (the export stage caches by content key)."""
    return tmp_path_factory.mktemp("export_cache")


@pytest.fixture(scope="session")
def export_model(export_cache):
    """export_model(tool, dynamic, half, model, end2end, nms) -> OnnxArtifact of a shipped model (the default
    yolov8n unless named), exported once per session."""
    from runner.export import ExportSpec, export_onnx

    def _export(tool: str, dynamic: bool = False, half: bool = False, model: str = "yolov8n", end2end: bool = False,
                nms: bool = False):
        spec = ExportSpec(weights=str(ASSETS / f"{model}.pt"), tool=tool, dynamic=dynamic, half=half, imgsz=IMGSZ,
                          opset=OPSETS[tool], simplify=True, end2end=end2end, nms=nms)
        return export_onnx(spec, export_cache)

    return _export


@pytest.fixture(scope="session")
def held_out_images(tmp_path_factory) -> Path:
    """The default model's generated held-out split (images folder; labels in its YOLO sibling)."""
    from runner.data import held_out_split

    return held_out_split(tmp_path_factory.mktemp("data") / "shapes")
