"""TensorRT build + runtime on a real GPU, checked against onnxruntime on CPU.

The model is a tiny Conv-Relu-Conv net made with onnx.helper (nothing downloaded, no torch)."""
import concurrent.futures
import json
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import isolate_targets  # tests/ is on sys.path (conftest.py): spawned children import it by name
from runner import forensics
from runner.backends.tensorrt import compat as trt_compat
from runner.backends.tensorrt.build import BuildSpec, build_engine
from runner.backends.tensorrt.runtime import ShapeError, TrtRunner
from runner.isolate import run_isolated
from runner.results import StageError

pytestmark = pytest.mark.gpu
for _ok, _why in (trt_compat.trt_available(), trt_compat.cuda_gpu_available()):
    if not _ok:
        pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=_why)]
        break

STATIC = [1, 3, 64, 64]
DYN_MIN, DYN_OPT, DYN_MAX = [1, 3, 32, 32], [2, 3, 64, 64], [4, 3, 96, 96]


def make_onnx(path, shape, fp16=False):
    """Conv(3->8, 3x3) -> Relu -> Conv(8->4, 1x1) named images -> output0, the nodes /stem/Conv, /stem/Relu and
    /head/Conv; -1 dims become symbolic."""
    rng = np.random.default_rng(0)
    dtype, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(dtype)
    b1 = (rng.standard_normal(8) * 0.1).astype(dtype)
    w2 = (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(dtype)
    dims = [d if d > 0 else name for d, name in zip(shape, ("batch", "c", "height", "width"))]
    out_dims = [dims[0], 4, dims[2], dims[3]]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], "/stem/Conv", pads=[1, 1, 1, 1],
                             kernel_shape=[3, 3]),
            helper.make_node("Relu", ["c1"], ["r1"], "/stem/Relu"),
            helper.make_node("Conv", ["r1", "w2"], ["output0"], "/head/Conv", kernel_shape=[1, 1]),  # weights behind
            #   Q/DQ need it
        ],
        "tiny",
        [helper.make_tensor_value_info("images", elem, dims)],
        [helper.make_tensor_value_info("output0", elem, out_dims)],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by the ONNX parser of TensorRT 8.6
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def ort_run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["output0"], {"images": x})[0]


def spec(onnx_path, cache_dir, lo, opt=None, hi=None, precision="fp32", mechanism="none", **kw):
    return BuildSpec(
        onnx_path=onnx_path, precision=precision, mechanism=mechanism, min_shape=lo,
        opt_shape=opt or lo, max_shape=hi or lo, optimization_level=0, workspace_gib=1.0,
        cache_dir=str(cache_dir), **kw
    )


def build_ok(s):
    res = build_engine(s)
    assert res.artifact and Path(res.artifact).is_file()
    return res


def opened(artifact, **kw) -> TrtRunner:
    runner = TrtRunner(artifact, **kw)
    runner.open()
    return runner


