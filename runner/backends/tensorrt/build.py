"""Build stage, build=tensorrt_api: ONNX -> TensorRT engine with the TensorRT Python API.

Explicit batch where the version needs it, the workspace through the memory pool, one optimization profile,
the optimization level, and TF32 off unless asked: TensorRT turns TF32 on for fp32 layers by default, which
gave rel-L2 3e-4 against onnxruntime on an H200, so fp32 here means IEEE fp32. A timing cache per GPU and
TensorRT version, and an engine cache keyed by ONNX bytes + build settings + TensorRT version + GPU.
The build log and the engine inspector's layer JSON are kept beside the engine. Both caches are checked
against the size and sha256 recorded when they were written (`runner.cache`): a stale engine is rebuilt,
a stale timing cache replaced by a fresh one.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner import cache
from runner.backends.tensorrt import compat
from runner.backends.tensorrt.runtime import engine_profile
from runner.config import PIN_KEYS, BuildTool, Mechanism, Precision
from runner.quantize import CalibrationSet, tensor_ranges
from runner.results import BuildResult, StageError

log = logging.getLogger(__name__)
MECHANISMS = {Precision.fp32.value: (Mechanism.none.value,),
              Precision.fp16.value: (Mechanism.builder_flag.value, Mechanism.strongly_typed.value),
              Precision.int8.value: (Mechanism.calibrator.value, Mechanism.qdq.value)}
# an fp16 input: where the engine's first layers run in fp16 or int8 anyway, and no TensorRT calibrator reads float
# batches (implicit INT8 from onnxruntime's ranges has none)
HALF_INPUT_MECHANISMS = (Mechanism.builder_flag.value, Mechanism.qdq.value)


def int8_input_applies(mechanism: str, calibrator: str) -> bool:
    """Whether an engine of `mechanism` can take an int8 input: implicit INT8 from onnxruntime's ranges, which give
    the input's range (TensorRT's calibrators feed float batches; a Q/DQ ONNX quantizes its float input itself)."""
    return mechanism == Mechanism.calibrator and calibrator not in compat.CALIBRATORS


def half_input_applies(mechanism: str, calibrator: str) -> bool:
    """Whether an engine of `mechanism` (and for the calibrator mechanism, `calibrator`) can take an fp16 input: the
    int8 input's engines too."""
    return mechanism in HALF_INPUT_MECHANISMS or int8_input_applies(mechanism, calibrator)


@dataclass
class BuildSpec:
    onnx_path: str
    precision: str  # "fp32" | "fp16" | "int8"
    mechanism: str  # how the precision is reached, resolved by the caller: one of MECHANISMS[precision]
    min_shape: list[int]
    opt_shape: list[int]
    max_shape: list[int]
    optimization_level: int | None  # None = TensorRT default
    workspace_gib: float
    cache_dir: str
    use_engine_cache: bool = True
    use_timing_cache: bool = True
    tf32: bool = False  # TensorRT enables TF32 for fp32 layers by default
    half_input: bool = False  # the input tensor in fp16 (fp16 and int8 Q/DQ engines)
    int8_input: bool = False  # the input tensor in int8 at its range (implicit INT8 from onnxruntime's ranges); fp16
    #   where it has none (`BuildResult.input_range` None)
    half_outputs: bool = False  # every float output in fp16, where the network is weakly typed (strongly typed: the
    #   ONNX's types)
    calibration: CalibrationSet | None = None  # mechanism=calibrator: the images, at the opt shape
    calibrator: str = "entropy2"  # mechanism=calibrator: entropy2 | minmax (TensorRT's) | percentile (onnxruntime's
    #   ranges, `quantize.tensor_ranges`, set as dynamic ranges)
    keep_float: tuple[str, ...] = ()  # mechanism=calibrator: fnmatch patterns on layer names built in fp16 (and for
    #   percentile, the tensors left without a range)
    concat_scales: str = "own"  # calibrator=percentile: each Concat's tensors at their own ranges, or one (shared)
    pin_int8: tuple[str, ...] = ()  # mechanism=calibrator: fnmatch patterns on layer names built in int8 (those of
    #   keep_float excepted); for percentile, the convolutions' own outputs get ranges too
    pin_int8_float_out: tuple[str, ...] = ()  # mechanism=calibrator: fnmatch patterns on layer names built in int8
    #   with an fp16 output, those of keep_float too


