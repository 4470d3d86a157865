"""Tracking stage: MLflow runs for a sweep (parent) and its variants (children).

Only this module writes to MLflow. Logging a variant is idempotent: its run carries the `runner.result_id`
of its result.json, so `runner sync` and `resume=` never log a result twice, and a run left half-logged
by a kill is replaced. Parallel jobs reach an embedded sqlite store through a loopback `mlflow server`
(`LoopbackServer`), one writer, so no job meets "database is locked".

A variant's run carries the flattened config as params, provenance (`env.*`) and what was resolved at
run time (`resolved.*`, the timed shape among them), `VariantResult.metrics()` as metrics, the cell, the outcome
and the measured shapes as tags (read back by `runner table|check`), and as artifacts the result JSON, the
resolved config, the ONNX signatures, the build log and layers, each layer's time (layers/layers.csv, .json) where
the runtime profiled them, and the traceback of an unexpected error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from runner import cache, forensics
from runner.isolate import start_tethered
from runner.results import VariantResult
from runner.sweep import JobRecord
from runner.tags import (KIND_TAG, RESULT_TAG, SWEEP, SWEEP_TAG, VARIANT, auto_tags, cell_tags, outcome_tags, query,
                         shape_tags, shape_text)

# MLflow says "Creating initial MLflow database tables" when it makes a sqlite store, on stderr through a handler
# of its own (importing mlflow resets the levels set before): not the user's news. Its warnings still show.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
MAX_TAG = 5000
SERVER_START_S = 90
PROBLEM_CHARS = 200


def store_problem(exc: Exception) -> str:
    """Why an MLflow store could not be used, in a few words: MLflow's message up to PROBLEM_CHARS, cut
    after its last whole sentence there, less its full stop (else after its last whole word)."""
    text = " ".join(str(exc).split())
    if "Max retries exceeded" in text or "Connection refused" in text:
        return "no server answers there (connection refused)"
    if len(text) <= PROBLEM_CHARS:
        return text
    head = text[:PROBLEM_CHARS + 1]
    end = head.rfind(". ")
    return head[:end] if end > 0 else head.rsplit(" ", 1)[0] + " ..."


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b.c": value}, the shape of MLflow params."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _metric(key: str, value: float):
    return mlflow.entities.Metric(key, value, int(time.time() * 1000), 0)


def int8_params(result: VariantResult) -> dict:
    """What an int8 variant's settings touched, beside the config's: the Q/DQ ONNX's quantized nodes by op type and
    its nodes kept in float, or the calibrated engine's layers pinned to fp16."""
    q = result.export.tested.quantization if result.export else None
    calibration = result.build.calibration if result.build else None
    params = {}
    if q:
        params.update({"resolved.qdq_quantized": ", ".join(f"{op} {n}" for op, n in sorted(q["quantized"].items())),
                       "resolved.kept_float_nodes": len(q["kept_float_nodes"]),
                       "resolved.calibration_images": q["images"], "resolved.calibration_source": q["source"]})
    if calibration and "fp16_layers" in calibration:
        params["resolved.fp16_layers"] = len(calibration["fp16_layers"])
    return params


def _profile_text(profile: list[list[int]]) -> str:
    return " / ".join(shape_text(s) for s in profile)