def rand(shape):
    return np.random.default_rng(1).random(shape, dtype=np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {
        "static": make_onnx(d / "static.onnx", STATIC),
        "dynamic": make_onnx(d / "dynamic.onnx", [-1, 3, -1, -1]),
        "static_fp16": make_onnx(d / "static_fp16.onnx", STATIC, fp16=True),
    }


@pytest.fixture(scope="module")
def static_engine(models, tmp_path_factory):
    return build_ok(spec(models["static"], tmp_path_factory.mktemp("cache"), STATIC))


def test_static_fp32_matches_onnxruntime(models, static_engine):
    assert static_engine.precision_mechanism == "none" and static_engine.optimization_level == 0
    assert static_engine.size_bytes > 0 and static_engine.trt_version and static_engine.gpu
    assert static_engine.profile == [STATIC] * 3 and static_engine.tf32 is False
    log = open(static_engine.log_path).read()
    assert "[INFO]" in log or "[WARNING]" in log
    if static_engine.layers_path:
        layers = json.load(open(static_engine.layers_path))
        assert len(layers["Layers"]) == static_engine.num_layers > 0
    x = rand(STATIC)
    with TrtRunner(static_engine.artifact) as runner:
        assert runner.input_name == "images" and runner.input_dtype == np.float32
        assert runner.profile == (tuple(STATIC),) * 3
        out = runner.infer(x)["output0"]
    np.testing.assert_allclose(out, ort_run(models["static"], x), atol=1e-3)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_layer_times_name_every_profiled_layer_of_the_inspector_and_leave_the_runner_as_it_was(
        models, tmp_path, cuda_graph):
    engine = build_ok(spec(models["dynamic"], tmp_path, DYN_MIN, DYN_OPT, DYN_MAX))
    inspected = {layer["Name"] for layer in forensics.read_layers(engine.layers_path)}
    x = rand(DYN_OPT)
    with TrtRunner(engine.artifact, cuda_graph=cuda_graph) as runner:
        before = runner.infer(x)["output0"]
        times = runner.layer_times(tuple(DYN_OPT), 20)
        assert times and set(times) <= inspected and all(ms > 0 for ms in times.values())
        assert runner._context.profiler is None  # a new context: the runs after are not profiled
        at_shape = runner.layer_info(tuple(DYN_OPT))  # as bench reads it: the build's JSON has no formats
        runner.set_shape(tuple(DYN_OPT))
        for _ in range(3):  # replays where graphs are on: captured after the profiler left
            runner.h2d(x)
            assert runner.execute() > 0
        np.testing.assert_allclose(runner.d2h()["output0"], before, atol=1e-5)
        assert runner.graphs.on == cuda_graph
    assert {layer["Name"] for layer in at_shape} == inspected
    profile = forensics.join(at_shape, times, DYN_OPT, 20)
    precisions = profile.by("precision")
    assert profile.unmatched == 0 and profile.total_ms > 0 and "fp32" in precisions and "unknown" not in precisions


def test_dynamic_profile_shapes(models, tmp_path):
    res = build_ok(spec(models["dynamic"], tmp_path, DYN_MIN, DYN_OPT, DYN_MAX))
    assert res.profile == [DYN_MIN, DYN_OPT, DYN_MAX]  # read back from the engine
    with TrtRunner(res.artifact) as runner:
        assert runner.profile == (tuple(DYN_MIN), tuple(DYN_OPT), tuple(DYN_MAX))
        for shape in (DYN_MIN, DYN_OPT, DYN_MAX, [3, 3, 48, 80]):
            x = rand(shape)
            out = runner.infer(x)["output0"]
            assert out.shape == (shape[0], 4, shape[2], shape[3])
            np.testing.assert_allclose(out, ort_run(models["dynamic"], x), atol=1e-3)


def test_fp16_builder_flag(models, tmp_path):
    import tensorrt as trt

    if not trt_compat.has_builder_fp16_flag(trt):
        pytest.skip(f"TensorRT {trt.__version__} has no BuilderFlag.FP16")
    res = build_ok(spec(models["static"], tmp_path, STATIC, precision="fp16", mechanism="builder_flag"))
    assert res.precision_mechanism == "builder_flag"
    x = rand(STATIC)
    with TrtRunner(res.artifact) as runner:
        assert runner.input_dtype == np.float32  # the flag keeps the ONNX's fp32 I/O
        out = runner.infer(x)["output0"]
    np.testing.assert_allclose(out, ort_run(models["static"], x), atol=5e-2)


def test_fp16_strongly_typed(models, tmp_path):
    """Builds an fp16-I/O engine where the TensorRT has strongly typed networks; on 8.6, a clear failure."""
    import tensorrt as trt

    s = spec(models["static_fp16"], tmp_path, STATIC, precision="fp16", mechanism="strongly_typed")
    if not trt_compat.has_strongly_typed(trt):
        with pytest.raises(StageError) as failed:
            build_engine(s)
        assert failed.value.stage == "build"
        assert "strongly typed" in failed.value.message and "builder_flag" in failed.value.message
        return
    res = build_ok(s)
    x = rand(STATIC)
    with TrtRunner(res.artifact) as runner:
        assert runner.input_dtype == np.float16 and runner.settings()["io_dtypes"]["output0"] == "float16"
        out = runner.infer(x)["output0"]
    np.testing.assert_allclose(out, ort_run(models["static"], x), atol=5e-2)


def test_static_onnx_with_range_profile_fails_with_trt_message(models, tmp_path):
    with pytest.raises(StageError) as failed:
        build_engine(spec(models["static"], tmp_path, [1, 3, 32, 32], STATIC, STATIC))
    assert failed.value.stage == "build"
    assert "profile" in failed.value.message.lower(), failed.value.message
    assert "Traceback" not in failed.value.message
    assert open(failed.value.partial.log_path).read().strip()  # the failed build keeps its log


def test_shape_outside_profile_raises_shape_error(models, tmp_path):
    res = build_ok(spec(models["dynamic"], tmp_path, DYN_MIN, DYN_OPT, DYN_MAX))
    with TrtRunner(res.artifact) as runner:
        with pytest.raises(ShapeError, match=r"profile 0: min=\[1, 3, 32, 32\] opt=\[2, 3, 64, 64\] max=\[4, 3, 96, 96\]"):
            runner.set_shape((1, 3, 128, 128))
        with pytest.raises(ShapeError, match="profile"):
            runner.set_shape((8, 3, 64, 64))
        runner.set_shape((1, 3, 64, 64))  # still usable afterwards
        assert runner.execute() > 0


def test_ultralytics_engine_file(models, static_engine, tmp_path):
    meta = {"description": "tiny", "imgsz": STATIC[2:], "names": {"0": "a"}}
    header = json.dumps(meta).encode()
    plan = open(static_engine.artifact, "rb").read()
    path = tmp_path / "tiny.engine"
    path.write_bytes(struct.pack("<i", len(header)) + header + plan)
    x = rand(STATIC)
    with TrtRunner(str(path)) as runner:
        assert runner.metadata == meta
        out = runner.infer(x)["output0"]
    np.testing.assert_allclose(out, ort_run(models["static"], x), atol=1e-3)


def test_engine_and_timing_cache(models, tmp_path, caplog):
    s = spec(models["static"], tmp_path, STATIC)
    first = build_ok(s)
    assert not first.cache_hit
    t0 = time.perf_counter()
    caplog.set_level("INFO", logger="runner")
    second = build_engine(s)
    assert second.cache_hit and time.perf_counter() - t0 < 1.0
    assert caplog.messages == ["build: engine cache hit"]
    assert second.artifact == first.artifact and second.size_bytes == first.size_bytes
    assert list((tmp_path / "timing").glob("*.cache"))


def test_damaged_engine_is_rebuilt(models, tmp_path, caplog):
    s = spec(models["static"], tmp_path, STATIC)
    plan = Path(build_ok(s).artifact)
    plan.write_bytes(plan.read_bytes()[:plan.stat().st_size // 2])  # truncated
    caplog.set_level("INFO", logger="runner")
    again = build_ok(s)
    assert not again.cache_hit and again.artifact == str(plan)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"build: cached {plan.name} is damaged (size "), warnings
    x = rand(STATIC)
    with TrtRunner(again.artifact) as runner:  # deserializes
        np.testing.assert_allclose(runner.infer(x)["output0"], ort_run(models["static"], x), atol=1e-3)
    assert build_engine(s).cache_hit


def test_two_processes_building_one_engine_build_it_once(models, tmp_path):
    """Parallel jobs of a sweep (say bench.cuda_graph=false,true) need the same engine: one builds, one waits."""
    s = spec(models["static"], tmp_path, STATIC)
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(s))
    code = ("import pickle, sys; from runner.backends.tensorrt.build import build_engine; "
            f"print(build_engine(pickle.loads(open({str(tmp_path / 'spec.pkl')!r}, 'rb').read())).cache_hit)")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                       cwd=Path(__file__).resolve().parent.parent, timeout=300),
                             range(2)))
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert sorted(r.stdout.split()[-1] for r in runs) == ["False", "True"]  # one build, one cache hit


