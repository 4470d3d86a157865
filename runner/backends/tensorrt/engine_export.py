"""Build stage, build=ultralytics: pt -> engine in one step with ultralytics'
`model.export(format="engine", dynamic=..., quantize=16, workspace=...)`.

ultralytics exports its own ONNX (with the one-to-one head for export.head=end2end), builds it with the
TensorRT API under its own choices (dynamic profile min 1x3x32x32, opt imgsz, max 2x imgsz; TF32 left at
TensorRT's default, on; BuilderFlag.FP16 for half on TensorRT <= 10, a ModelOpt fp16 ONNX on 11), and writes
the plan behind a metadata header: a 4-byte little-endian length, then JSON (description, author, date,
version, license, docs, stride, task, head, batch, imgsz, names, args, channels, end2end). runner changes one
thing: ultralytics has no option for the builder optimization level, so the builder config it creates gets
`backend.builder_optimization_level`.
What the builder saw (level, FP16, TF32) is read off that config at build time and recorded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from runner.backends.tensorrt import compat
from runner.backends.tensorrt.build import EngineCache, heartbeat, inspect_plan
from runner.backends.tensorrt.runtime import load_plan
from runner.cache import file_sha256
from runner.checkpoint import verified_copy
from runner.config import BuildTool, Mechanism
from runner.export import ultralytics_nms
from runner.results import BuildResult, StageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineExportSpec:
    weights: str
    imgsz: tuple[int, int]
    dynamic: bool
    half: bool
    workspace_gib: float
    optimization_level: int | None  # None: TensorRT's default, as ultralytics leaves it
    opset: int
    simplify: bool
    cache_dir: str
    end2end: bool = False  # the NMS-free one-to-one head (ultralytics' nms=False)
    nms: bool = False  # NMS in the graph (ultralytics' nms=True)
    batch: int = 1  # a static engine's batch
    use_engine_cache: bool = True

    def key(self, trt_version: str, gpu: str) -> str:
        settings = {k: v for k, v in self.__dict__.items() if k not in ("weights", "cache_dir", "use_engine_cache")}
        h = file_sha256(self.weights, hashlib.sha256(b"ultralytics-engine|"))
        h.update(json.dumps({**settings, "ultralytics": version("ultralytics"), "trt": trt_version, "gpu": gpu},
                            sort_keys=True).encode())
        return h.hexdigest()


@contextmanager
def observed_builder(trt, logger, level: int | None):
    """Within the block, `trt.Builder` is a subclass that logs to `logger`, sets `level` on every builder
    config it creates, and records what each build was configured with (yielded list of dicts)."""
    seen: list[dict] = []
    original = trt.Builder

    class Builder(original):
        def __init__(self, _their_logger):
            original.__init__(self, logger)

        def create_builder_config(self):
            config = original.create_builder_config(self)
            compat.set_optimization_level(config, level)
            return config

        def build_serialized_network(self, network, config):
            flags = trt.BuilderFlag
            seen.append({"optimization_level": int(config.builder_optimization_level),
                         "fp16": compat.has_builder_fp16_flag(trt) and config.get_flag(flags.FP16),
                         "tf32": config.get_flag(flags.TF32)})
            return original.build_serialized_network(self, network, config)

    trt.Builder = Builder
    try:
        yield seen
    finally:
        trt.Builder = original


def export_engine(spec: EngineExportSpec) -> BuildResult:
    """ultralytics' engine export of `spec.weights` (or the engine cache's copy). Raises StageError."""
    import tensorrt as trt

    cache = EngineCache(spec.cache_dir, suffix=".engine")
    gpu = compat.gpu_name()
    key = spec.key(trt.__version__, gpu)
    with cache.locked(key):
        if spec.use_engine_cache and (cached := cache.lookup(key)):
            return cached
        return _export_and_store(trt, spec, cache, key, gpu)


def _export_and_store(trt, spec: EngineExportSpec, cache: EngineCache, key: str, gpu: str) -> BuildResult:
    work = cache.folder / f"{key}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # ultralytics writes model.onnx and model.engine next to the weights, loaded once that copy is verified
    local = verified_copy(spec.weights, work / "model.pt", "build")
    result = BuildResult(tool=BuildTool.ultralytics.value, artifact="", profile=[], trt_version=trt.__version__,
                         gpu=gpu, log_path=str(cache.folder / f"{key}.log"))
    logger = compat.get_logger()
    logger.start()
    log.info("build: ultralytics model.export(format='engine', dynamic=%s, quantize=%s)...", spec.dynamic,
             16 if spec.half else None)
    t0 = time.perf_counter()
    try:
        from ultralytics import YOLO

        with heartbeat("ultralytics still exporting"), observed_builder(trt, logger, spec.optimization_level) as seen:
            produced = YOLO(str(local)).export(
                format="engine", imgsz=list(spec.imgsz), dynamic=spec.dynamic, quantize=16 if spec.half else None,
                workspace=spec.workspace_gib, opset=spec.opset, simplify=spec.simplify,
                nms=ultralytics_nms(spec.end2end, spec.nms), batch=spec.batch, device=0, verbose=False)
    except Exception as exc:  # ultralytics' own failure is the verdict; TensorRT's words come with it
        raise StageError("build", "\n".join([f"ultralytics: {type(exc).__name__}: {exc}", *logger.errors()]),
                         partial=result) from None
    finally:
        Path(result.log_path).write_text("\n".join(logger.stop()) + "\n")
    result.build_s = time.perf_counter() - t0
    engine = cache.engine_path(key)
    shutil.move(produced, engine)
    plan, result.metadata = load_plan(str(engine))
    built = seen[-1] if seen else {}
    result.optimization_level, result.tf32 = built.get("optimization_level"), built.get("tf32")
    result.precision_mechanism = (Mechanism.builder_flag if built.get("fp16")
                                  else Mechanism.strongly_typed if spec.half else Mechanism.none).value
    result.artifact, result.size_bytes = str(engine), engine.stat().st_size
    result.profile, result.layers_path, result.num_layers = inspect_plan(
        trt, logger, plan, cache.folder / f"{key}.layers.json")
    result.onnx_signature = _signature(work / "model.onnx")
    cache.store(key, result)
    log.info("build: ultralytics done in %.1f s, %.1f MB, profile %s", result.build_s, result.size_bytes / 1e6,
             " / ".join("x".join(map(str, s)) for s in result.profile))
    return result


def _signature(onnx_path: Path) -> dict | None:
    if not onnx_path.is_file():
        return None
    import onnx

    from runner.export import signature
    return signature(onnx.load(str(onnx_path), load_external_data=False))
