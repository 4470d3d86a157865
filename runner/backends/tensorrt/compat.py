"""Every TensorRT 8.6 / 10.x / 11.x and cuda-python API difference, chosen by capability.

Functions taking ``trt`` receive the imported ``tensorrt`` module (or a stand-in in tests) and
probe it with ``hasattr``; nothing here compares version strings. ``tensorrt`` itself is imported
lazily so that this module (and the runtime/build modules) import fine on machines without it.
Only TensorRT 8.6.0 has run (on an H200); the 10.x and 11.x branches are covered by tests with
stand-ins (tests/test_trt_compat.py), since no real 10.x/11.x could be had for the GPU machine.
"""
from __future__ import annotations

import importlib
import logging
from fnmatch import fnmatchcase

import numpy as np

from runner.config import Fp16Mode, Int8Mode, Mechanism

FP16_MODES = tuple(mode.value for mode in Fp16Mode)
INT8_MODES = tuple(mode.value for mode in Int8Mode)
CALIBRATORS = {"entropy2": "IInt8EntropyCalibrator2", "minmax": "IInt8MinMaxCalibrator"}
CALIBRATION_REMOVED = ("TensorRT {version} removed implicit INT8 calibration (IInt8Calibrator, BuilderFlag.INT8): "
                       "use precision=int8_qdq, an explicitly quantized ONNX")


class Unsupported(RuntimeError):
    """The installed TensorRT lacks a capability the request needs."""


