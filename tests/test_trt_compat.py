"""CPU tests of the TensorRT glue. TensorRT cannot run here, so the capability gates are fed
SimpleNamespace stand-ins that expose or lack the attributes TensorRT 8.6 / 10.x / 11.x differ in."""
import enum
import json
import struct
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest

from runner import backends, bench
from runner.backends.tensorrt import compat as trt_compat
from runner.backends.tensorrt.build import (BuildSpec, build_engine, cache_key, calibration_cache_path, heartbeat,
                                            timing_cache_path)
from runner.backends.tensorrt.engine_export import observed_builder
from runner.backends.tensorrt.runtime import CudaGraphs, TrtRunner, load_plan

# Stand-ins for the parts of the tensorrt module the gates look at.
class Entropy2:
    """Stand-ins for TensorRT's calibrator base classes (8.6, 10.x)."""


class MinMax:
    pass


TRT86 = NS(
    __version__="8.6.0",
    BuilderFlag=NS(FP16="FP16", INT8="INT8"),
    IInt8EntropyCalibrator2=Entropy2, IInt8MinMaxCalibrator=MinMax,
    NetworkDefinitionCreationFlag=NS(EXPLICIT_BATCH=0),
    DataType=NS(FLOAT="f", HALF="h", INT8="i8", INT32="i32", BOOL="b", UINT8="u8", FP8="fp8"),
)
TRT10 = NS(
    __version__="10.9.0",
    BuilderFlag=NS(FP16="FP16", INT8="INT8"),
    IInt8EntropyCalibrator2=Entropy2, IInt8MinMaxCalibrator=MinMax,
    NetworkDefinitionCreationFlag=NS(EXPLICIT_BATCH=0, STRONGLY_TYPED=5),
    DataType=NS(FLOAT="f", HALF="h", INT64="i64", BF16="bf16"),
)
TRT11 = NS(
    __version__="11.0.0",
    BuilderFlag=NS(),
    NetworkDefinitionCreationFlag=NS(STRONGLY_TYPED=5),
    DataType=NS(FLOAT="f", HALF="h"),
)


def test_network_flags_per_version():
    assert trt_compat.network_flags(TRT86, strongly_typed=False) == 1  # EXPLICIT_BATCH needed
    assert trt_compat.network_flags(TRT10, strongly_typed=True) == 1 | 1 << 5
    assert trt_compat.network_flags(TRT11, strongly_typed=True) == 1 << 5  # EXPLICIT_BATCH removed
    assert trt_compat.network_flags(TRT11, strongly_typed=False) == 0


def test_strongly_typed_unsupported_on_86_names_the_fix():
    with pytest.raises(trt_compat.Unsupported, match="no strongly typed networks.*fp16_mode=builder_flag"):
        trt_compat.network_flags(TRT86, strongly_typed=True)


def test_fp16_gates_and_auto_resolution():
    assert [trt_compat.has_builder_fp16_flag(t) for t in (TRT86, TRT10, TRT11)] == [True, True, False]
    assert [trt_compat.has_strongly_typed(t) for t in (TRT86, TRT10, TRT11)] == [False, True, True]
    assert trt_compat.resolve_fp16_mode(TRT86, "auto") == "builder_flag"
    assert trt_compat.resolve_fp16_mode(TRT10, "auto") == "builder_flag"
    assert trt_compat.resolve_fp16_mode(TRT11, "auto") == "strongly_typed"
    assert trt_compat.resolve_fp16_mode(TRT11, "builder_flag") == "builder_flag"  # explicit wins
    with pytest.raises(ValueError):
        trt_compat.resolve_fp16_mode(TRT10, "fp16")


class RecordingConfig:
    """A builder config stand-in that records what is set on it."""

    def __init__(self):
        self.flags, self.int8_calibrator, self.calibration_profile = [], None, None

    def set_flag(self, flag):
        self.flags.append(flag)

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile


def test_int8_gates_per_version():
    assert [trt_compat.has_implicit_int8(t) for t in (TRT86, TRT10, TRT11)] == [True, True, False]
    assert [trt_compat.qdq_strongly_typed(t) for t in (TRT86, TRT10, TRT11)] == [False, False, True]
    assert [trt_compat.resolve_int8_mode(t, "auto") for t in (TRT86, TRT10, TRT11)] == ["calibrator", "calibrator",
                                                                                         "qdq"]
    assert trt_compat.resolve_int8_mode(TRT11, "calibrator") == "calibrator"  # explicit wins: the build says no
    with pytest.raises(ValueError, match="int8_mode"):
        trt_compat.resolve_int8_mode(TRT10, "ptq")