class Tracker:
    """Logs a sweep to one MLflow experiment: a parent run, and one nested child run per variant."""

    def __init__(self, uri: str, experiment: str, artifact_root: str):
        self.uri, self.experiment = uri, experiment
        with _store_lock(uri):  # two sweeps creating one sqlite store would race in its migrations
            self.client = MlflowClient(uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = None if uri.startswith("http") else Path(artifact_root).resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id

    @classmethod
    def of(cls, tracking) -> Tracker:
        """The Tracker of a `TrackingConfig`."""
        return cls(tracking.uri, tracking.experiment, tracking.artifact_root)

    def start_sweep(self, name: str, params: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={KIND_TAG: SWEEP})
        self.client.set_tag(run.info.run_id, SWEEP_TAG, run.info.run_id)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def reopen_sweep(self, sweep_id: str) -> int:
        """Resume a sweep's parent run; close its variant runs a kill left RUNNING as KILLED. Returns how many."""
        self.client.update_run(sweep_id, status="RUNNING")
        return self._kill_running_variants(sweep_id)

    def kill_sweep(self, sweep_id: str) -> None:
        """Close a stopped sweep's parent run, and its variant runs caught RUNNING (half logged), as KILLED."""
        self._kill_running_variants(sweep_id)
        self.client.set_terminated(sweep_id, "KILLED")

    def _kill_running_variants(self, sweep_id: str) -> int:
        stale = self.client.search_runs([self.experiment_id],
                                        f"{query(VARIANT, sweep_id)} and attributes.status = 'RUNNING'")
        for run in stale:
            self.client.set_terminated(run.info.run_id, "KILLED")
        return len(stale)

    def _logged_run(self, result_id: str) -> str | None:
        """The complete run of `result_id`, if any; a partial one (killed while logging) is deleted."""
        found = None
        for run in self.client.search_runs([self.experiment_id], f"tags.`{RESULT_TAG}` = '{result_id}'"):
            if found is None and RunStatus.is_terminated(RunStatus.from_string(run.info.status)) \
                    and run.info.status != "KILLED":
                found = run.info.run_id
            else:
                self.client.delete_run(run.info.run_id)
        return found

    def log_variant(self, sweep_id: str, record: JobRecord) -> str:
        """The child run of `record`, spanning the variant's own time; logged once, however often called. A run
        whose logging fails is deleted (where the store still answers), so none stays RUNNING half-logged."""
        existing = self._logged_run(record.result_id)
        if existing:
            return existing
        result = record.result
        tags = {"mlflow.parentRunId": sweep_id, SWEEP_TAG: sweep_id, KIND_TAG: VARIANT,
                RESULT_TAG: record.result_id, **cell_tags(result.cell), **outcome_tags(result), **shape_tags(result),
                **auto_tags(result),
                **{f"metric_name.{key}": name[:MAX_TAG] for key, name in result.metric_names().items()}}
        tags["error"] = tags["error"][:MAX_TAG]
        run_id = self.client.create_run(self.experiment_id, run_name=result.name, tags=tags,
                                        start_time=record.started_ms).info.run_id
        try:
            self._log_contents(run_id, record)
            self.client.set_terminated(run_id, "FAILED" if result.status == "failed" else "FINISHED", record.ended_ms)
        except Exception:
            with contextlib.suppress(Exception):  # a store that is gone: the next call deletes it (_logged_run)
                self.client.delete_run(run_id)
            raise
        return run_id

    def _log_contents(self, run_id: str, record: JobRecord) -> None:
        """A variant run's params, metrics and artifacts."""
        result = record.result
        resolved = {"resolved.backend": result.backend, "resolved.model": result.cell.model}
        if result.build:
            resolved.update({"resolved.precision_mechanism": result.build.precision_mechanism,
                             "resolved.profile": _profile_text(result.build.profile),
                             "resolved.optimization_level": result.build.optimization_level,
                             "resolved.tf32": result.build.tf32})
        if result.bench:
            resolved["resolved.timed_shape"] = shape_text(result.bench.shape)
        if result.resolved:  # beside the config's preprocess.device=auto, bench.cuda_graph=auto: what they became
            r = result.resolved
            resolved.update({"resolved.preprocess": r.preprocess, "resolved.postprocess": r.postprocess,
                             "resolved.cuda_graph": "n/a" if r.cuda_graph is None else r.cuda_graph,
                             "resolved.half_input": r.half_input, "resolved.int8_input": r.int8_input,
                             "resolved.head_maps": r.head_maps})
        resolved.update(int8_params(result))
        env = {f"env.{k}": v for k, v in result.environment.items()}
        self._log_params(run_id, {**flatten(record.config), **env,
                                  **{k: v for k, v in resolved.items() if v is not None}})
        metrics = result.metrics()
        if metrics:
            self.client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "result.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
            (folder / "config.yaml").write_text(yaml.safe_dump(record.config, sort_keys=False))
            if result.export:
                signatures = {"reference": result.export.reference.signature, "tested": result.export.tested.signature}
                if result.build and result.build.onnx_signature:
                    signatures["built"] = result.build.onnx_signature
                (folder / "onnx_signature.json").write_text(json.dumps(signatures, indent=1))
            if result.error_detail:
                (folder / "error.txt").write_text(result.error_detail)
            if result.bench and result.bench.layers:
                forensics.write(result.bench.layers, folder / "layers")
            self.client.log_artifacts(run_id, str(folder))
        if result.build:
            for path in (result.build.log_path, result.build.layers_path):
                if path and Path(path).is_file():
                    self.client.log_artifact(run_id, path, "build")

    def end_sweep(self, sweep_id: str, results: list[VariantResult], total: int, files: list[Path] = ()) -> None:
        counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
        counts["missing"] = total - len(results)
        self.client.log_batch(sweep_id, metrics=[_metric(f"variants.{k}", v) for k, v in counts.items()])
        for path in files:
            self.client.log_artifact(sweep_id, str(path))
        self.client.set_terminated(sweep_id, "FINISHED")

    def _log_params(self, run_id: str, params: dict) -> None:
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """An exclusive lock beside a sqlite store while it may be created; nothing for other stores."""
    path = sqlite_path(uri)
    return contextlib.nullcontext() if path is None else cache.locked(path.with_name(path.name + ".lock"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether an `mlflow server` answers its health check at `url`."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


class LoopbackServer:
    """`mlflow server` on 127.0.0.1 over a sqlite store, for the parallel jobs of one sweep; one worker writes.

    The experiment is created on the sqlite store first, so its artifacts stay where the embedded store
    keeps them, and the jobs write them there directly. The server dies with the process that started it, even
    of `kill -9` (`isolate.start_tethered`)."""

    def __init__(self, sqlite_uri: str, folder: Path):
        self.sqlite_uri, self.log_path = sqlite_uri, folder / "mlflow-server.log"
        self.url, self.proc = f"http://127.0.0.1:{free_port()}", None

    def __enter__(self) -> LoopbackServer:
        port = self.url.rsplit(":", 1)[1]
        with open(self.log_path, "w") as out:
            self.proc = start_tethered(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
                 "--backend-store-uri", self.sqlite_uri], cwd=self.log_path.parent, stdout=out,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_S
        while not healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the loopback mlflow server did not start; see {self.log_path}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