def trt_available() -> tuple[bool, str]:
    """(True, "") when ``import tensorrt`` works, else (False, reason)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        if exc.name == "tensorrt":
            return False, "tensorrt is not installed (pip install 'runner[gpu]')"
        return False, f"import tensorrt failed: {exc}"
    except OSError as exc:  # a shared library of TensorRT or CUDA is missing
        return False, f"import tensorrt failed: {exc}"
    return True, ""


def trt_version() -> str:
    import tensorrt as trt

    return trt.__version__


def _cuda_module(name: str, legacy: str):
    """``cuda.bindings.<name>`` (cuda-python >= 12.8, 13), or the legacy ``cuda.<legacy>``."""
    try:
        return importlib.import_module(f"cuda.bindings.{name}")
    except ImportError:
        return importlib.import_module(f"cuda.{legacy}")


def cudart():
    """The CUDA runtime module."""
    return _cuda_module("runtime", "cudart")


def cuda_driver():
    """The CUDA driver module."""
    return _cuda_module("driver", "cuda")


def nvrtc():
    """NVRTC, the run-time CUDA compiler."""
    return _cuda_module("nvrtc", "nvrtc")


def cuda_call(fn, *args):
    """Call a cuda-python function, raise RuntimeError naming the error on failure, return its results.

    cuda-python returns ``(err,)`` or ``(err, value, ...)``; this returns None, the value or the tuple.
    """
    err, *rest = fn(*args)
    if int(err) != 0:
        raise RuntimeError(f"{fn.__name__} failed: {getattr(err, 'name', err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def cuda_gpu_available() -> tuple[bool, str]:
    """(True, "") when cudaGetDeviceCount sees a GPU, else (False, reason). No torch."""
    try:
        rt = cudart()
    except ImportError as exc:
        return False, f"cuda-python is not installed: {exc}"
    try:
        count = cuda_call(rt.cudaGetDeviceCount)
    except RuntimeError as exc:
        return False, f"no usable CUDA GPU ({exc})"
    if count < 1:
        return False, "no CUDA GPU found (cudaGetDeviceCount = 0)"
    return True, ""


def gpu_name(device: int = 0) -> str:
    """Name of a CUDA device from cudaGetDeviceProperties (bytes in cuda-python, NUL padded)."""
    name = cuda_call(cudart().cudaGetDeviceProperties, device).name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return name.strip()


def network_flags(trt, strongly_typed: bool) -> int:
    """Flags for ``builder.create_network``.

    EXPLICIT_BATCH: required on 8.6, deprecated and ignored on 10.x (always explicit), removed on
    11.x, so it is set whenever the enum still has it. STRONGLY_TYPED: absent on 8.6, present on
    10.x/11.x; requesting it where absent raises Unsupported.
    """
    flags_enum = trt.NetworkDefinitionCreationFlag
    flags = 0
    if hasattr(flags_enum, "EXPLICIT_BATCH"):
        flags |= 1 << int(flags_enum.EXPLICIT_BATCH)
    if strongly_typed:
        if not has_strongly_typed(trt):
            raise Unsupported(
                f"this TensorRT ({getattr(trt, '__version__', '?')}) has no strongly typed networks "
                "(NetworkDefinitionCreationFlag.STRONGLY_TYPED); use fp16_mode=builder_flag"
            )
        flags |= 1 << int(flags_enum.STRONGLY_TYPED)
    return flags


def has_builder_fp16_flag(trt) -> bool:
    """BuilderFlag.FP16 exists on 8.6 and 10.x (deprecated late in 10.x) and is gone on 11.x."""
    return hasattr(trt.BuilderFlag, "FP16")


def has_strongly_typed(trt) -> bool:
    """NetworkDefinitionCreationFlag.STRONGLY_TYPED exists from 9/10.x on, not on 8.6."""
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def resolve_fp16_mode(trt, requested: str) -> str:
    """"auto" -> "builder_flag" where BuilderFlag.FP16 exists (8.6, 10.x) else "strongly_typed" (11.x)."""
    if requested not in FP16_MODES:
        raise ValueError(f"fp16_mode must be one of {FP16_MODES}, got {requested!r}")
    if requested != Fp16Mode.auto:
        return requested
    return (Mechanism.builder_flag if has_builder_fp16_flag(trt) else Mechanism.strongly_typed).value


def enable_fp16_flag(trt, config) -> None:
    """config.set_flag(BuilderFlag.FP16) on 8.6/10.x; Unsupported on 11.x, which has no such flag."""
    if not has_builder_fp16_flag(trt):
        raise Unsupported(
            f"this TensorRT ({getattr(trt, '__version__', '?')}) has no BuilderFlag.FP16; "
            "use fp16_mode=strongly_typed with an fp16 ONNX"
        )
    config.set_flag(trt.BuilderFlag.FP16)


def has_implicit_int8(trt) -> bool:
    """Calibrators (IInt8EntropyCalibrator2, ...) and BuilderFlag.INT8: 8.6 and 10.x; gone on 11.x."""
    return hasattr(trt, "IInt8EntropyCalibrator2") and hasattr(trt.BuilderFlag, "INT8")


def qdq_strongly_typed(trt) -> bool:
    """A Q/DQ ONNX builds weakly typed with BuilderFlag.INT8 (8.6, 10.x), strongly typed where that flag is gone."""
    return not hasattr(trt.BuilderFlag, "INT8")


def resolve_int8_mode(trt, requested: str) -> str:
    """"auto" -> "calibrator" where TensorRT still calibrates implicitly (8.6, 10.x), else "qdq" (11.x)."""
    if requested not in INT8_MODES:
        raise ValueError(f"int8_mode must be one of {INT8_MODES}, got {requested!r}")
    if requested != Int8Mode.auto:
        return requested
    return (Mechanism.calibrator if has_implicit_int8(trt) else Mechanism.qdq).value


def enable_int8_flags(trt, config) -> None:
    """BuilderFlag.INT8, and FP16 for the layers int8 does not cover (8.6, 10.x: weakly typed networks)."""
    config.set_flag(trt.BuilderFlag.INT8)
    if has_builder_fp16_flag(trt):
        config.set_flag(trt.BuilderFlag.FP16)


def calibrator_base(trt, algorithm: str):
    """The TensorRT calibrator class to subclass: entropy2 or minmax (`CALIBRATORS`; percentile has none, its ranges
    come from onnxruntime: `set_dynamic_ranges`). Unsupported on 11.x, which removed them."""
    if not has_implicit_int8(trt):
        raise Unsupported(CALIBRATION_REMOVED.format(version=getattr(trt, "__version__", "?")))
    return getattr(trt, CALIBRATORS[algorithm])


def has_obey_precision(trt) -> bool:
    """BuilderFlag.OBEY_PRECISION_CONSTRAINTS: 8.6 and 10.x (weakly typed networks); gone on 11.x, where a strongly
    typed network takes each layer's type from the ONNX."""
    return hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")


