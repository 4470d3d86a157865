"""Tracking stage: MLflow runs for a sweep (parent) and its variants (children).

The other stages return plain dicts; only this module knows MLflow. Metric names are stable, because
`runner table` and `runner check` read them back:
  export.onnx_mb, export.export_s, build.build_s, build.engine_mb, val.passed, val.rel_l2, val.det_f1,
  val.map50, val.map50_95, val.<shape>.<metric>, bench.<stage>.<stat> (ms), bench.infer_over_compute,
  time.<stage>_s (wall time each stage took, cache lookups included).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

SWEEP_TAG = "runner.sweep_id"
MAX_TAG = 5000


def variant_metrics(result: dict) -> dict[str, float]:
    """The numeric outcome of a variant, as MLflow metrics."""
    stages, metrics = result.get("stages", {}), {}
    tested = stages.get("export", {}).get("tested")
    if tested:
        metrics.update({"export.onnx_mb": tested["size_bytes"] / 1e6, "export.export_s": tested["export_s"]})
    build = stages.get("build")
    if build:
        metrics.update({"build.build_s": build["build_s"], "build.engine_mb": build["engine_bytes"] / 1e6,
                        "build.cache_hit": float(build["cache_hit"])})
        if build.get("num_layers") is not None:
            metrics["build.num_layers"] = build["num_layers"]
    val = stages.get("validate")
    if val:
        metrics["val.passed"] = float(val["passed"])
        for key in ("rel_l2", "max_abs", "cosine", "allclose_rate", "det_f1", "det_mean_iou", "map50", "map50_95"):
            if key in val:
                metrics[f"val.{key}"] = val[key]
        for label, shape in val["shapes"].items():
            if "tensors" in shape:
                metrics[f"val.{label}.rel_l2"] = shape["rel_l2"]
                metrics.update({f"val.{label}.det_{k}": shape["detections"][k] for k in ("precision", "recall", "f1")})
                metrics.update({f"val.{label}.{k}": v for k, v in shape["accuracy"].items()})
    metrics.update({f"time.{stage}_s": seconds for stage, seconds in result.get("timings", {}).items()})
    bench = stages.get("bench")
    if bench:
        for stage in ("preprocess", "infer", "postprocess", "e2e", "compute"):
            metrics.update({f"bench.{stage}.{k}": v for k, v in bench[stage].items() if k != "n"})
        metrics["bench.infer_over_compute"] = bench["infer_over_compute"]
        metrics["bench.cuda_graph"] = float(bench["settings"]["cuda_graph"])  # as run, not as asked
    return {k: float(v) for k, v in metrics.items() if v is not None}


def _metric(key: str, value: float):
    return mlflow.entities.Metric(key, value, int(time.time() * 1000), 0)


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

    def log_variant(self, sweep_id: str, result: dict, params: dict, config_yaml: str, started_ms: int) -> str:
        """One child run, spanning the variant's own time: params, metrics, status tags and the
        result/config/signature artifacts."""
        ended_ms = int(time.time() * 1000)
        tags = {"mlflow.parentRunId": sweep_id, SWEEP_TAG: sweep_id, "runner.kind": "variant",
                "status": result["status"], "failed_stage": result.get("failed_stage") or "",
                "error": (result.get("error") or "")[:MAX_TAG], "backend": result["backend"],
                "onnx_label": result["onnx_label"], "build_label": result["build_label"]}
        run = self.client.create_run(self.experiment_id, run_name=result["name"], tags=tags, start_time=started_ms)
        run_id = run.info.run_id
        env = {f"env.{k}": v for k, v in result.get("environment", {}).items()}
        self._log_params(run_id, {**params, **env, "resolved.fp16_mode": result.get("fp16_mode", ""),
                                  "resolved.backend": result["backend"]})
        metrics = variant_metrics(result)
        if metrics:
            self.client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "result.json").write_text(json.dumps(result, indent=1, default=str))
            (folder / "config.yaml").write_text(config_yaml)
            export = result.get("stages", {}).get("export", {})
            if export:
                (folder / "onnx_signature.json").write_text(json.dumps(
                    {k: v["signature"] for k, v in export.items()}, indent=1))
            self.client.log_artifacts(run_id, str(folder))
        build = result.get("stages", {}).get("build", {})
        for key in ("log_path", "layers_path"):
            if build.get(key) and Path(build[key]).is_file():
                self.client.log_artifact(run_id, build[key], "build")
        self.client.set_terminated(run_id, "FINISHED" if result["status"] != "failed" else "FAILED", ended_ms)
        return run_id

    def end_sweep(self, sweep_id: str, results: list[dict], files: list[Path] = ()) -> None:
        counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "failed", "skipped")}
        self.client.log_batch(sweep_id, metrics=[_metric(f"variants.{k}", v) for k, v in counts.items()])
        for path in files:
            self.client.log_artifact(sweep_id, str(path))
        self.client.set_terminated(sweep_id, "FINISHED")

    def _log_params(self, run_id: str, params: dict) -> None:
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