def test_calibrators_on_86_and_10_and_one_line_on_11():
    assert trt_compat.calibrator_base(TRT86, "entropy2") is Entropy2
    assert trt_compat.calibrator_base(TRT10, "minmax") is MinMax
    with pytest.raises(trt_compat.Unsupported) as removed:
        trt_compat.calibrator_base(TRT11, "entropy2")
    assert str(removed.value) == ("TensorRT 11.0.0 removed implicit INT8 calibration (IInt8Calibrator, "
                                  "BuilderFlag.INT8): use precision=int8_qdq, an explicitly quantized ONNX")


class StandInTensor:
    def __init__(self, name: str, dtype: str = "f"):
        self.name, self.dtype, self.dynamic_range = name, dtype, None

    def set_dynamic_range(self, low: float, high: float) -> bool:
        self.dynamic_range = (low, high)
        return True


def test_dynamic_ranges_go_on_the_named_float_tensors_with_int8_and_fp16_allowed():
    images, conv, shape, decode = (StandInTensor("images"), StandInTensor("/model.0/conv/Conv_output_0"),
                                   StandInTensor("/model.22/Shape_output_0", "i32"), StandInTensor("/model.22/Sub"))
    layers = [NS(num_outputs=1, get_output=[t].__getitem__) for t in (conv, shape, decode)]
    network = NS(num_inputs=1, get_input=[images].__getitem__, num_layers=3, get_layer=layers.__getitem__)
    config = RecordingConfig()
    ranges = {"images": 1.0, conv.name: 4.5, shape.name: 9.0}
    assert trt_compat.set_dynamic_ranges(TRT86, network, config, ranges) == 2
    assert [t.dynamic_range for t in (images, conv, shape, decode)] == [(-1.0, 1.0), (-4.5, 4.5), None, None]
    assert config.flags == ["INT8", "FP16"] and config.int8_calibrator is None
    with pytest.raises(trt_compat.Unsupported, match="11.0.0 removed implicit INT8"):
        trt_compat.set_dynamic_ranges(TRT11, network, config, ranges)


class StandInLayer:
    def __init__(self, name: str, dtype: str = "f"):
        self.name, self.num_outputs, self.precision, self.dtype, self.output_types = name, 1, None, dtype, {}

    def get_output(self, i):
        return NS(dtype=self.dtype)

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