def pin_layers(trt, network, config, patterns, precision: str, unless=(), float_out: bool = False) -> list[str]:
    """The layers whose name matches an fnmatch pattern of `patterns` and none of `unless` (the ONNX parser names a
    layer after its node) run in `precision` (fp16 or int8: every tensor they read and write then needs a dynamic
    range; with `float_out`, only what they read: their outputs are fp16), precision constraints obeyed; layers with
    a non-float output (shape arithmetic) keep theirs. Returns the names pinned. Unsupported on 11.x, which has no
    such flag."""
    if not patterns:
        return []
    if not has_obey_precision(trt):
        raise Unsupported(f"this TensorRT ({getattr(trt, '__version__', '?')}) has no "
                          f"BuilderFlag.OBEY_PRECISION_CONSTRAINTS to pin layers in {precision}; "
                          f"use precision=int8_qdq")
    dtype = {"fp16": trt.DataType.HALF, "int8": trt.DataType.INT8}[precision]
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    pinned = []
    for layer in map(network.get_layer, range(network.num_layers)):
        if (any(fnmatchcase(layer.name, p) for p in patterns) and not any(fnmatchcase(layer.name, p) for p in unless)
                and all(layer.get_output(j).dtype in floats for j in range(layer.num_outputs))):
            layer.precision = dtype
            for j in range(layer.num_outputs) if float_out else ():
                layer.set_output_type(j, trt.DataType.HALF)
            pinned.append(layer.name)
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return pinned


def set_half_input(trt, network, strongly_typed: bool) -> str:
    """The network's input tensor in fp16, so the engine reads half where a letterbox writes it (a weakly typed
    network; TensorRT converts it inside). Returns the input's name. Unsupported on a strongly typed network, whose
    input type is the ONNX's."""
    if strongly_typed:
        raise Unsupported("backend.half_input: a strongly typed network takes its input type from the ONNX; use "
                          "precision.fp16_mode=builder_flag or backend.half_input=false")
    tensor = network.get_input(0)
    tensor.dtype = trt.DataType.HALF
    return tensor.name


def set_int8_input(trt, network) -> tuple[str, float] | None:
    """The network's input tensor in int8, in the linear layout the letterbox writes, at the dynamic range the
    calibration set on it (implicit INT8; the letterbox quantizes at the same range). Returns (its name, its range);
    None, the input left as it is, where it has no range (the layers reading it are kept in float). Unsupported where
    the version has no implicit INT8."""
    if not has_implicit_int8(trt):
        raise Unsupported(CALIBRATION_REMOVED.format(version=getattr(trt, "__version__", "?")))
    tensor = network.get_input(0)
    if tensor.dynamic_range is None:
        return None
    tensor.dtype = trt.DataType.INT8
    tensor.allowed_formats = 1 << int(trt.TensorFormat.LINEAR)
    return tensor.name, float(max(abs(r) for r in tensor.dynamic_range))


def set_half_outputs(trt, network) -> list[str]:
    """Every float output of a weakly typed network in fp16, so its last layers write half instead of converting to
    float. Returns their names."""
    names = []
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        if tensor.dtype == trt.DataType.FLOAT:
            tensor.dtype = trt.DataType.HALF
            names.append(tensor.name)
    return names


def set_dynamic_ranges(trt, network, config, ranges: dict[str, float]) -> int:
    """Implicit INT8 from ranges calibrated elsewhere: the INT8 (and FP16) flags, and each float tensor named in
    `ranges` (the network's input and the layers' outputs, named after the ONNX's tensors) given the symmetric
    dynamic range [-r, r]; a tensor without one stays float. Returns how many were set. Unsupported on 11.x, which
    removed implicit INT8."""
    if not has_implicit_int8(trt):
        raise Unsupported(CALIBRATION_REMOVED.format(version=getattr(trt, "__version__", "?")))
    enable_int8_flags(trt, config)
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [layer.get_output(j) for layer in map(network.get_layer, range(network.num_layers))
                for j in range(layer.num_outputs)]
    ranged = 0
    for tensor in tensors:
        if ranges.get(tensor.name, 0) > 0 and tensor.dtype in floats:
            tensor.set_dynamic_range(-ranges[tensor.name], ranges[tensor.name])
            ranged += 1
    return ranged