def cache_key(spec: BuildSpec, trt_version: str, gpu_name: str) -> str:
    """sha256 over the ONNX bytes, the build-relevant spec fields, the TensorRT version and the GPU."""
    fields = {
        "precision": spec.precision,
        "mechanism": spec.mechanism,
        "calibration": _calibration_fields(spec),
        "keep_float": sorted(spec.keep_float) if spec.mechanism == Mechanism.calibrator else None,
        # only where given: engines built before the pins keep their keys
        **{key: sorted(getattr(spec, key)) for key in PIN_KEYS if getattr(spec, key)},
        **({"int8_input": True} if spec.int8_input else {}),
        "min_shape": list(spec.min_shape),
        "opt_shape": list(spec.opt_shape),
        "max_shape": list(spec.max_shape),
        "optimization_level": spec.optimization_level,
        "workspace_gib": spec.workspace_gib,
        "tf32": spec.tf32,
        "half_input": spec.half_input,
        "half_outputs": spec.half_outputs,
        "profiling_verbosity": "detailed",
    }
    h = cache.file_sha256(spec.onnx_path)
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(f"|trt={trt_version}|gpu={gpu_name}".encode())
    return h.hexdigest()


def _calibration_fields(spec: BuildSpec) -> dict | None:
    if spec.mechanism != Mechanism.calibrator:
        return None
    ranges = {"concat_scales": spec.concat_scales} if spec.calibrator not in compat.CALIBRATORS else {}
    return {"calibrator": spec.calibrator, "images": spec.calibration.key, **ranges}


def calibration_cache_path(spec: BuildSpec, trt_version: str, gpu_name: str) -> Path:
    """The calibration cache of an implicitly calibrated engine, keyed like the engine cache: the ONNX bytes, the
    calibrator, the images and their shape, the TensorRT version and the GPU."""
    h = cache.file_sha256(spec.onnx_path)
    h.update(json.dumps(_calibration_fields(spec), sort_keys=True).encode())
    h.update(f"|trt={trt_version}|gpu={gpu_name}".encode())
    return Path(spec.cache_dir) / "calibration" / f"{h.hexdigest()}.cache"


