"""Probe (run at commit dc07fe5): engine-alone images/s at batch 32 of engines built through runner's own build with
the network's input, and its outputs, given other types and layouts, and IBuilderConfig.max_aux_streams ($AUX).

    python3 layouts.py PLAN.json    # PLAN: [[label, precision preset, input, [overrides]], ...], the first the base
The input: fp16-linear (runner's fp16 input), fp16-hwc8, fp16-chw16, int8-linear, int8-chw4, int8-chw32; "+vec"
appended lets the outputs take the 2-, 8- or 16-wide layouts too. Each engine: zeroed buffers, one CUDA graph, 30
warm-up and 300 timed replays between CUDA events, seven rounds alternating the engines; the median.
"""
import json
import logging
import math
import os
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
INPUTS = {"fp16-linear": None, "fp16-hwc8": (trt.DataType.HALF, F.HWC8), "fp16-chw16": (trt.DataType.HALF, F.CHW16),
          "int8-linear": (trt.DataType.INT8, F.LINEAR), "int8-chw4": (trt.DataType.INT8, F.CHW4),
          "int8-chw32": (trt.DataType.INT8, F.CHW32)}
VECTORIZED = (1 << int(F.LINEAR)) | (1 << int(F.CHW2)) | (1 << int(F.HWC8)) | (1 << int(F.CHW16))
AUX = os.environ.get("AUX")
set_half_input, set_half_outputs, set_optimization_level = (compat.set_half_input, compat.set_half_outputs,
                                                            compat.set_optimization_level)


def with_aux(config, level):
    if AUX:
        config.max_aux_streams = int(AUX)
    return set_optimization_level(config, level)


def vectorized_outputs(trt_, network):
    names = set_half_outputs(trt_, network)
    for i in range(network.num_outputs):
        network.get_output(i).allowed_formats = VECTORIZED
    return names


@contextmanager
def built_as(mode):
    """runner's build with the input (and outputs) of `mode`."""
    vectorized, mode = mode.endswith("+vec"), mode.removesuffix("+vec")

    def input_of_mode(trt_, network, strongly_typed):
        tensor = network.get_input(0)
        tensor.dtype, layout = INPUTS[mode]
        tensor.allowed_formats = 1 << int(layout)
        if tensor.dtype == trt.DataType.INT8:
            tensor.set_dynamic_range(-1.0, 1.0)
        return tensor.name

    compat.set_half_input = set_half_input if INPUTS[mode] is None else input_of_mode
    compat.set_half_outputs = vectorized_outputs if vectorized else set_half_outputs
    compat.set_optimization_level = with_aux
    try:
        yield
    finally:
        compat.set_half_input, compat.set_half_outputs = set_half_input, set_half_outputs
        compat.set_optimization_level = set_optimization_level


def build(precision, mode, overrides):
    cfg = compose_variants([*BASE, f"precision={precision}", *overrides])[0]
    backend = backends.get("tensorrt")
    cfg, _ = backends.resolve_auto(cfg, backend)
    mechanism = backend.precision_mechanism(cfg)
    export = export_stage(cfg, mechanism, "tensorrt", True)
    calibration = calibration_set(cfg) if mechanism == Mechanism.calibrator else None
    with built_as(mode):
        return backend.build(cfg, export, calibration)


def padded_bytes(engine, context, name):
    shape = list(context.get_tensor_shape(name))
    vdim, comps = engine.get_tensor_vectorized_dim(name), engine.get_tensor_components_per_element(name)
    if vdim >= 0:
        shape[vdim] = -(-shape[vdim] // comps) * comps
    return math.prod(shape) * np.dtype(compat.dtype_to_numpy(trt, engine.get_tensor_dtype(name))).itemsize


class Timed:
    """One engine at batch 32 on zeroed buffers, replayed as a CUDA graph."""

    def __init__(self, path):
        rt = self.rt = compat.cudart()
        self.runtime = trt.Runtime(compat.get_logger())
        self.engine = e = self.runtime.deserialize_cuda_engine(open(path, "rb").read())
        self.context = e.create_execution_context()
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        inp = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT][0]
        self.context.set_input_shape(inp, (32, 3, 640, 640))
        self.stream = compat.cuda_call(rt.cudaStreamCreate)
        for n in names:
            ptr = compat.cuda_call(rt.cudaMalloc, padded_bytes(e, self.context, n))
            compat.cuda_call(rt.cudaMemset, ptr, 0, padded_bytes(e, self.context, n))
            self.context.set_tensor_address(n, ptr)
        self.outputs = [e.get_tensor_format_desc(n) for n in names if n != inp]
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
        return 32 * 1e3 / (compat.cuda_call(rt.cudaEventElapsedTime, self.start, self.end) / runs)

    def first_layers(self, n=3):
        inspector = self.engine.create_engine_inspector()
        layers = [json.loads(inspector.get_layer_information(i, trt.LayerInformationFormat.JSON), strict=False)
                  for i in range(n)]
        return [{k: layer.get(k) for k in ("Name", "LayerType", "Inputs", "Outputs", "TacticName")} for layer in layers]


def main():
    plan = json.loads(open(sys.argv[1]).read())
    engines = {}
    for label, precision, mode, overrides in plan:
        try:
            built = build(precision, mode, overrides)
            engines[label] = Timed(built.artifact)
            print(f"BUILT {label}: {built.build_s:.0f} s, input {engines[label].input}", flush=True)
            print(f"OUTS {label}: {engines[label].outputs}", flush=True)
            print(json.dumps(engines[label].first_layers()), flush=True)
        except Exception as exc:
            print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
    rounds = {label: [] for label in engines}
    for _ in range(7):
        for label, timed in engines.items():
            rounds[label].append(timed.img_s())
    base = float(np.median(rounds[plan[0][0]]))
    for label, values in rounds.items():
        median = float(np.median(values))
        print(f"IMG/S {label}: median {median:.0f} ({' '.join(f'{v:.0f}' for v in values)}) {median / base:.3f}x",
              flush=True)


main()