def test_cuda_graph_same_outputs(static_engine):
    x = rand(STATIC)
    with TrtRunner(static_engine.artifact) as plain:
        ref = plain.infer(x)["output0"]
    with TrtRunner(static_engine.artifact, cuda_graph=True) as graphed:
        out = graphed.infer(x)["output0"]
        assert graphed.settings()["cuda_graph"], graphed.settings()
        out2 = graphed.infer(x * 0.5)["output0"]
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert not np.array_equal(out2, out)  # the graph reads the new input


def test_cuda_graphs_per_shape_on_a_dynamic_engine(models, tmp_path):
    """A dynamic engine replays a graph per shape. Two shapes alternate, twice each visit (the first run after a
    shape change is plain, the second replays): every output is the plain runner's, whether the larger shape moved
    the buffers (the graphs are dropped and captured again) or not (the other shape's graph is kept and replayed)."""
    res = build_ok(spec(models["dynamic"], tmp_path, DYN_MIN, DYN_OPT, DYN_MAX))
    rng = np.random.default_rng(3)
    visits = [DYN_OPT, DYN_MAX, DYN_OPT, DYN_MAX, DYN_OPT]  # the first MAX grows the buffers; after it none moves
    inputs = [[rng.random(shape, dtype=np.float32) for _ in range(2)] for shape in visits]
    with TrtRunner(res.artifact) as plain:
        expected = [[plain.infer(x)["output0"] for x in pair] for pair in inputs]
    with TrtRunner(res.artifact, cuda_graph=True) as graphed:
        for pair, wanted in zip(inputs, expected):
            for x, ref in zip(pair, wanted):
                out = graphed.infer(x)["output0"]
                assert out.shape == ref.shape
                np.testing.assert_allclose(out, ref, atol=1e-6)
        settings = graphed.settings()
        assert settings["cuda_graph"] is True and "cuda_graph_note" not in settings, settings
        assert len(graphed.graphs) == 2  # the engine's graph at each shape, kept
    np.testing.assert_allclose(expected[0][0], ort_run(models["dynamic"], inputs[0][0]), atol=1e-3)


