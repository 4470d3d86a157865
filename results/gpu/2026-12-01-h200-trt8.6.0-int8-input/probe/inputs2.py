"""Probe: engine-alone images/s at batch 32 of fp16 and the best int8 engine, with input layouts varied."""
import json
import logging
import math
import sys
from contextlib import contextmanager

import numpy as np
import tensorrt as trt

from runner import backends
from runner.backends.tensorrt import compat
from runner.config import Mechanism
from runner.preflight import compose_variants
from runner.quantize import calibration_set
from runner.variant import export_stage

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
BASE = ["model=yolov8n", "backend=tensorrt", "cache_dir=/tmp/rc", "outputs=/tmp/ro", "shape=dynamic",
        "profile.min=[1,3,640,640]", "profile.opt=[32,3,640,640]", "profile.max=[64,3,640,640]",
        "backend.builder_optimization_level=3", "backend.engine_cache=false", "data.limit=64",
        "hydra.searchpath=[file:///tmp/work/scripts/presets]"]
F = trt.TensorFormat
INPUTS = {"fp16-linear": None, "fp16-hwc8": (trt.DataType.HALF, F.HWC8), "int8-chw4": (trt.DataType.INT8, F.CHW4),
          "int8-linear": (trt.DataType.INT8, F.LINEAR), "int8-chw32": (trt.DataType.INT8, F.CHW32),
          "fp16-chw16": (trt.DataType.HALF, F.CHW16)}
import os
AUX = os.environ.get("AUX")
PLAN = [("fp16", "fp16-linear"), ("int8_pins_conv_m0_fp16_cal64", "int8-linear")] if AUX else [("fp16", "fp16-linear"), ("fp16", "fp16-hwc8"), ("fp16", "fp16-chw16"),
        ("int8_pins_conv_m0_fp16_cal64", "fp16-linear"), ("int8_pins_conv_m0_fp16_cal64", "int8-chw4"),
        ("int8_pins_conv_m0_fp16_cal64", "int8-linear"), ("int8_pins_conv_m0_fp16_cal64", "int8-chw32")]
original = compat.set_half_input
level_original = compat.set_optimization_level


def with_aux(config, level):
    if AUX and AUX != "default":
        config.max_aux_streams = int(AUX)
    return level_original(config, level)


compat.set_optimization_level = with_aux


@contextmanager
def input_as(mode):
    def patched(trt_, network, strongly_typed):
        tensor = network.get_input(0)
        tensor.dtype, fmt = INPUTS[mode]
        tensor.allowed_formats = 1 << int(fmt)
        if tensor.dtype == trt.DataType.INT8:
            tensor.set_dynamic_range(-1.0, 1.0)
        return tensor.name
    compat.set_half_input = original if INPUTS[mode] is None else patched
    try:
        yield
    finally:
        compat.set_half_input = original


def build(precision, mode):
    cfg = compose_variants([*BASE, f"precision={precision}"])[0]
    backend = backends.get("tensorrt")
    cfg, _ = backends.resolve_auto(cfg, backend)
    mechanism = backend.precision_mechanism(cfg)
    export = export_stage(cfg, mechanism, "tensorrt", True)
    calibration = calibration_set(cfg) if mechanism == Mechanism.calibrator else None
    with input_as(mode):
        return backend.build(cfg, export, calibration)


def padded_bytes(engine, context, name):
    shape = list(context.get_tensor_shape(name))
    vdim, comps = engine.get_tensor_vectorized_dim(name), engine.get_tensor_components_per_element(name)
    if vdim >= 0:
        shape[vdim] = -(-shape[vdim] // comps) * comps
    return math.prod(shape) * np.dtype(compat.dtype_to_numpy(trt, engine.get_tensor_dtype(name))).itemsize


class Timed:
    def __init__(self, path):
        rt, self.rt = compat.cudart(), compat.cudart()
        self.runtime = trt.Runtime(compat.get_logger())
        self.engine = self.runtime.deserialize_cuda_engine(open(path, "rb").read())
        self.context = self.engine.create_execution_context()
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        inp = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT][0]
        self.context.set_input_shape(inp, (32, 3, 640, 640))
        self.stream = compat.cuda_call(rt.cudaStreamCreate)
        for n in names:
            ptr = compat.cuda_call(rt.cudaMalloc, padded_bytes(e, self.context, n))
            compat.cuda_call(rt.cudaMemset, ptr, 0, padded_bytes(e, self.context, n))
            self.context.set_tensor_address(n, ptr)
        self.input = {"name": inp, "format": e.get_tensor_format_desc(inp), "dtype": str(e.get_tensor_dtype(inp)),
                      "bytes": padded_bytes(e, self.context, inp)}
        self.context.execute_async_v3(int(self.stream))
        compat.cuda_call(rt.cudaStreamSynchronize, self.stream)
        compat.cuda_call(rt.cudaStreamBeginCapture, self.stream,
                         rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        self.context.execute_async_v3(int(self.stream))
        graph = compat.cuda_call(rt.cudaStreamEndCapture, self.stream)
        self.exe = compat.cuda_call(rt.cudaGraphInstantiate, graph, 0)
        self.start, self.end = compat.cuda_call(rt.cudaEventCreate), compat.cuda_call(rt.cudaEventCreate)

    def img_s(self, runs=300, warm=30):
        rt = self.rt
        for _ in range(warm):
            compat.cuda_call(rt.cudaGraphLaunch, self.exe, self.stream)
        compat.cuda_call(rt.cudaEventRecord, self.start, self.stream)
        for _ in range(runs):
            compat.cuda_call(rt.cudaGraphLaunch, self.exe, self.stream)
        compat.cuda_call(rt.cudaEventRecord, self.end, self.stream)
        compat.cuda_call(rt.cudaEventSynchronize, self.end)
        ms = compat.cuda_call(rt.cudaEventElapsedTime, self.start, self.end) / runs
        return 32 * 1e3 / ms

    def first_layers(self, n=3):
        inspector = self.engine.create_engine_inspector()
        out = []
        for i in range(n):
            info = json.loads(inspector.get_layer_information(i, trt.LayerInformationFormat.JSON), strict=False)
            out.append({k: info.get(k) for k in ("Name", "LayerType", "Inputs", "Outputs", "TacticName")})
        return out


def main():
    only = sys.argv[1:] or None
    engines = {}
    for precision, mode in PLAN:
        label = f"{precision} {mode} aux={AUX}"
        if only and not any(o in label for o in only):
            continue
        try:
            built = build(precision, mode)
            engines[label] = Timed(built.artifact)
            print(f"BUILT {label}: {built.build_s:.0f} s, input {engines[label].input}", flush=True)
            print(json.dumps(engines[label].first_layers(), indent=None)[:3000], flush=True)
        except Exception as exc:
            print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
    rounds = {label: [] for label in engines}
    for r in range(7):
        for label, timed in engines.items():
            rounds[label].append(timed.img_s())
    base = {p: np.median(rounds[f"{p} fp16-linear aux={AUX}"]) for p in ("fp16",) if f"{p} fp16-linear aux={AUX}" in rounds}
    for label, values in rounds.items():
        med = float(np.median(values))
        ratio = f" {med / base['fp16']:.3f}x fp16-linear" if base else ""
        print(f"IMG/S {label}: median {med:.0f} ({' '.join(f'{v:.0f}' for v in values)}){ratio}", flush=True)


main()