TRT86_OBEY = NS(**{**vars(TRT86), "BuilderFlag": NS(FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY")})


def test_keep_float_pins_the_matching_float_layers_to_fp16_with_constraints_obeyed():
    layers = [StandInLayer("/model.22/cv2.0/cv2.0.2/Conv"), StandInLayer("/model.22/cv2.0/cv2.0.1/conv/Conv"),
              StandInLayer("/model.22/dfl/Softmax"), StandInLayer("/model.22/dfl/Shape", "i32"),
              StandInLayer("/model.2/m.0/Add")]
    network, config = NS(num_layers=len(layers), get_layer=layers.__getitem__), RecordingConfig()
    pinned = trt_compat.pin_layers(TRT86_OBEY, network, config, ["*cv2.*.2/Conv", "*/dfl/*"], "fp16")
    assert pinned == ["/model.22/cv2.0/cv2.0.2/Conv", "/model.22/dfl/Softmax"]  # shape arithmetic keeps int32
    assert [layer.precision for layer in layers] == ["h", None, "h", None, None] and config.flags == ["OBEY"]
    assert trt_compat.pin_layers(TRT86_OBEY, network, RecordingConfig(), [], "fp16") == []
    with pytest.raises(trt_compat.Unsupported, match="11.0.0.*no BuilderFlag.OBEY_PRECISION_CONSTRAINTS"):
        trt_compat.pin_layers(TRT11, network, config, ["*/dfl/*"], "fp16")


def test_pin_int8_pins_the_matching_layers_but_those_kept_in_float():
    layers = [StandInLayer("/model.22/cv2.0/cv2.0.2/Conv"), StandInLayer("/model.2/cv1/conv/Conv"),
              StandInLayer("/model.2/m.0/Add"), StandInLayer("/model.22/dfl/Shape", "i32")]
    network, config = NS(num_layers=len(layers), get_layer=layers.__getitem__), RecordingConfig()
    pinned = trt_compat.pin_layers(TRT86_OBEY, network, config, ["*/Conv", "*/Shape"], "int8", unless=["*cv2.*.2/Conv"])
    assert pinned == ["/model.2/cv1/conv/Conv"] and config.flags == ["OBEY"]
    assert [layer.precision for layer in layers] == [None, "i8", None, None]
    assert not any(layer.output_types for layer in layers)  # their outputs have int8 ranges


def test_pin_int8_float_out_pins_in_int8_with_fp16_outputs():
    layers = [StandInLayer("/model.22/cv2.0/cv2.0.2/Conv"), StandInLayer("/model.22/cv3.0/cv3.0.2/Conv"),
              StandInLayer("/model.22/cv3.0/cv3.0.1/conv/Conv")]
    network, config = NS(num_layers=len(layers), get_layer=layers.__getitem__), RecordingConfig()
    pinned = trt_compat.pin_layers(TRT86_OBEY, network, config, ["*cv2.*.2/Conv", "*cv3.*.2/Conv"], "int8",
                                   float_out=True)
    assert pinned == ["/model.22/cv2.0/cv2.0.2/Conv", "/model.22/cv3.0/cv3.0.2/Conv"] and config.flags == ["OBEY"]
    assert [(layer.precision, layer.output_types) for layer in layers] == [("i8", {0: "h"}), ("i8", {0: "h"}),
                                                                             (None, {})]


def test_int8_calibration_sets_flags_calibrator_and_profile():
    config, calibrator, profile = RecordingConfig(), object(), object()
    trt_compat.enable_int8_calibration(TRT86, config, calibrator, profile)
    assert config.flags == ["INT8", "FP16"]  # fp16 where int8 does not apply
    assert config.int8_calibrator is calibrator and config.calibration_profile is profile


def test_enable_fp16_flag():
    flags = []
    config = NS(set_flag=flags.append)
    trt_compat.enable_fp16_flag(TRT86, config)
    assert flags == ["FP16"]
    with pytest.raises(trt_compat.Unsupported, match="no BuilderFlag.FP16.*strongly_typed"):
        trt_compat.enable_fp16_flag(TRT11, config)


def test_set_optimization_level():
    config = NS(builder_optimization_level=3)
    assert trt_compat.set_optimization_level(config, None) == 3
    assert trt_compat.set_optimization_level(config, 0) == 0
    assert config.builder_optimization_level == 0
    with pytest.raises(trt_compat.Unsupported):
        trt_compat.set_optimization_level(NS(), 2)


@pytest.mark.parametrize("emits", [True, False])
def test_a_profiler_attached_is_reported_to_on_every_enqueue(emits):
    """`emits`: the context has the `enqueue_emits_profile` switch (8.6, 10.x, 11.x), off until profiling."""
    context, profiler = NS(profiler=None), object()
    if emits:
        context.enqueue_emits_profile = False
    trt_compat.attach_profiler(context, profiler)
    assert context.profiler is profiler and getattr(context, "enqueue_emits_profile", True) is True


def test_the_layer_profiler_reports_each_layer_to_its_caller():
    class IProfiler:  # TensorRT's base: the subclass must call its __init__
        def __init__(self):
            self.base_initialised = True

    reported = []
    profiler = trt_compat.layer_profiler(NS(IProfiler=IProfiler), lambda name, ms: reported.append((name, ms)))
    profiler.report_layer_time("/model.0/conv/Conv", 0.25)
    assert profiler.base_initialised and reported == [("/model.0/conv/Conv", 0.25)]


def test_dtype_to_numpy():
    assert trt_compat.dtype_to_numpy(TRT86, "f") == np.float32
    assert trt_compat.dtype_to_numpy(TRT86, "h") == np.float16
    assert trt_compat.dtype_to_numpy(TRT10, "i64") == np.int64
    with pytest.raises(TypeError):
        trt_compat.dtype_to_numpy(TRT10, TRT10.DataType.BF16)
    with pytest.raises(TypeError):
        trt_compat.dtype_to_numpy(TRT86, TRT86.DataType.FP8)


def test_cuda_call_unpacks_and_raises_with_error_name():
    class Err(int):
        name = "cudaErrorMemoryAllocation"

    def cudaMalloc(n):  # noqa: N802 - mirrors the cuda-python name in the message
        return (Err(2), None) if n > 10 else (0, 1234)

    assert trt_compat.cuda_call(cudaMalloc, 4) == 1234
    assert trt_compat.cuda_call(lambda: (0,)) is None
    assert trt_compat.cuda_call(lambda: (0, 5, 6)) == (5, 6)
    with pytest.raises(RuntimeError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        trt_compat.cuda_call(cudaMalloc, 11)


def test_load_plan_with_ultralytics_header(tmp_path):
    meta = {"imgsz": [640, 640], "names": {"0": "circle"}, "batch": 1}
    header = json.dumps(meta).encode()
    path = tmp_path / "model.engine"
    path.write_bytes(struct.pack("<i", len(header)) + header + b"\x00PLAN\xff")
    assert load_plan(str(path)) == (b"\x00PLAN\xff", meta)


def test_load_plan_plain(tmp_path):
    plain = bytes(range(256)) * 4
    (tmp_path / "a.plan").write_bytes(plain)
    assert load_plan(str(tmp_path / "a.plan")) == (plain, None)
    # plausible length prefix but not JSON: still a plain plan
    fake = struct.pack("<i", 6) + b"ftrt\x01\x02" + b"rest"
    (tmp_path / "b.plan").write_bytes(fake)
    assert load_plan(str(tmp_path / "b.plan")) == (fake, None)


def _spec(tmp_path, **kw):
    onnx = tmp_path / "m.onnx"
    if not onnx.exists():
        onnx.write_bytes(b"onnx-bytes")
    base = dict(
        onnx_path=str(onnx), precision="fp16", mechanism="builder_flag", min_shape=[1, 3, 320, 320],
        opt_shape=[1, 3, 640, 640], max_shape=[4, 3, 640, 640], optimization_level=3, workspace_gib=4.0,
        cache_dir=str(tmp_path / "cache"),
    )
    return BuildSpec(**{**base, **kw})


def test_cache_key_stable_and_sensitive(tmp_path):
    key = cache_key(_spec(tmp_path), "8.6.0", "NVIDIA H100")
    assert len(key) == 64
    assert cache_key(_spec(tmp_path), "8.6.0", "NVIDIA H100") == key
    # not build-relevant: where caches live, whether they are used
    assert cache_key(_spec(tmp_path, cache_dir="/elsewhere", use_engine_cache=False), "8.6.0", "NVIDIA H100") == key
    changed = [
        cache_key(_spec(tmp_path, optimization_level=0), "8.6.0", "NVIDIA H100"),
        cache_key(_spec(tmp_path, max_shape=[8, 3, 640, 640]), "8.6.0", "NVIDIA H100"),
        cache_key(_spec(tmp_path, mechanism="strongly_typed"), "8.6.0", "NVIDIA H100"),
        cache_key(_spec(tmp_path, precision="fp32", mechanism="none"), "8.6.0", "NVIDIA H100"),
        cache_key(_spec(tmp_path, precision="int8", mechanism="qdq"), "8.6.0", "NVIDIA H100"),
        cache_key(int8_spec(tmp_path, "entropy2"), "8.6.0", "NVIDIA H100"),
        cache_key(int8_spec(tmp_path, "minmax"), "8.6.0", "NVIDIA H100"),
        cache_key(int8_spec(tmp_path, "minmax", images=1), "8.6.0", "NVIDIA H100"),
        cache_key(int8_spec(tmp_path, "minmax", keep_float=("*/dfl/*",)), "8.6.0", "NVIDIA H100"),
        cache_key(int8_spec(tmp_path, "minmax", pin_int8=("*/Conv",)), "8.6.0", "NVIDIA H100"),
        cache_key(int8_spec(tmp_path, "minmax", pin_int8_float_out=("*/Conv",)), "8.6.0", "NVIDIA H100"),
        cache_key(_spec(tmp_path, half_input=True), "8.6.0", "NVIDIA H100"),
        cache_key(int8_spec(tmp_path, "percentile", int8_input=True), "8.6.0", "NVIDIA H100"),
        cache_key(_spec(tmp_path), "10.9.0", "NVIDIA H100"),
        cache_key(_spec(tmp_path), "8.6.0", "NVIDIA H200"),
    ]
    assert len({key, *changed}) == 1 + len(changed)
    (tmp_path / "m.onnx").write_bytes(b"other-onnx-bytes")
    assert cache_key(_spec(tmp_path), "8.6.0", "NVIDIA H100") != key


def int8_spec(tmp_path, calibrator: str, images: int = 2, keep_float: tuple[str, ...] = (), **settings) -> BuildSpec:
    """An implicitly calibrated int8 spec over `images` generated pictures (`settings`: pins, input types)."""
    import cv2

    from runner.quantize import CalibrationSet
    from runner.synthetic import make_image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(images):
        paths.append(tmp_path / f"calib{i}.jpg")
        cv2.imwrite(str(paths[-1]), make_image(rng)[0])
    return _spec(tmp_path, precision="int8", mechanism="calibrator", calibrator=calibrator, keep_float=keep_float,
                 calibration=CalibrationSet(tuple(paths), (1, 3, 640, 640)), **settings)


def test_calibration_cache_is_keyed_like_the_engine(tmp_path):
    base = calibration_cache_path(int8_spec(tmp_path, "entropy2"), "10.9.0", "g")
    assert base.parent == tmp_path / "cache" / "calibration" and base.suffix == ".cache"
    assert calibration_cache_path(int8_spec(tmp_path, "entropy2"), "10.9.0", "g") == base
    others = {calibration_cache_path(int8_spec(tmp_path, "minmax"), "10.9.0", "g"),
              calibration_cache_path(int8_spec(tmp_path, "entropy2", images=1), "10.9.0", "g"),
              calibration_cache_path(int8_spec(tmp_path, "entropy2"), "8.6.0", "g"),
              calibration_cache_path(int8_spec(tmp_path, "entropy2"), "10.9.0", "h")}
    assert base not in others and len(others) == 4


def test_timing_cache_path_slug(tmp_path):
    path = timing_cache_path(str(tmp_path), "NVIDIA H100 80GB HBM3", "8.6.0")
    assert path == tmp_path / "timing" / "nvidia-h100-80gb-hbm3_trt8.6.0.cache"


def test_build_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="precision 'int8' with mechanism 'builder_flag'"):
        build_engine(_spec(tmp_path, precision="int8"))
    with pytest.raises(ValueError, match="mechanism 'auto'"):
        build_engine(_spec(tmp_path, mechanism="auto"))
    with pytest.raises(ValueError, match="needs calibration images"):
        build_engine(_spec(tmp_path, precision="int8", mechanism="calibrator"))
    with pytest.raises(ValueError, match="half_input with mechanism 'none'"):
        build_engine(_spec(tmp_path, precision="fp32", mechanism="none", half_input=True))
    with pytest.raises(ValueError, match="int8_input with mechanism 'calibrator' .entropy2."):
        build_engine(int8_spec(tmp_path, "entropy2", int8_input=True))
    with pytest.raises(ValueError, match="int8_input with mechanism 'calibrator' .percentile., half_input True"):
        build_engine(int8_spec(tmp_path, "percentile", int8_input=True, half_input=True))


def test_half_input_sets_the_network_input_to_fp16_or_says_why_not():
    tensor = NS(name="images", dtype=TRT86.DataType.FLOAT)
    network = NS(get_input=lambda i: tensor)
    assert trt_compat.set_half_input(TRT86, network, strongly_typed=False) == "images"
    assert tensor.dtype == TRT86.DataType.HALF
    with pytest.raises(trt_compat.Unsupported, match="strongly typed network takes its input type from the ONNX"):
        trt_compat.set_half_input(TRT11, network, strongly_typed=True)


def test_int8_input_takes_the_inputs_range_and_needs_implicit_int8():
    """The input in int8, linear, at the range the calibration set on it; left as it is where it has none (the layers
    reading it kept in float); refused where the version removed implicit INT8."""
    trt = NS(**{**vars(TRT86), "TensorFormat": NS(LINEAR=0)})
    ranged = NS(name="images", dtype=trt.DataType.FLOAT, dynamic_range=(-0.98, 0.98), allowed_formats=0b111)
    assert trt_compat.set_int8_input(trt, NS(get_input=lambda i: ranged)) == ("images", 0.98)
    assert (ranged.dtype, ranged.allowed_formats) == (trt.DataType.INT8, 1)
    unranged = NS(name="images", dtype=trt.DataType.FLOAT, dynamic_range=None, allowed_formats=0b111)
    assert trt_compat.set_int8_input(trt, NS(get_input=lambda i: unranged)) is None
    assert (unranged.dtype, unranged.allowed_formats) == (trt.DataType.FLOAT, 0b111)
    with pytest.raises(trt_compat.Unsupported, match="removed implicit INT8"):
        trt_compat.set_int8_input(TRT11, NS(get_input=lambda i: ranged))


def test_half_outputs_set_every_float_output_to_fp16():
    outputs = [NS(name="box0", dtype=TRT86.DataType.FLOAT), NS(name="count", dtype=TRT86.DataType.INT32),
               NS(name="cls0", dtype=TRT86.DataType.HALF), NS(name="cls1", dtype=TRT86.DataType.FLOAT)]
    network = NS(num_outputs=len(outputs), get_output=outputs.__getitem__)
    assert trt_compat.set_half_outputs(TRT86, network) == ["box0", "cls1"]
    assert [t.dtype for t in outputs] == [TRT86.DataType.HALF, TRT86.DataType.INT32, TRT86.DataType.HALF,
                                          TRT86.DataType.HALF]


@pytest.mark.skipif(trt_compat.trt_available()[0], reason="tensorrt is installed here")
def test_tensorrt_backend_says_why_it_cannot_run():
    assert backends.get("tensorrt").unavailable() == "tensorrt is not installed (pip install 'runner[gpu]')"


@pytest.mark.skipif(trt_compat.trt_available()[0], reason="tensorrt is installed here")
def test_trt_available_reason_without_tensorrt():
    assert trt_compat.trt_available() == (False, "tensorrt is not installed (pip install 'runner[gpu]')")


def test_heartbeat_reports_a_long_step_and_stops(caplog):
    import time

    caplog.set_level("INFO", logger="runner.backends.tensorrt.build")
    with heartbeat("still building", every_s=0.05):
        time.sleep(0.3)
    count = len(caplog.messages)
    time.sleep(0.15)
    assert count >= 2 and all(m.startswith("build: still building") for m in caplog.messages)
    assert len(caplog.messages) == count  # silent once the step is over


class StandInBuilder:
    """The parts of tensorrt.Builder that ultralytics' onnx2engine uses, recording what it was given."""

    def __init__(self, logger):
        self.logger = logger

    def create_builder_config(self):
        flags = set()
        return NS(builder_optimization_level=3, flags=flags, set_flag=flags.add, get_flag=flags.__contains__)

    def build_serialized_network(self, network, config):
        return b"plan"


def test_observed_builder_sets_the_level_uses_our_logger_and_records_the_build():
    trt = NS(Builder=StandInBuilder, BuilderFlag=NS(FP16="FP16", TF32="TF32"))
    ours = object()
    with observed_builder(trt, ours, level=0) as seen:
        builder = trt.Builder("ultralytics' logger")  # what ultralytics does, with the module it imported
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        assert builder.build_serialized_network("network", config) == b"plan"
    assert builder.logger is ours and config.builder_optimization_level == 0
    assert seen == [{"optimization_level": 0, "fp16": True, "tf32": False}]
    assert trt.Builder is StandInBuilder  # restored


def test_observed_builder_keeps_the_default_level_and_restores_on_error():
    trt = NS(Builder=StandInBuilder, BuilderFlag=NS(TF32="TF32"))  # 11.x: no BuilderFlag.FP16
    with pytest.raises(RuntimeError, match="export failed"):
        with observed_builder(trt, object(), level=None) as seen:
            builder = trt.Builder(None)
            config = builder.create_builder_config()
            config.set_flag("TF32")
            builder.build_serialized_network("network", config)
            raise RuntimeError("export failed")
    assert seen == [{"optimization_level": 3, "fp16": False, "tf32": True}]
    assert trt.Builder is StandInBuilder


class StandInContext:
    """An execution context as TensorRT 8.6 makes them: on a dynamic engine the first one has profile 0 and later
    ones none (-1) until they select one no other context uses; enqueueing without a profile fails (TensorRT's
    `enqueueV3 ... mOptimizationProfile >= 0`)."""

    def __init__(self, engine, profile: int):
        self.engine, self.profile, self.shape, self.enqueued = engine, profile, None, 0

    def set_optimization_profile_async(self, index, stream):
        taken = {c.profile for c in self.engine.contexts if c is not self}
        if index >= self.engine.num_optimization_profiles or index in taken:
            return False
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shape

    def set_tensor_address(self, name, address):
        return True

    def execute_async_v3(self, stream):
        if self.profile < 0:
            self.engine.logger.last_error = "IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime " \
                                            "(mOptimizationProfile >= 0 failed)"
            return False
        self.enqueued += 1
        return True


class StandInEngine:
    def __init__(self, input_shape, profiles: int):
        self.input_shape, self.num_optimization_profiles = input_shape, profiles
        self.contexts, self.logger = [], NS(last_error="")

    def get_tensor_shape(self, name):
        return self.input_shape

    def create_execution_context(self):
        dynamic = -1 in self.input_shape
        self.contexts.append(StandInContext(self, -1 if dynamic and self.contexts else 0))
        return self.contexts[-1]


def _stand_in_runner(engine: StandInEngine, graphs: bool = False) -> TrtRunner:
    """A TrtRunner opened on `engine`, with cuda-python calls that succeed (a stream is an int); `rt.launched`
    counts CUDA graph replays."""
    runner = TrtRunner("engine.plan")
    ok = lambda *args: (0, 1)  # noqa: E731 - (cudaSuccess, handle)
    launched = []
    runner.rt = NS(cudaMalloc=ok, cudaFree=ok, cudaStreamCreate=ok, cudaStreamSynchronize=ok, cudaStreamDestroy=ok,
                   cudaStreamBeginCapture=ok, cudaStreamEndCapture=ok, cudaGraphInstantiate=ok,
                   cudaGraphExecDestroy=ok, cudaGraphDestroy=ok, cudaStreamCaptureMode=NS(cudaStreamCaptureModeGlobal=0),
                   cudaGraphLaunch=lambda *args: launched.append(args) or (0,), launched=launched)
    runner.engine, runner.logger = engine, engine.logger
    runner.graphs = CudaGraphs(runner.rt, 0, wanted=graphs)
    runner._context = engine.create_execution_context()
    runner.input_name, runner.dtypes = "images", {"images": np.dtype(np.float32), "output0": np.dtype(np.float32)}
    return runner


@pytest.mark.parametrize("input_shape, profiles, note", [
    ((-1, 3, -1, -1), 1, "batch1_2streams: 2 streams on a dynamic engine need 2 optimization profiles (one per "
                         "execution context); this engine has 1"),
    ((-1, 3, -1, -1), 2, None),  # the second context selects profile 1
    ((1, 3, 640, 640), 1, None),  # a static engine's contexts share its profile
])
def test_two_stream_throughput_gives_each_dynamic_context_a_profile_or_says_why_not(input_shape, profiles, note):
    engine = StandInEngine(input_shape, profiles)
    figures, said = bench.throughput(_stand_in_runner(engine), [1, 3, 640, 640], iters=10)
    assert said == note
    assert set(figures) == ({"opt_batch"} if note else {"opt_batch", "batch1_2streams"})
    assert [c.profile for c in engine.contexts] == ([0] if note else [0, 1] if -1 in input_shape else [0, 0])


@pytest.mark.parametrize("graphs", [False, True])
def test_throughput_lanes_replay_cuda_graphs_where_the_runner_does(graphs):
    engine = StandInEngine((1, 3, 640, 640), 1)
    runner = _stand_in_runner(engine, graphs)
    assert bench.images_per_second(runner, (1, 3, 640, 640), 2, iters=20) > 0
    rounds = 20 + 3  # and MIN_WARMUP more that warm up
    # with graphs: each lane's first run plain, its second captured, the rest replayed
    assert [c.enqueued for c in engine.contexts] == ([2, 2] if graphs else [rounds, rounds])
    assert len(runner.rt.launched) == (2 * (rounds - 1) if graphs else 0)


def test_tensorrt_logger_logs_to_the_tensorrt_logger_not_stderr(monkeypatch, caplog, capfd):
    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self):
            pass

    monkeypatch.setitem(sys.modules, "tensorrt", NS(ILogger=ILogger))
    monkeypatch.setattr(trt_compat, "_LOGGER", None)
    logger = trt_compat.get_logger()
    for severity in ILogger.Severity:
        logger.log(severity, f"a {severity.name} line")
    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("tensorrt", "ERROR", "a INTERNAL_ERROR line"), ("tensorrt", "ERROR", "a ERROR line"),
                    ("tensorrt", "WARNING", "a WARNING line")]
    assert logger.last_error == "a ERROR line"
    assert capfd.readouterr().err == ""  # in a variant's child, the job's log takes these (runner.isolate)