def test_execute_returns_positive_ms(static_engine):
    with TrtRunner(static_engine.artifact) as runner:
        runner.set_shape(tuple(STATIC))
        runner.h2d(rand(STATIC))
        times = [runner.execute() for _ in range(5)]
        runner.sync()
    assert all(isinstance(t, float) and 0 < t < 1000 for t in times)
    assert runner.settings()["pinned_host"] is True


def test_close_returns_gpu_memory(static_engine):
    rt = trt_compat.cudart()
    x = rand(STATIC)
    warm = opened(static_engine.artifact)  # first use loads kernels and libraries once per process
    warm.infer(x)
    warm.close()
    free_before, _ = trt_compat.cuda_call(rt.cudaMemGetInfo)
    runner = opened(static_engine.artifact)
    runner.infer(x)
    runner.close()
    runner.close()  # idempotent
    free_after, _ = trt_compat.cuda_call(rt.cudaMemGetInfo)
    assert abs(free_before - free_after) < 16 * 2**20, (free_before, free_after)


def test_isolation_survives_a_crash_with_the_gpu_in_use(static_engine):
    """A child holding an engine segfaults: the cell says so, GPU memory comes back, the next child runs."""
    rt = trt_compat.cudart()
    free_before, _ = trt_compat.cuda_call(rt.cudaMemGetInfo)
    crashed = run_isolated(isolate_targets.trt_infer_then_segfault, (static_engine.artifact, STATIC), 120,
                           isolate_targets.result("failed"))
    assert crashed.status == "failed" and crashed.failed_stage == "bench"
    assert "SIGSEGV" in crashed.error and crashed.started_at == "inferred"
    free_after, _ = trt_compat.cuda_call(rt.cudaMemGetInfo)
    assert abs(free_before - free_after) < 16 * 2**20, (free_before, free_after)
    ok = run_isolated(isolate_targets.trt_infer, (static_engine.artifact, STATIC), 120,
                      isolate_targets.result("failed"))
    assert ok.status == "ok" and ok.timings["sum"] != 0.0


def test_isolation_times_out_a_hung_gpu_child(static_engine):
    result = run_isolated(isolate_targets.trt_hang, (static_engine.artifact, STATIC), 20,
                          isolate_targets.result("failed"))
    assert result.status == "failed" and result.failed_stage == "validate"
    assert "timeout" in result.error



def test_ultralytics_engine_export_keeps_its_header_and_profile_and_takes_our_level(tmp_path):
    """build=ultralytics: model.export(format="engine", dynamic=True) of the default model at level 0."""
    from conftest import DEFAULT_WEIGHTS
    from runner.backends.tensorrt.engine_export import EngineExportSpec, export_engine

    res = export_engine(EngineExportSpec(weights=str(DEFAULT_WEIGHTS), imgsz=(640, 640), dynamic=True, half=False,
                                         workspace_gib=2.0, optimization_level=0, opset=17, simplify=True,
                                         cache_dir=str(tmp_path)))
    assert res.tool == "ultralytics" and res.optimization_level == 0 and res.precision_mechanism == "none"
    assert res.tf32 is True  # ultralytics leaves TensorRT's default
    assert res.profile == [[1, 3, 32, 32], [1, 3, 640, 640], [1, 3, 1280, 1280]]  # its own: 32 to 2x imgsz
    assert {"stride", "task", "names", "imgsz", "batch", "args"} <= set(res.metadata)
    assert res.metadata["args"]["dynamic"] is True and res.onnx_signature["inputs"][0]["name"] == "images"
    x = rand([1, 3, 320, 480])
    with TrtRunner(res.artifact) as runner:
        assert runner.metadata == res.metadata
        out = runner.infer(x)["output0"]
    assert out.shape == (1, 7, 10 * 15 + 20 * 30 + 40 * 60)
    again = export_engine(EngineExportSpec(weights=str(DEFAULT_WEIGHTS), imgsz=(640, 640), dynamic=True, half=False,
                                           workspace_gib=2.0, optimization_level=0, opset=17, simplify=True,
                                           cache_dir=str(tmp_path)))
    assert again.cache_hit and again.artifact == res.artifact