def enable_int8_calibration(trt, config, calibrator, profile) -> None:
    """Implicit INT8: the flags, the calibrator, and the profile whose opt shape the batches have."""
    enable_int8_flags(trt, config)
    config.int8_calibrator = calibrator
    config.set_calibration_profile(profile)


def set_optimization_level(config, level: int | None) -> int:
    """Set ``config.builder_optimization_level`` (8.6, 10.x, 11.x; default 3) and return the effective value.

    None keeps TensorRT's default. Raises Unsupported on a TensorRT older than 8.6 (no such attribute).
    """
    if not hasattr(config, "builder_optimization_level"):
        raise Unsupported("this TensorRT has no builder_optimization_level (TensorRT >= 8.6 needed)")
    if level is not None:
        config.builder_optimization_level = int(level)
    return int(config.builder_optimization_level)


def set_workspace(config, nbytes: int) -> None:
    """Workspace limit via set_memory_pool_limit(MemoryPoolType.WORKSPACE) (8.6, 10.x, 11.x alike;
    the older ``max_workspace_size`` is gone since 10.x)."""
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(nbytes))


def layer_profiler(trt, record):
    """A trt.IProfiler that calls `record(layer_name, ms)` for each layer of each run it is told of (8.6, 10.x,
    11.x alike: the subclass calls the base __init__ and overrides `report_layer_time`)."""
    class Profiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):
            record(layer_name, ms)

    return Profiler()


def attach_profiler(context, profiler) -> None:
    """`profiler` on the execution `context`, each enqueue reporting to it: `enqueue_emits_profile` on where the
    context has the switch (8.6, 10.x, 11.x; off, only `report_to_profiler` would report). It stays: TensorRT 8.6
    refuses a null profiler ("Parameter check failed ... (profiler) != nullptr"), so a profiled context is
    thrown away after its profiled runs."""
    if hasattr(context, "enqueue_emits_profile"):
        context.enqueue_emits_profile = True
    context.profiler = profiler


_NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,  # 10.x+
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def dtype_to_numpy(trt, dtype) -> np.dtype:
    """numpy dtype of a trt.DataType. Members missing from the installed TensorRT (INT64 on 8.6) are
    skipped; BF16 (10.x+), FP8 and INT4 have no numpy dtype and raise TypeError."""
    for name, np_type in _NUMPY_DTYPES.items():
        member = getattr(trt.DataType, name, None)
        if member is not None and dtype == member:
            return np.dtype(np_type)
    raise TypeError(f"TensorRT dtype {dtype} has no numpy equivalent")


_LOGGER = None


def get_logger():
    """The process-wide TensorRT logger (one instance: TensorRT keeps the first logger it is given).

    Between ``start()`` and ``stop()`` it records INFO and above as (severity, message); otherwise it logs
    WARNING and above to the ``tensorrt`` logger (in a variant's child process: to the job's log, not the
    console; see runner.isolate). ``last_error`` keeps the latest error message either way.
    """
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        severity = trt.ILogger.Severity

        class RecordingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.records: list[tuple[str, str]] | None = None
                self.last_error = ""

            def log(self, sev, msg):
                name = str(sev).rsplit(".", 1)[-1]
                if sev in (severity.ERROR, severity.INTERNAL_ERROR):
                    self.last_error = msg
                if self.records is not None:
                    if sev != severity.VERBOSE:
                        self.records.append((name, msg))
                elif sev not in (severity.VERBOSE, severity.INFO):
                    level = logging.WARNING if sev == severity.WARNING else logging.ERROR
                    logging.getLogger("tensorrt").log(level, msg)

            def start(self) -> None:
                self.records = []

            def stop(self) -> list[str]:
                """Stop recording; return the recorded lines."""
                lines = [f"[{name}] {msg}" for name, msg in self.records or []]
                self.records = None
                return lines

            def errors(self, since: int = 0) -> list[str]:
                """Recorded ERROR / INTERNAL_ERROR messages, from record index ``since`` on."""
                return [m for n, m in (self.records or [])[since:] if n in ("ERROR", "INTERNAL_ERROR")]

        _LOGGER = RecordingLogger()
    return _LOGGER
