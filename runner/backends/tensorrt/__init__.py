"""TensorRT: the only package that imports `tensorrt`. `compat` holds every version difference, `build` the
TensorRT API road, `engine_export` ultralytics' one-step road, `runtime` the cuda-python runner, `prepost` the GPU
letterbox and score filter around it (`kernels` theirs), `overlap` its overlapped offline batches, `throughput` its
concurrent lanes."""
from __future__ import annotations

from typing import TYPE_CHECKING

from runner import checkpoint, heads
from runner.backends import Backend
from runner.config import (API_BUILD_SETTINGS, AUTO, BackendName, BuildTool, ExportTool, Head, Mechanism, Precision,
                           RunConfig, ShapeMode, calibrator_refusal, pins_refusal)
from runner.results import BuildResult, ExportResult

if TYPE_CHECKING:
    from runner.quantize import CalibrationSet



class TensorrtBackend(Backend):
    name = BackendName.tensorrt.value
    gpu_ends = True

    def unavailable(self) -> str | None:
        from runner.backends.tensorrt import compat

        for ok, why in (compat.trt_available(), compat.cuda_gpu_available()):
            if not ok:
                return why
        return None

    def precision_mechanism(self, cfg: RunConfig) -> str:
        if cfg.precision.name == Precision.fp32:
            return Mechanism.none.value
        if cfg.build.tool == BuildTool.ultralytics:
            return Mechanism.ultralytics.value  # it picks: BuilderFlag.FP16 (<= 10) or a ModelOpt fp16 ONNX (11)
        import tensorrt as trt

        from runner.backends.tensorrt.compat import resolve_fp16_mode, resolve_int8_mode
        if cfg.precision.name == Precision.int8:
            return resolve_int8_mode(trt, cfg.precision.int8_mode.value)
        return resolve_fp16_mode(trt, cfg.precision.fp16_mode.value)

    def applies(self, cfg: RunConfig) -> str | None:
        asked = [key for key in API_BUILD_SETTINGS if getattr(cfg.backend, key) is True]  # auto: `takes`
        if asked and cfg.build.tool == BuildTool.ultralytics:
            return f"backend.{asked[0]}: build=ultralytics makes its own engine; use build=tensorrt_api"
        if cfg.backend.half_input is True and (why := self._half_input_refusal(cfg)):
            return why
        if cfg.backend.int8_input is True and (why := self._int8_input_refusal(cfg)):
            return why
        if cfg.backend.head_maps is True and (why := self._head_maps_refusal(cfg)):
            return why
        if cfg.build.tool != BuildTool.ultralytics:
            calibrated = cfg.precision.name == Precision.int8 and self.precision_mechanism(cfg) == Mechanism.calibrator
            placement = calibrator_refusal(cfg.precision) if calibrated else None  # int8_mode=auto on TensorRT <= 10
            return placement or pins_refusal(cfg.precision, calibrated)
        if cfg.precision.name == Precision.int8:
            return ("build=ultralytics int8 calibrates with ultralytics' own data loader from a dataset yaml; runner "
                    "builds int8 with build=tensorrt_api (precision=int8_calibrator or int8_qdq)")
        if cfg.export.tool != ExportTool.ultralytics:
            return (f"build=ultralytics exports its own ONNX with ultralytics; export={cfg.export.tool.value} "
                    f"does not apply")
        if cfg.export.shape not in (None, cfg.shape.mode):
            return (f"build=ultralytics makes the ONNX and the engine with one `dynamic` flag; "
                    f"export.shape={cfg.export.shape.value} with shape={cfg.shape.mode.value} does not apply")
        return None

    def takes(self, cfg: RunConfig, setting: str) -> bool:
        """Where runner's own build (the API build) takes `setting` without a refusal: the head maps of a YOLO Detect
        head's checkpoint; an fp16 input where the input is not int8. Without TensorRT here the mechanism is unknown:
        no fp16 or int8 input (the variant is skipped anyway)."""
        if cfg.build.tool != BuildTool.tensorrt_api:
            return False
        if setting == "head_maps":
            return self._head_maps_refusal(cfg) is None and checkpoint.head_of(cfg.model.weights) in heads.YOLO_HEADS
        try:
            int8_input = cfg.backend.int8_input is True or (cfg.backend.int8_input == AUTO
                                                             and self._int8_input_refusal(cfg) is None)
            if setting == "int8_input":
                return int8_input and cfg.backend.half_input is not True
            return not int8_input and self._half_input_refusal(cfg) is None
        except ImportError:
            return False

    def _half_input_refusal(self, cfg: RunConfig) -> str | None:
        """Where an fp16 input does not apply: fp32 (IEEE fp32 throughout), TensorRT's calibrators (they feed float
        batches) and a strongly typed network (the ONNX's input type)."""
        from runner.backends.tensorrt.build import half_input_applies

        mechanism = self.precision_mechanism(cfg)
        if not half_input_applies(mechanism, cfg.precision.calibrator.value):
            via = f"{mechanism} {cfg.precision.calibrator.value}" if mechanism == Mechanism.calibrator else mechanism
            return (f"backend.half_input: precision {cfg.precision.name.value} via {via} keeps a float input; it "
                    f"applies to fp16 (builder_flag), int8 Q/DQ and implicit int8 from onnxruntime's ranges "
                    f"(precision.calibrator=percentile)")
        return None

    def _int8_input_refusal(self, cfg: RunConfig) -> str | None:
        """Where an int8 input does not apply: anything but TensorRT's implicit INT8 from onnxruntime's ranges (where
        the input's range is runner's to give the letterbox)."""
        from runner.backends.tensorrt.build import int8_input_applies

        mechanism = self.precision_mechanism(cfg)
        if not int8_input_applies(mechanism, cfg.precision.calibrator.value):  # the calibrator mechanism is int8's
            return (f"backend.int8_input: it applies to implicit int8 from onnxruntime's ranges (precision=int8, "
                    f"calibrator=percentile, on TensorRT <= 10), not to precision {cfg.precision.name.value} via "
                    f"{mechanism}")
        return None

    @staticmethod
    def _head_maps_refusal(cfg: RunConfig) -> str | None:
        """Where an engine ending at the head's maps does not apply: heads that are not one-to-many (no maps to
        decode)."""
        if cfg.export.head != Head.one2many:
            return (f"backend.head_maps: export.head={cfg.export.head.value} ends in its own (B, N, 6) detections; it "
                    f"applies to export.head=one2many")
        return None

    def build(self, cfg: RunConfig, export: ExportResult, calibration: CalibrationSet | None = None) -> BuildResult:
        b = cfg.backend
        if cfg.build.tool == BuildTool.ultralytics:
            from runner.backends.tensorrt.engine_export import EngineExportSpec, export_engine

            return export_engine(EngineExportSpec(
                weights=export.weights, imgsz=tuple(cfg.model.imgsz), dynamic=cfg.shape.mode == ShapeMode.dynamic,
                half=cfg.precision.name == Precision.fp16, workspace_gib=b.workspace_gib,
                optimization_level=b.builder_optimization_level, opset=cfg.export.opset,
                simplify=cfg.export.simplify, end2end=export.tested.end2end, nms=cfg.export.head == Head.nms,
                batch=1 if cfg.shape.mode == ShapeMode.dynamic else cfg.shape.opt[0], cache_dir=cfg.cache_dir,
                use_engine_cache=b.engine_cache))
        from runner.backends.tensorrt.build import BuildSpec, build_engine

        built = build_engine(BuildSpec(
            onnx_path=export.tested.path, precision=cfg.precision.name.value, mechanism=self.precision_mechanism(cfg),
            calibration=calibration, calibrator=cfg.precision.calibrator.value,
            keep_float=tuple(cfg.precision.keep_float), concat_scales=cfg.precision.concat_scales.value,
            pin_int8=tuple(cfg.precision.pin_int8), pin_int8_float_out=tuple(cfg.precision.pin_int8_float_out),
            min_shape=list(cfg.shape.min), opt_shape=list(cfg.shape.opt), max_shape=list(cfg.shape.max),
            optimization_level=b.builder_optimization_level, workspace_gib=b.workspace_gib, cache_dir=cfg.cache_dir,
            use_engine_cache=b.engine_cache, use_timing_cache=b.timing_cache, tf32=b.tf32, half_input=b.half_input,
            int8_input=b.int8_input,
            half_outputs=export.tested.head_maps is not None and cfg.precision.name != Precision.fp32))
        built.head_maps = export.tested.head_maps
        return built

    def runner(self, cfg: RunConfig, build: BuildResult):
        from runner.backends.tensorrt.runtime import TrtRunner

        return TrtRunner(build.artifact, cuda_graph=cfg.bench.cuda_graph, head_maps=build.head_maps,
                         input_range=build.input_range)