@pytest.fixture(scope="module")
def calibration_images(tmp_path_factory) -> tuple[Path, ...]:
    """Eight generated images, letterboxed by the calibration feed like any input."""
    import cv2

    from runner.synthetic import make_image

    folder, rng = tmp_path_factory.mktemp("calib"), np.random.default_rng(5)
    paths = tuple(folder / f"{i}.jpg" for i in range(8))
    for path in paths:
        cv2.imwrite(str(path), make_image(rng)[0])
    return paths


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("algorithm", ["entropy2", "minmax"])
def test_int8_calibrator_builds_and_keeps_its_table(models, calibration_images, tmp_path, algorithm):
    import tensorrt as trt

    from runner.quantize import CalibrationSet

    s = spec(models["dynamic"], tmp_path, DYN_MIN, DYN_OPT, DYN_MAX, precision="int8", mechanism="calibrator",
             calibration=CalibrationSet(calibration_images, tuple(DYN_OPT)), calibrator=algorithm)
    if not trt_compat.has_implicit_int8(trt):
        with pytest.raises(StageError, match="removed implicit INT8 calibration.*int8_qdq"):
            build_engine(s)
        return
    res = build_ok(s)
    assert res.precision_mechanism == "calibrator" and res.calibration["cache_hit"] is False
    assert res.calibration["images"] == 8 and res.calibration["shape"] == DYN_OPT
    assert Path(res.calibration["cache"]).stat().st_size > 0
    x = rand(DYN_OPT)
    with TrtRunner(res.artifact) as runner:
        assert rel_l2(runner.infer(x)["output0"], ort_run(models["dynamic"], x)) < 0.1
    again = build_ok(BuildSpec(**{**s.__dict__, "use_engine_cache": False}))
    assert again.calibration["cache_hit"] is True and not again.cache_hit  # built again, calibration read back


def test_int8_qdq_onnx_builds_and_matches_onnxruntime(models, calibration_images, tmp_path):
    from runner.export import signature
    from runner.quantize import CalibrationSet, quantize_qdq
    from runner.results import OnnxArtifact

    fp32 = OnnxArtifact(path=models["static"], tool="test", dynamic=False, precision="fp32",
                        signature=signature(onnx.load(models["static"])), checker="ok", size_bytes=0, export_s=0.0,
                        cached=False)
    qdq = quantize_qdq(fp32, CalibrationSet(calibration_images, tuple(STATIC)), "minmax", tmp_path)
    res = build_ok(spec(qdq.path, tmp_path, STATIC, precision="int8", mechanism="qdq"))
    assert res.precision_mechanism == "qdq" and res.calibration is None
    x = rand(STATIC)
    with TrtRunner(res.artifact) as runner:
        out = runner.infer(x)["output0"]
    assert rel_l2(out, ort_run(qdq.path, x)) < 0.05  # the same quantized model on both
    assert rel_l2(out, ort_run(models["static"], x)) < 0.1  # and close to fp32


def test_int8_calibrator_builds_the_pinned_layers_in_fp16(models, calibration_images, tmp_path):
    """keep_float="*": every float layer pinned to fp16 with constraints obeyed, so no layer of the engine is int8."""
    import tensorrt as trt

    from runner.quantize import CalibrationSet

    if not trt_compat.has_implicit_int8(trt):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit calibration to pin layers in")
    res = build_ok(spec(models["static"], tmp_path, STATIC, precision="int8", mechanism="calibrator",
                        calibration=CalibrationSet(calibration_images, tuple(STATIC)), keep_float=("*",)))
    assert len(res.calibration["fp16_layers"]) >= 3 and res.calibration["keep_float"] == ["*"]
    layers = json.loads(Path(res.layers_path).read_text())["Layers"]
    assert layers and not any("int8" in json.dumps(layer.get("Outputs", [])).lower() for layer in layers)