def timing_cache_path(cache_dir: str, gpu_name: str, trt_version: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return Path(cache_dir) / "timing" / f"{slug}_trt{trt_version}.cache"


@contextmanager
def heartbeat(what: str, every_s: float = 30.0):
    """Say every `every_s` seconds that a long step goes on (TensorRT 8.6 has no progress monitor)."""
    done, start = threading.Event(), time.perf_counter()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("build: %s, %.0f s so far", what, time.perf_counter() - start)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class EngineCache:
    """Built engines on disk: `<key><suffix>` beside `<key>.json`, the BuildResult that made it with its paths
    relative to the folder and the engine's size and sha256. Plain file bookkeeping: no TensorRT here."""

    PATHS = ("artifact", "log_path", "layers_path")  # the BuildResult fields that name files of the cache

    def __init__(self, cache_dir: str, suffix: str = ".plan"):
        self.folder, self.suffix = Path(cache_dir).absolute() / "engines", suffix
        self.folder.mkdir(parents=True, exist_ok=True)

    def engine_path(self, key: str) -> Path:
        return self.folder / f"{key}{self.suffix}"

    def locked(self, key: str):
        """Hold the lock of `key`: parallel jobs that need one engine build it once."""
        return cache.locked(self.folder / f"{key}.lock")

    def lookup(self, key: str) -> BuildResult | None:
        """The cached build of `key`; None when there is none, or when it is stale (said and removed)."""
        try:
            cached = cache.load(self.folder / f"{key}.json", BuildResult.from_dict)
        except cache.Stale as stale:
            log.warning("build: cached %s; rebuilding", stale)
            for path in self.folder.glob(f"{key}.*"):
                if path.is_file() and path.suffix != ".lock":
                    path.unlink()
            return None
        if cached:
            for name in self.PATHS:
                setattr(cached, name, cache.absolute(getattr(cached, name), self.folder))
            cached.cache_hit, cached.build_s = True, 0.0
            log.info("build: engine cache hit")
        return cached

    def store(self, key: str, result: BuildResult) -> None:
        """Record `result`, whose engine is written already."""
        paths = {name: cache.relative(getattr(result, name), self.folder) for name in self.PATHS}
        cache.save(self.folder / f"{key}.json", {**result.to_dict(), **paths}, [Path(result.artifact)])


class Calibrator:
    """Implicit INT8 calibration (TensorRT <= 10): feeds the calibration batches to the builder from one device
    buffer and keeps TensorRT's calibration table in a recorded cache file, so a rebuild skips calibrating."""

    def __init__(self, trt, spec: BuildSpec, cache_path: Path):
        base = compat.calibrator_base(trt, spec.calibrator)
        outer = self

        class Feed(base):  # TensorRT calls these from the build
            def __init__(self):
                base.__init__(self)

            def get_batch_size(self) -> int:
                return spec.calibration.shape[0]

            def get_batch(self, names):
                return outer.next_batch()

            def read_calibration_cache(self):
                return outer.read_cache()

            def write_calibration_cache(self, table) -> None:
                cache.write_recorded(outer.cache_path, bytes(table))

        self.spec, self.cache_path, self.fed, self.device = spec, cache_path, 0, None
        self.batches = spec.calibration.batches()
        self.record = {"calibrator": spec.calibrator, "images": len(spec.calibration.files),
                       "shape": list(spec.calibration.shape), "cache": str(cache_path), "cache_hit": False}
        self.trt_calibrator = Feed()

    def read_cache(self) -> bytes | None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = cache.read_recorded(self.cache_path)
        except cache.Stale as stale:
            log.warning("build: calibration cache %s; calibrating again", stale)
            return None
        if table:
            self.record["cache_hit"] = True
            log.info("build: calibration cache hit, %s", self.cache_path.name)
        return table

    def next_batch(self) -> list[int] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        batch, rt = np.ascontiguousarray(batch, np.float32), compat.cudart()
        if self.device is None:
            self.device = compat.cuda_call(rt.cudaMalloc, batch.nbytes)
        compat.cuda_call(rt.cudaMemcpy, self.device, batch.ctypes.data, batch.nbytes,
                         rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
        self.fed += 1
        if self.fed == 1 or self.fed % 8 == 0 or self.fed == self.spec.calibration.batches_total:
            log.info("build: calibrating (%s), batch %d/%d", self.spec.calibrator, self.fed,
                     self.spec.calibration.batches_total)
        return [int(self.device)]

    def free(self) -> None:
        if self.device is not None:
            compat.cuda_call(compat.cudart().cudaFree, self.device)
            self.device = None


def inspect_plan(trt, logger, plan: bytes, path: Path) -> tuple[list[list[int]], str | None, int | None]:
    """(profile 0 of the input, layers JSON path, layer count) of a serialized engine; the engine
    inspector's JSON is written to `path` where the TensorRT version has an inspector."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise StageError("build", f"cannot deserialize the engine just built: {logger.last_error}")
    try:
        inputs = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                  if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT]
        profile = [list(s) for s in engine_profile(engine, inputs[0])]
        if not hasattr(engine, "create_engine_inspector"):
            return profile, None, None
        try:
            text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
            info = json.loads(text, strict=False)  # 8.6 emits raw control characters inside strings
        except (RuntimeError, ValueError):  # 8.6 gives an empty text for an engine with NMS in it
            log.info("build: the engine inspector gave no layer information")
            return profile, None, None
        path.write_text(json.dumps(info, indent=1))
        return profile, str(path), len(info.get("Layers", []))
    finally:
        del engine  # before the runtime that made it


def build_engine(spec: BuildSpec) -> BuildResult:
    """Build (or fetch from the engine cache) the engine of `spec`. Raises StageError with TensorRT's words."""
    if spec.mechanism not in MECHANISMS.get(spec.precision, ()):
        raise ValueError(f"precision {spec.precision!r} with mechanism {spec.mechanism!r}: expected {MECHANISMS}")
    if spec.mechanism == Mechanism.calibrator and spec.calibration is None:
        raise ValueError("mechanism 'calibrator' needs calibration images")
    if spec.half_input and not half_input_applies(spec.mechanism, spec.calibrator):
        raise ValueError(f"half_input with mechanism {spec.mechanism!r} ({spec.calibrator}): only "
                         f"{HALF_INPUT_MECHANISMS} or onnxruntime's ranges")
    if spec.int8_input and (spec.half_input or not int8_input_applies(spec.mechanism, spec.calibrator)):
        raise ValueError(f"int8_input with mechanism {spec.mechanism!r} ({spec.calibrator}), half_input "
                         f"{spec.half_input}: only onnxruntime's ranges, with no fp16 input")
    import tensorrt as trt

    engines = EngineCache(spec.cache_dir)
    result = BuildResult(tool=BuildTool.tensorrt_api.value, artifact="",
                         profile=[spec.min_shape, spec.opt_shape, spec.max_shape],
                         precision_mechanism=spec.mechanism, tf32=spec.tf32, trt_version=trt.__version__,
                         gpu=compat.gpu_name())
    key = cache_key(spec, result.trt_version, result.gpu)
    with engines.locked(key):
        if spec.use_engine_cache and (cached := engines.lookup(key)):
            return cached
        return _build_and_store(trt, spec, engines, key, result)


def _build_and_store(trt, spec: BuildSpec, engines: EngineCache, key: str, result: BuildResult) -> BuildResult:
    result.log_path = str(engines.folder / f"{key}.log")
    logger = compat.get_logger()
    logger.start()
    try:
        plan = _build(trt, spec, result, logger)
    finally:
        Path(result.log_path).write_text("\n".join(logger.stop()) + "\n")

    plan_path = engines.engine_path(key)
    cache.write_atomic(plan_path, plan)
    result.artifact, result.size_bytes = str(plan_path), plan_path.stat().st_size
    result.profile, result.layers_path, result.num_layers = inspect_plan(
        trt, logger, plan, engines.folder / f"{key}.layers.json")
    engines.store(key, result)
    log.info("build: done in %.1f s, %.1f MB", result.build_s, result.size_bytes / 1e6)
    return result


def _build(trt, spec: BuildSpec, result: BuildResult, logger) -> bytes:
    """Parse, configure, build; returns the serialized plan. Raises StageError with TensorRT's messages."""
    def failed(message: str) -> StageError:
        return StageError("build", message, partial=result)

    try:
        log.info("build: parsing")
        builder = trt.Builder(logger)
        strongly_typed = (spec.mechanism == Mechanism.strongly_typed
                          or (spec.mechanism == Mechanism.qdq and compat.qdq_strongly_typed(trt)))
        network = builder.create_network(compat.network_flags(trt, strongly_typed))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(spec.onnx_path):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise failed("\n".join(errors or logger.errors()) or f"cannot parse {spec.onnx_path}")
        if network.num_inputs != 1:
            raise failed(f"expected a single network input, got {network.num_inputs}")
        if spec.half_input:
            log.info("build: input '%s' in fp16", compat.set_half_input(trt, network, strongly_typed))
        if spec.half_outputs and not strongly_typed:
            log.info("build: outputs %s in fp16", ", ".join(compat.set_half_outputs(trt, network)))

        config = builder.create_builder_config()
        compat.set_workspace(config, spec.workspace_gib * (1 << 30))
        result.optimization_level = compat.set_optimization_level(config, spec.optimization_level)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if not spec.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means IEEE fp32 unless asked
        if spec.mechanism == Mechanism.builder_flag:
            compat.enable_fp16_flag(trt, config)
        profile = builder.create_optimization_profile()
        shapes = [tuple(int(d) for d in s) for s in (spec.min_shape, spec.opt_shape, spec.max_shape)]
        profile.set_shape(network.get_input(0).name, *shapes)
        if config.add_optimization_profile(profile) < 0:
            raise failed("\n".join(logger.errors()) or "TensorRT rejected the optimization profile")
        if spec.mechanism == Mechanism.qdq and not strongly_typed:
            compat.enable_int8_flags(trt, config)  # explicit quantization; fp16 where the Q/DQ ONNX has floats
        calibrator, pinned, int8_pinned = None, [], {}
        if spec.mechanism == Mechanism.calibrator:
            if spec.calibrator in compat.CALIBRATORS:
                calibrator = Calibrator(trt, spec, calibration_cache_path(spec, result.trt_version, result.gpu))
                compat.enable_int8_calibration(trt, config, calibrator.trt_calibrator, profile)
            else:
                result.calibration = _set_ranges(trt, spec, network, config)
                if spec.int8_input:
                    _set_int8_input(trt, network, result)
            pinned = compat.pin_layers(trt, network, config, spec.keep_float, "fp16")
            if spec.keep_float and not pinned:
                log.warning("build: no layer matches precision.keep_float %s: nothing is kept in fp16",
                            list(spec.keep_float))
            int8_pinned = _pin_int8(trt, spec, network, config)
        timing_path = _load_timing_cache(spec, config, result)
        first_record = len(logger.records)

        precision = "fp32" if spec.precision == "fp32" else f"{spec.precision} via {spec.mechanism}"
        log.info("build: building (level %d, %s)...", result.optimization_level, precision)
        t0 = time.perf_counter()
        try:
            with heartbeat("still building"):
                plan = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:  # its record after the build: whether TensorRT read the cached table
                calibrator.free()
                result.calibration = calibrator.record
            if result.calibration is not None:
                result.calibration.update(keep_float=list(spec.keep_float), fp16_layers=pinned, **int8_pinned)
        result.build_s = time.perf_counter() - t0
    except RuntimeError as exc:  # compat.Unsupported, or a TensorRT binding error
        raise failed("\n".join(logger.errors()) or str(exc)) from None
    if plan is None:
        raise failed("\n".join(logger.errors(first_record))
                     or f"build_serialized_network returned None without an error; see {result.log_path}")
    if timing_path is not None:
        cache.write_recorded(timing_path, config.get_timing_cache().serialize())
    return plan


def _pin_int8(trt, spec: BuildSpec, network, config) -> dict:
    """Pin `spec`'s int8 layers (`pin_int8` but those kept in float, then `pin_int8_float_out` with an fp16 output),
    saying how many; returns their calibration record: the patterns and the layers pinned, per list given."""
    record = {}
    for key, layers_key, float_out in (("pin_int8", "int8_layers", False),
                                       ("pin_int8_float_out", "int8_float_out_layers", True)):
        if patterns := getattr(spec, key):
            names = compat.pin_layers(trt, network, config, patterns, "int8", float_out=float_out,
                                      unless=() if float_out else spec.keep_float)
            log.log(logging.INFO if names else logging.WARNING, "build: %d layers pinned in int8%s (precision.%s %s)",
                    len(names), " with an fp16 output" * float_out, key, list(patterns))
            record.update({key: list(patterns), layers_key: names})
    return record


def _set_ranges(trt, spec: BuildSpec, network, config) -> dict:
    """Implicit INT8 from onnxruntime's ranges of the ONNX's tensors (`quantize.tensor_ranges`): TensorRT has no
    calibrator for `spec.calibrator`. Returns the calibration record."""
    ranges, path, cached = tensor_ranges(spec.onnx_path, spec.calibration, spec.calibrator, Path(spec.cache_dir),
                                         spec.keep_float, spec.concat_scales, conv_outputs=bool(spec.pin_int8))
    ranged = compat.set_dynamic_ranges(trt, network, config, ranges)
    log.info("build: int8 dynamic ranges on %d tensors (%s, onnxruntime%s)", ranged, spec.calibrator,
             ", cached" if cached else "")
    if not ranged:
        log.warning("build: no tensor got an int8 range (precision.keep_float %s keeps every quantized node in "
                    "float): the engine has no int8 layer", list(spec.keep_float))
    return {"calibrator": spec.calibrator, "ranges": "onnxruntime", "images": len(spec.calibration.files),
            "shape": list(spec.calibration.shape), "cache": str(path), "cache_hit": cached,
            "concat_scales": spec.concat_scales, "tensors": ranged}


def _set_int8_input(trt, network, result: BuildResult) -> None:
    """The input in int8 at its calibrated range (`result.input_range`); where it has none (the layers reading it
    kept in float), in fp16, said."""
    if int8 := compat.set_int8_input(trt, network):
        name, result.input_range = int8
        log.info("build: input '%s' in int8, range %.4g", name, result.input_range)
    else:
        name = compat.set_half_input(trt, network, strongly_typed=False)
        log.warning("build: input '%s' in fp16, not int8: the layers reading it are kept in float, so it has no int8 "
                    "range", name)


def _load_timing_cache(spec: BuildSpec, config, result: BuildResult) -> Path | None:
    """Attach the on-disk timing cache (or a fresh one) to config; return where to save it, or None."""
    if not spec.use_timing_cache:
        return None
    path = timing_cache_path(spec.cache_dir, result.gpu, result.trt_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = read_timing_cache(path)
    if not config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False):
        log.info("build: timing cache %s rejected, starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return path


def read_timing_cache(path: Path) -> bytes:
    """The timing cache saved at `path`; b"" (start a fresh one) when there is none or it is stale."""
    try:
        return cache.read_recorded(path) or b""
    except cache.Stale as stale:
        log.warning("build: timing cache %s; starting a new one", stale)
        return b""
