"""Tracking stage: MLflow runs for a sweep (parent) and its variants (children).

Only this module writes to MLflow. A variant's run carries the flattened config as params, provenance
(`env.*`) and what was resolved at run time (`resolved.*`), `VariantResult.metrics()` as metrics, the
cell and the outcome as tags (read back by `runner table|check`), and as artifacts the result JSON, the
resolved config, the ONNX signatures, the build log and layers, and the traceback of an unexpected error.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from runner.report.frame import SWEEP_TAG, cell_tags, outcome_tags
from runner.results import VariantResult

MAX_TAG = 5000


def store_problem(exc: Exception) -> str:
    """Why an MLflow store could not be used, in a few words."""
    text = " ".join(str(exc).split())
    if "Max retries exceeded" in text or "Connection refused" in text:
        return "no server answers there (connection refused)"
    return text[:200]


def _metric(key: str, value: float):
    return mlflow.entities.Metric(key, value, int(time.time() * 1000), 0)


def _profile_text(profile: list[list[int]]) -> str:
    return " / ".join("x".join(map(str, s)) for s in profile)


class Tracker:
    """Logs a sweep to one MLflow experiment: a parent run, and one nested child run per variant."""

    def __init__(self, uri: str, experiment: str, artifact_root: str):
        self.uri, self.experiment = uri, experiment
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None if uri.startswith("http") else Path(artifact_root).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id

    def start_sweep(self, name: str, params: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"runner.kind": "sweep"})
        self.client.set_tag(run.info.run_id, SWEEP_TAG, run.info.run_id)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_variant(self, sweep_id: str, result: VariantResult, params: dict, config_yaml: str,
                    started_ms: int) -> str:
        """One child run, spanning the variant's own time."""
        ended_ms = int(time.time() * 1000)
        tags = {"mlflow.parentRunId": sweep_id, SWEEP_TAG: sweep_id, "runner.kind": "variant",
                "onnx_label": result.cell.onnx.label, "build_label": result.cell.build.label,
                **cell_tags(result.cell), **outcome_tags(result)}
        tags["error"] = tags["error"][:MAX_TAG]
        run = self.client.create_run(self.experiment_id, run_name=result.name, tags=tags, start_time=started_ms)
        run_id = run.info.run_id
        resolved = {"resolved.backend": result.backend}
        if result.build:
            resolved.update({"resolved.precision_mechanism": result.build.precision_mechanism,
                             "resolved.profile": _profile_text(result.build.profile),
                             "resolved.optimization_level": result.build.optimization_level,
                             "resolved.tf32": result.build.tf32})
        env = {f"env.{k}": v for k, v in result.environment.items()}
        self._log_params(run_id, {**params, **env, **{k: v for k, v in resolved.items() if v is not None}})
        metrics = result.metrics()
        if metrics:
            self.client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "result.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
            (folder / "config.yaml").write_text(config_yaml)
            if result.export:
                signatures = {"reference": result.export.reference.signature, "tested": result.export.tested.signature}
                if result.build and result.build.onnx_signature:
                    signatures["built"] = result.build.onnx_signature
                (folder / "onnx_signature.json").write_text(json.dumps(signatures, indent=1))
            if result.error_detail:
                (folder / "error.txt").write_text(result.error_detail)
            self.client.log_artifacts(run_id, str(folder))
        if result.build:
            for path in (result.build.log_path, result.build.layers_path):
                if path and Path(path).is_file():
                    self.client.log_artifact(run_id, path, "build")
        self.client.set_terminated(run_id, "FAILED" if result.status == "failed" else "FINISHED", ended_ms)
        return run_id

    def end_sweep(self, sweep_id: str, results: list[VariantResult], files: list[Path] = ()) -> None:
        counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
        self.client.log_batch(sweep_id, metrics=[_metric(f"variants.{k}", v) for k, v in counts.items()])
        for path in files:
            self.client.log_artifact(sweep_id, str(path))
        self.client.set_terminated(sweep_id, "FINISHED")

    def _log_params(self, run_id: str, params: dict) -> None:
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
