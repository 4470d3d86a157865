"""One variant, stage by stage: export -> build (TensorRT) -> validate -> bench.

Runs inside the variant's child process (see `isolate`). It returns a plain dict, the variant's
result; it never raises for a stage failure, which becomes `status`, `failed_stage` and `error`.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from runner.config import BackendName, Precision, RunConfig, ShapeMode
from runner.data import load_samples
from runner.environment import environment
from runner.export import ExportError, ExportSpec, export_onnx
from runner.validate import check_shapes, validate

DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "shapes_yolov8n.pt"
TOOL_ABBREV = {"ultralytics": "ul", "torch": "tc"}


class StageFailed(Exception):
    def __init__(self, stage: str, error: str):
        super().__init__(error)
        self.stage, self.error = stage, error


def labels(cfg: RunConfig, backend: str, onnx_precision: str) -> dict:
    """Names of the variant: its compatibility-table column (ONNX) and row (backend build)."""
    onnx_shape = (cfg.export.shape or cfg.shape.mode).value
    st = {"static": "st", "dynamic": "dy"}
    column = f"{TOOL_ABBREV[cfg.export.tool.value]} {st[onnx_shape]} {onnx_precision}"
    row = f"{st[cfg.shape.mode.value]} {cfg.precision.name.value}"
    if backend != BackendName.tensorrt.value:
        row = f"ort {row}"
    return {"onnx_label": column, "build_label": row, "onnx_shape": onnx_shape,
            "name": f"{column}__{row}".replace(" ", "-")}


def skeleton(cfg: RunConfig, backend: str, status: str, error: str | None = None) -> dict:
    """A result with no stage run yet: what a skipped variant, or a crash before any stage, reports."""
    precision = cfg.precision.name.value
    return {"status": status, "failed_stage": None, "error": error, "backend": backend, "stages": {},
            "precision": precision, "shape": cfg.shape.mode.value, "profile": cfg.profile.name,
            **labels(cfg, backend, precision)}


def run_variant(cfg: RunConfig, backend: str, progress=print, stage_started=lambda stage: None,
                publish=lambda result: None) -> dict:
    """Run every stage of one variant. `publish` receives the partial result after each stage."""
    fp16 = cfg.precision.name == Precision.fp16
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = {**skeleton(cfg, backend, "running"), "started_at": started_at,
              "environment": environment(cfg.export.opset), "timings": {}}
    timings, clock = result["timings"], {}

    def enter(stage: str) -> None:
        """Close the running stage's wall clock, start `stage`'s, and tell the parent."""
        now = time.perf_counter()
        if clock:
            timings[clock["stage"]] = now - clock["start"]
        clock.update(stage=stage, start=now)
        if stage != "done":
            stage_started(stage)

    try:
        fp16_mode = "fp16_onnx" if fp16 else "none"
        if fp16 and backend == BackendName.tensorrt.value:
            import tensorrt as trt

            from runner.trt_compat import resolve_fp16_mode
            fp16_mode = resolve_fp16_mode(trt, cfg.precision.fp16_mode.value)
        result["fp16_mode"] = fp16_mode

        enter("export")
        spec = ExportSpec(weights=str(cfg.model.weights or DEFAULT_WEIGHTS), tool=cfg.export.tool.value,
                          dynamic=result["onnx_shape"] == "dynamic", half=False, imgsz=tuple(cfg.model.imgsz),
                          opset=cfg.export.opset, simplify=cfg.export.simplify)
        try:
            reference = export_onnx(spec, Path(cfg.cache_dir), progress)
            tested = reference
            if fp16_mode in ("fp16_onnx", "strongly_typed"):
                tested = export_onnx(ExportSpec(**{**asdict(spec), "half": True}), Path(cfg.cache_dir), progress)
        except ExportError as exc:
            raise StageFailed("export", str(exc)) from None
        result["stages"]["export"] = {"reference": asdict(reference), "tested": asdict(tested)}
        result.update(labels(cfg, backend, tested.precision))
        publish(result)

        runner = _open_runner(cfg, backend, tested.path, fp16_mode, result, enter, progress)
        publish(result)
        try:
            _validate_and_bench(cfg, runner, reference.path, result, enter, progress, publish)
        finally:
            runner.close()
    except StageFailed as exc:
        result.update(status="failed", failed_stage=exc.stage, error=exc.error)
        progress(f"{exc.stage}: FAILED: {exc.error.splitlines()[0] if exc.error else ''}")
    enter("done")
    if result["status"] == "running":
        result["status"] = "ok"
    return result


def _open_runner(cfg: RunConfig, backend: str, onnx_path: str, fp16_mode: str, result: dict, stage_started,
                 progress):
    """The model under test: an onnxruntime session, or a TensorRT engine (built or from the cache)."""
    stage_started("build")
    if backend != BackendName.tensorrt.value:
        from runner.ort_runtime import OrtRunner

        try:
            return OrtRunner(onnx_path, cfg.backend.ort_provider)
        except Exception as exc:  # onnxruntime refusing the graph is this variant's result
            raise StageFailed("build", f"onnxruntime: {exc}") from None
    from runner.build import BuildSpec, build_engine
    from runner.trt_runtime import TrtRunner

    built = build_engine(BuildSpec(
        onnx_path=onnx_path, precision=cfg.precision.name.value, fp16_mode=fp16_mode,
        min_shape=list(cfg.shape.min), opt_shape=list(cfg.shape.opt), max_shape=list(cfg.shape.max),
        optimization_level=cfg.backend.builder_optimization_level, workspace_gib=cfg.backend.workspace_gib,
        cache_dir=cfg.cache_dir, use_engine_cache=cfg.backend.engine_cache,
        use_timing_cache=cfg.backend.timing_cache, tf32=cfg.backend.tf32), progress)
    result["stages"]["build"] = built.to_dict()
    if not built.ok:
        raise StageFailed("build", built.error or "build failed without a message")
    static = cfg.shape.mode == ShapeMode.static
    return TrtRunner(built.engine_path, cuda_graph=cfg.bench.cuda_graph and static)


def _validate_and_bench(cfg: RunConfig, runner, reference_onnx: str, result: dict, stage_started, progress,
                        publish) -> None:
    from runner.ort_runtime import OrtRunner

    stage_started("validate")
    samples = load_samples(cfg.data.images, cfg.data.labels, cfg.data.limit, Path(cfg.outputs))
    reference = OrtRunner(reference_onnx, "CPUExecutionProvider")
    thresholds = cfg.validate.fp16 if cfg.precision.name == Precision.fp16 else cfg.validate.fp32
    shapes = check_shapes(cfg.shape.mode.value, cfg.shape.min, cfg.shape.opt, cfg.shape.max, cfg.model.stride,
                          cfg.validate.non_square)
    v = cfg.validate
    report = validate(runner, reference, samples, shapes, thresholds, v.conf, v.nms_iou, v.match_iou, v.max_det,
                      progress)
    report["reference_provider"] = reference.provider
    result["stages"]["validate"] = report
    if not report["passed"]:
        result.update(status="failed", failed_stage="validate", error=_validation_error(report))
    publish(result)

    stage_started("bench")
    from runner.bench import bench
    try:
        result["stages"]["bench"] = bench(runner, [s.image for s in samples], list(cfg.shape.opt), cfg.bench.warmup,
                                          cfg.bench.iters, v.conf, v.nms_iou, v.max_det, progress)
    except Exception as exc:  # a backend error at run time is this stage's result
        raise StageFailed("bench", f"{type(exc).__name__}: {exc}") from None


def _validation_error(report: dict) -> str:
    failed = {k: r for k, r in report["shapes"].items() if r["status"] == "failed"}
    if not failed:
        return report.get("error", "validation failed")
    parts = []
    for label, r in failed.items():
        if "error" in r:
            parts.append(f"{label} {r['shape']}: {r['error']}")
        else:
            parts.append(f"{label} {r['shape']}: rel-L2 {r['rel_l2']:.2e}, det F1 {r['detections']['f1']:.3f} "
                         f"(limits {report['thresholds']['max_rel_l2']:.0e}, {report['thresholds']['min_det_f1']})")
    return "; ".join(parts)
