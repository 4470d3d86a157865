"""Build stage: ONNX -> TensorRT engine, with an engine cache and a timing cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runner import trt_compat

PRECISIONS = ("fp32", "fp16")


@dataclass
class BuildSpec:
    onnx_path: str
    precision: str  # "fp32" | "fp16"
    fp16_mode: str  # "builder_flag" | "strongly_typed" (resolved from "auto" by the caller)
    min_shape: list[int]
    opt_shape: list[int]
    max_shape: list[int]
    optimization_level: int | None  # None = TensorRT default
    workspace_gib: float
    cache_dir: str
    use_engine_cache: bool = True
    use_timing_cache: bool = True
    tf32: bool = False  # TensorRT enables TF32 for fp32 layers by default

    @property
    def fp16_mechanism(self) -> str:
        return "none" if self.precision == "fp32" else self.fp16_mode


@dataclass
class BuildResult:
    ok: bool
    error: str | None
    engine_path: str | None
    build_s: float
    engine_bytes: int
    cache_hit: bool
    fp16_mechanism: str
    optimization_level: int
    trt_version: str
    gpu_name: str
    log_path: str
    layers_path: str | None
    num_layers: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cache_key(spec: BuildSpec, trt_version: str, gpu_name: str) -> str:
    """sha256 over the ONNX bytes, the build-relevant spec fields, the TensorRT version and the GPU."""
    h = hashlib.sha256()
    with open(spec.onnx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    fields = {
        "precision": spec.precision,
        "fp16_mechanism": spec.fp16_mechanism,
        "min_shape": list(spec.min_shape),
        "opt_shape": list(spec.opt_shape),
        "max_shape": list(spec.max_shape),
        "optimization_level": spec.optimization_level,
        "workspace_gib": spec.workspace_gib,
        "tf32": spec.tf32,
        "profiling_verbosity": "detailed",
    }
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(f"|trt={trt_version}|gpu={gpu_name}".encode())
    return h.hexdigest()


def timing_cache_path(cache_dir: str, gpu_name: str, trt_version: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return Path(cache_dir) / "timing" / f"{slug}_trt{trt_version}.cache"


@contextmanager
def heartbeat(progress: Callable[[str], None], every_s: float = 30.0):
    """Say every `every_s` seconds that a long step goes on (TensorRT 8.6 has no progress monitor)."""
    done, start = threading.Event(), time.perf_counter()

    def beat() -> None:
        while not done.wait(every_s):
            progress(f"build: still building, {time.perf_counter() - start:.0f} s so far")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_engine(spec: BuildSpec, progress: Callable[[str], None] = print) -> BuildResult:
    """Build (or fetch from the engine cache) the engine of ``spec``. TensorRT failures give ok=False."""
    if spec.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {spec.precision!r}")
    if spec.precision == "fp16" and spec.fp16_mode not in ("builder_flag", "strongly_typed"):
        raise ValueError(f"fp16_mode must be resolved to builder_flag or strongly_typed, got {spec.fp16_mode!r}")
    result = BuildResult(
        ok=False, error=None, engine_path=None, build_s=0.0, engine_bytes=0, cache_hit=False,
        fp16_mechanism=spec.fp16_mechanism, optimization_level=-1, trt_version="", gpu_name="",
        log_path="", layers_path=None, num_layers=None,
    )
    for available, why in (trt_compat.trt_available(), trt_compat.cuda_gpu_available()):
        if not available:
            result.error = why
            return result
    import tensorrt as trt

    result.trt_version, result.gpu_name = trt.__version__, trt_compat.gpu_name()
    key = cache_key(spec, result.trt_version, result.gpu_name)
    engines = Path(spec.cache_dir) / "engines"
    engines.mkdir(parents=True, exist_ok=True)
    plan_path, meta_path = engines / f"{key}.plan", engines / f"{key}.json"

    if spec.use_engine_cache and plan_path.exists() and meta_path.exists():
        progress("build: engine cache hit")
        cached = json.loads(meta_path.read_text())
        cached.update(cache_hit=True, build_s=0.0, engine_bytes=plan_path.stat().st_size)
        return BuildResult(**cached)

    result.log_path = str(engines / f"{key}.log")
    logger = trt_compat.get_logger()
    logger.start()
    try:
        plan = _build(trt, spec, result, logger, progress)
    finally:
        Path(result.log_path).write_text("\n".join(logger.stop()) + "\n")
    if plan is None:
        return result

    _write_atomic(plan_path, plan)
    result.engine_path, result.engine_bytes = str(plan_path), plan_path.stat().st_size
    layers = _engine_information(trt, logger, plan)
    if layers is not None:
        info = json.loads(layers, strict=False)  # 8.6 emits raw control characters inside strings
        layers_path = engines / f"{key}.layers.json"
        layers_path.write_text(json.dumps(info, indent=1))
        result.layers_path = str(layers_path)
        result.num_layers = len(info.get("Layers", []))
    result.ok = True
    meta_path.write_text(json.dumps(result.to_dict(), indent=1))
    progress(f"build: done in {result.build_s:.1f} s, {result.engine_bytes / 1e6:.1f} MB")
    return result


def _build(trt, spec: BuildSpec, result: BuildResult, logger, progress):
    """Parse, configure, build. Returns the serialized plan, or None with result.error set."""
    try:
        progress("build: parsing")
        builder = trt.Builder(logger)
        network = builder.create_network(trt_compat.network_flags(trt, spec.fp16_mechanism == "strongly_typed"))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(spec.onnx_path):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            result.error = "\n".join(errors or logger.errors()) or f"cannot parse {spec.onnx_path}"
            return None
        if network.num_inputs != 1:
            result.error = f"expected a single network input, got {network.num_inputs}"
            return None

        config = builder.create_builder_config()
        trt_compat.set_workspace(config, spec.workspace_gib * (1 << 30))
        result.optimization_level = trt_compat.set_optimization_level(config, spec.optimization_level)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if not spec.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means IEEE fp32 unless asked
        if spec.fp16_mechanism == "builder_flag":
            trt_compat.enable_fp16_flag(trt, config)
        profile = builder.create_optimization_profile()
        shapes = [tuple(int(d) for d in s) for s in (spec.min_shape, spec.opt_shape, spec.max_shape)]
        profile.set_shape(network.get_input(0).name, *shapes)
        if config.add_optimization_profile(profile) < 0:
            result.error = "\n".join(logger.errors()) or "TensorRT rejected the optimization profile"
            return None
        timing_path = _load_timing_cache(spec, config, result, progress)
        first_record = len(logger.records)

        precision = "fp32" if spec.precision == "fp32" else f"fp16 via {spec.fp16_mechanism}"
        progress(f"build: building (level {result.optimization_level}, {precision})...")
        t0 = time.perf_counter()
        with heartbeat(progress):
            plan = builder.build_serialized_network(network, config)
        result.build_s = time.perf_counter() - t0
    except RuntimeError as exc:  # trt_compat.Unsupported, or a TensorRT binding error
        result.error = "\n".join(logger.errors()) or str(exc)
        return None
    if plan is None:
        result.error = "\n".join(logger.errors(first_record)) or (
            f"build_serialized_network returned None without an error; see {result.log_path}"
        )
        return None
    if timing_path is not None:
        _write_atomic(timing_path, config.get_timing_cache().serialize())
    return plan


def _load_timing_cache(spec: BuildSpec, config, result: BuildResult, progress) -> Path | None:
    """Attach the on-disk timing cache (or a fresh one) to config; return where to save it, or None."""
    if not spec.use_timing_cache:
        return None
    path = timing_cache_path(spec.cache_dir, result.gpu_name, result.trt_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = path.read_bytes() if path.exists() else b""
    if not config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False):
        progress(f"build: timing cache {path} rejected, starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return path


def _engine_information(trt, logger, plan) -> str | None:
    """Engine inspector JSON (all layers), or None where unavailable."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    try:
        if engine is None or not hasattr(engine, "create_engine_inspector"):
            return None
        return engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    except RuntimeError:
        return None
    finally:
        del engine  # before the runtime that made it