def test_int8_from_onnxruntime_ranges_takes_an_fp16_input_and_pins_layers_in_int8(models, calibration_images,
                                                                                   tmp_path):
    """precision.pin_int8="*" on implicit INT8 from onnxruntime's ranges, with an fp16 input: both convolutions are
    pinned and built in int8, and the engine stays close to onnxruntime's fp32."""
    import tensorrt as trt

    from runner.quantize import CalibrationSet

    if not trt_compat.has_implicit_int8(trt):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8 to pin layers in")
    res = build_ok(spec(models["static"], tmp_path, STATIC, precision="int8", mechanism="calibrator",
                        calibration=CalibrationSet(calibration_images, tuple(STATIC)), calibrator="percentile",
                        pin_int8=("*",), half_input=True))
    assert res.calibration["pin_int8"] == ["*"] and len(res.calibration["int8_layers"]) >= 2
    convs = [r for r in map(lambda layer: forensics.row(layer, None), forensics.read_layers(res.layers_path))
             if "Convolution" in r.type]
    assert len(convs) == 2 and {r.input_precision for r in convs} == {"int8"}, convs  # int8 in, the last out float
    x = rand(STATIC)
    with TrtRunner(res.artifact) as runner:
        assert runner.input_dtype == np.float16
        assert rel_l2(runner.infer(x)["output0"], ort_run(models["static"], x)) < 0.1


def test_int8_input_is_quantized_at_its_range_by_the_host_and_the_gpu_letterbox(models, calibration_images,
                                                                                 tmp_path):
    """backend.int8_input on implicit INT8 from onnxruntime's ranges: the engine reads int8 at the input's calibrated
    range; the host and the GPU letterbox quantize it there (within one level of each other, as the letterboxes
    are), and the engine stays close to onnxruntime's fp32. Without the range the runner refuses the engine."""
    import tensorrt as trt

    from runner.processing import preprocess, quantize_input
    from runner.quantize import CalibrationSet

    if not trt_compat.has_implicit_int8(trt):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8 to give an int8 input")
    res = build_ok(spec(models["static"], tmp_path, STATIC, precision="int8", mechanism="calibrator",
                        calibration=CalibrationSet(calibration_images, tuple(STATIC)), calibrator="percentile",
                        pin_int8=("*",), int8_input=True))
    assert 0 < res.input_range <= 1.0  # the letterbox's values, pixels / 255
    x = rand(STATIC)
    frames = [np.random.default_rng(2).integers(0, 256, (90, 70, 3), np.uint8)]
    with TrtRunner(res.artifact, input_range=res.input_range) as runner:
        assert runner.input_dtype == np.int8 and runner.settings()["input_range"] == res.input_range
        assert rel_l2(runner.infer(x)["output0"], ort_run(models["static"], x)) < 0.1
        letterbox = runner.gpu_letterbox()
        letterbox.run(frames, tuple(STATIC[2:]))
        runner.sync()
        blob, _ = preprocess(frames, tuple(STATIC[2:]))
        levels = runner.input_levels
        assert np.abs(letterbox.read_input() * levels - quantize_input(blob, levels)).max() <= 1.0 + 1e-4
    with pytest.raises(ValueError, match="takes an int8 input; its range"):
        TrtRunner(res.artifact).open()


def test_int8_float_out_reads_its_int8_input_and_writes_fp16(models, calibration_images, tmp_path):
    """precision.pin_int8_float_out on the last convolution, kept in float (its output has no int8 range): it is
    built in int8 from its int8 input and writes fp16, and the engine stays close to onnxruntime's fp32."""
    import tensorrt as trt

    from runner.quantize import CalibrationSet

    if not trt_compat.has_implicit_int8(trt):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8 to pin layers in")
    res = build_ok(spec(models["static"], tmp_path, STATIC, precision="int8", mechanism="calibrator",
                        calibration=CalibrationSet(calibration_images, tuple(STATIC)), calibrator="percentile",
                        keep_float=("/head/*",), pin_int8=("*",), pin_int8_float_out=("/head/*",), half_input=True,
                        half_outputs=True))  # as the head's maps are
    assert res.calibration["int8_float_out_layers"] == ["/head/Conv"]
    assert "/head/Conv" not in res.calibration["int8_layers"] and res.calibration["fp16_layers"] == ["/head/Conv"]
    rows = [forensics.row(layer, None) for layer in forensics.read_layers(res.layers_path)]
    head, = [r for r in rows if "/head/Conv" in r.onnx_nodes and not r.reformat]
    assert (head.input_precision, head.precision) == ("int8", "fp16"), rows
    x = rand(STATIC)
    with TrtRunner(res.artifact) as runner:
        assert rel_l2(runner.infer(x)["output0"], ort_run(models["static"], x)) < 0.1
