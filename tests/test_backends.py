"""Backends by name and the one Runner shape, with the real onnxruntime; TensorRT's rules without TensorRT."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runner import backends
from runner.backends import Runner
from runner.backends.onnxruntime import OnnxruntimeBackend, OrtRunner
from runner.backends.tensorrt import TensorrtBackend
from runner.backends.tensorrt import compat as trt_compat
from runner.backends.ultralytics import OUTSIDE_PROFILE, UltralyticsBackend, UltralyticsRunner
from runner.config import ConfigError
from runner.preflight import preflight
from runner.variant import cell_of
from runner.processing import preprocess

TRT_MISSING = not trt_compat.trt_available()[0]


def test_backends_are_chosen_by_name():
    assert backends.names() == ["onnxruntime", "tensorrt", "ultralytics"]
    assert isinstance(backends.get("onnxruntime"), OnnxruntimeBackend)
    assert isinstance(backends.get("tensorrt"), TensorrtBackend)
    assert isinstance(backends.get("ultralytics"), UltralyticsBackend)
    with pytest.raises(KeyError, match="unknown backend 'trtexec'; known: onnxruntime, tensorrt, ultralytics"):
        backends.get("trtexec")


@pytest.mark.parametrize("backend, overrides, label, skip", [
    ("tensorrt", ["preprocess=cpu", "postprocess=cpu"], "trt st fp16", None),
    ("tensorrt", ["preprocess=gpu", "postprocess=cpu"], "trt st fp16 gpu-pre", None),
    ("tensorrt", ["preprocess=gpu", "postprocess=gpu"], "trt st fp16 gpu-pre gpu-post", None),
    ("ultralytics", [], "trt st fp16 predict", None),
    ("ultralytics", ["postprocess=gpu"], "trt st fp16 predict gpu-post", "predict's own pre/postprocessing"),
    ("onnxruntime", ["preprocess=gpu"], "ort st fp16 gpu-pre", "use backend=tensorrt"),
])
def test_the_pipeline_is_part_of_the_row_and_the_gpu_ends_need_tensorrt(backend, overrides, label, skip):
    """preprocess/postprocess=gpu and the peer are build rows of their own; where they cannot apply, the variant
    is skipped with the reason (whatever this machine has)."""
    cfg, = preflight(["precision=fp16", f"backend={backend}", "backend.half_input=false", "backend.head_maps=false",
                      *overrides])
    cfg, _ = backends.resolve_auto(cfg, backends.get(backend))
    assert cell_of(cfg, backend, "builder_flag").build.label == label
    reason = backends.get(backend).applies(cfg)
    assert (reason is None) if skip is None else (skip in reason)


@pytest.mark.parametrize("backend, label", [
    ("tensorrt", "trt st fp16 fp16-in gpu-pre gpu-post"),
    ("ultralytics", "trt st fp16 fp16-in predict"),  # the peer on that engine
    ("onnxruntime", "ort st fp16"),  # a TensorRT build setting: onnxruntime has no engine
])
def test_an_fp16_input_is_part_of_an_engine_row(backend, label):
    ends = ["preprocess=gpu", "postprocess=gpu"] if backend == "tensorrt" else []
    cfg, = preflight(["precision=fp16", f"backend={backend}", "backend.half_input=true", *ends])
    assert cell_of(cfg, backend, "builder_flag").build.label == label


ALL_AUTO = ["preprocess", "postprocess", "cuda_graph", "half_input", "int8_input", "head_maps"]
OFF = ["backend.half_input=false", "backend.int8_input=false", "backend.head_maps=false"]


@pytest.mark.parametrize("backend, overrides, ends, graph, auto, label", [
    ("tensorrt", [], ("gpu", "gpu"), True, ALL_AUTO, "trt st fp16 fp16-in head-maps gpu-pre gpu-post"),
    ("onnxruntime", [], ("cpu", "cpu"), None, ALL_AUTO, "ort st fp16"),
    ("ultralytics", [], ("cpu", "cpu"), None, ALL_AUTO, "trt st fp16 predict"),  # the engine ultralytics makes
    ("tensorrt", ["build=ultralytics"], ("gpu", "gpu"), True, ALL_AUTO, "ul-trt st fp16 gpu-pre gpu-post"),
    ("tensorrt", ["preprocess=cpu", "bench.cuda_graph=false", "backend.head_maps=false"], ("cpu", "gpu"), False,
     ["postprocess", "half_input", "int8_input"], "trt st fp16 fp16-in gpu-post"),
    ("tensorrt", ["postprocess=cpu", "bench.cuda_graph=true", "backend.half_input=false"], ("gpu", "cpu"), True,
     ["preprocess", "int8_input", "head_maps"], "trt st fp16 head-maps gpu-pre"),
    ("onnxruntime", ["preprocess=cpu", "postprocess=cpu", "bench.cuda_graph=true", *OFF], ("cpu", "cpu"), None, [],
     "ort st fp16"),
])
def test_auto_is_the_fastest_path_of_the_backend_and_explicit_values_stay(monkeypatch, backend, overrides, ends, graph,
                                                                          auto, label):
    """The defaults (`auto`): GPU pre/post, CUDA graphs, an fp16 input and the engine ending at the head's maps on
    runner's TensorRT API build, the host elsewhere (no graph there, the engine ultralytics makes for the peer);
    never a reason to skip. What is given explicitly is kept, and the record says which values came from `auto`."""
    monkeypatch.setattr(TensorrtBackend, "precision_mechanism", lambda self, cfg: "builder_flag")  # TensorRT <= 10
    requested, = preflight(["precision=fp16", f"backend={backend}", *overrides])
    cfg, resolved = backends.resolve_auto(requested, backends.get(backend))
    assert (cfg.preprocess.device.value, cfg.postprocess.device.value) == ends == (resolved.preprocess,
                                                                                  resolved.postprocess)
    assert (resolved.cuda_graph, resolved.auto) == (graph, auto)
    assert cfg.bench.cuda_graph is bool(graph)  # what the runner is given: a switch, never "auto"
    assert (cfg.backend.half_input, cfg.backend.head_maps) == (resolved.half_input, resolved.head_maps)
    assert cell_of(cfg, backend, "builder_flag").build.label == label
    assert backends.get(backend).applies(cfg) is None
    assert backends.resolve_auto(cfg, backends.get(backend))[0] == cfg  # a resolved config has nothing left to resolve


def test_auto_text_says_what_auto_became(monkeypatch):
    monkeypatch.setattr(TensorrtBackend, "precision_mechanism", lambda self, cfg: "builder_flag")
    requested, = preflight(["preprocess=cpu"])
    assert (backends.resolve_auto(requested, backends.get("tensorrt"))[1].auto_text()
            == "post gpu, graph on, fp16 input, head maps")
    assert backends.resolve_auto(requested, backends.get("onnxruntime"))[1].auto_text() == "post cpu, graph n/a"
    explicit, = preflight(["preprocess=cpu", "postprocess=cpu", "bench.cuda_graph=false", *OFF])
    assert backends.resolve_auto(explicit, backends.get("tensorrt"))[1].auto_text() == ""


def test_auto_leaves_out_what_the_variant_cannot_take(monkeypatch):
    """fp32 and TensorRT's calibrator keep a float input; an end-to-end head, and RT-DETR's decoder, have no maps to
    end at."""
    trt = backends.get("tensorrt")
    fp32, = preflight(["precision=fp32"])
    assert backends.resolve_auto(fp32, trt)[0].backend.half_input is False
    monkeypatch.setattr(TensorrtBackend, "precision_mechanism", lambda self, cfg: "calibrator")
    calibrated, = preflight(["precision=int8_calibrator", "model=yolov10n", "export.head=end2end"])
    resolved = backends.resolve_auto(calibrated, trt)[1]
    assert (resolved.half_input, resolved.head_maps) == (False, False)
    rtdetr, = preflight(["model=rtdetr-n"])
    assert backends.resolve_auto(rtdetr, trt)[1].head_maps is False


def test_int8_input_is_auto_on_implicit_int8_from_onnxruntimes_ranges_only(monkeypatch):
    """Implicit INT8 from onnxruntime's ranges takes an int8 input in place of the fp16 one; an fp16 input asked for
    keeps it fp16; TensorRT's calibrators (float batches), Q/DQ and fp16 never take it, and asking for it there, or
    for both input types, or of the peer, is refused in one line."""
    trt = backends.get("tensorrt")
    monkeypatch.setattr(TensorrtBackend, "precision_mechanism", lambda self, cfg: "calibrator")
    ranges, = preflight(["precision=int8"])
    cfg, resolved = backends.resolve_auto(ranges, trt)
    assert (resolved.int8_input, resolved.half_input) == (True, False) == (cfg.backend.int8_input,
                                                                           cfg.backend.half_input)
    label = cell_of(cfg, "tensorrt", "calibrator").build.label
    assert label == "trt st int8 percentile concat shared int8-in head-maps gpu-pre gpu-post"
    assert "int8 input" in resolved.auto_text()
    half, = preflight(["precision=int8", "backend.half_input=true"])
    assert backends.resolve_auto(half, trt)[1].int8_input is False
    entropy, = preflight(["precision=int8_calibrator"])
    assert not backends.resolve_auto(entropy, trt)[1].int8_input
    asked, = preflight(["precision=int8_calibrator", "backend.int8_input=true"])
    assert trt.applies(asked).startswith("backend.int8_input: it applies to implicit int8 from onnxruntime's ranges")
    monkeypatch.setattr(TensorrtBackend, "precision_mechanism", lambda self, cfg: "builder_flag")
    fp16, = preflight(["precision=fp16"])
    assert not backends.resolve_auto(fp16, trt)[1].int8_input
    with pytest.raises(ConfigError, match="the input has one type"):
        preflight(["backend.half_input=true", "backend.int8_input=true"])
    peer, = preflight(["backend=ultralytics", "backend.int8_input=true", "preprocess=cpu", "postprocess=cpu"])
    assert backends.get("ultralytics").applies(peer) == ("backend.int8_input: predict feeds a float input; it applies "
                                                         "to backend=tensorrt")


def test_an_int8_input_the_build_kept_fp16_is_labelled_fp16(monkeypatch):
    """Where the input had no int8 range (the layers reading it kept in float), the build gives it fp16: the variant's
    config, its record of `auto` and its cell say fp16-in, not int8-in."""
    from runner.results import BuildResult
    from runner.variant import input_as_built

    monkeypatch.setattr(TensorrtBackend, "precision_mechanism", lambda self, cfg: "calibrator")
    cfg, resolved = backends.resolve_auto(preflight(["precision=int8"])[0], backends.get("tensorrt"))
    build = BuildResult(tool="tensorrt_api", artifact="e.plan", profile=[], input_range=0.9995)
    assert input_as_built(cfg, resolved, build) is cfg and resolved.int8_input
    kept = input_as_built(cfg, resolved, BuildResult(tool="tensorrt_api", artifact="e.plan", profile=[]))
    assert (kept.backend.int8_input, kept.backend.half_input) == (False, True)
    assert (resolved.int8_input, resolved.half_input) == (False, True) and "fp16 input" in resolved.auto_text()
    assert " fp16-in " in cell_of(kept, "tensorrt", "calibrator").build.label


def test_the_cell_names_the_calibrator_where_it_calibrates():
    """A Q/DQ ONNX names its calibrator in the column, implicit calibration names it in the row: kept as parts,
    joined into the label in one place."""
    qdq, = preflight(["precision=int8_qdq", "backend=onnxruntime"])
    cell = cell_of(qdq, "onnxruntime", "qdq")
    assert (cell.onnx.precision, cell.onnx.calibrator, cell.onnx.label) == ("qdq", "percentile", "ul st qdq percentile")
    assert (cell.build.calibrator, cell.build.label) == ("", "ort st int8")
    calibrated, = preflight(["precision=int8_calibrator", "backend=tensorrt"])
    cell = cell_of(calibrated, "tensorrt", "calibrator")
    assert (cell.onnx.label, cell.build.precision, cell.build.label) == ("ul st fp32", "int8", "trt st int8 entropy2")


def test_ort_runner_has_the_runner_shape_and_matches_onnxruntime(export_model, held_out_images):
    import cv2

    onnx = export_model("ultralytics", dynamic=True)
    blob, _ = preprocess([cv2.imread(str(sorted(held_out_images.iterdir())[0]))] * 2, (480, 640))
    expected = ort.InferenceSession(onnx.path, providers=["CPUExecutionProvider"]).run(None, {"images": blob})[0]
    with OrtRunner(onnx.path) as runner:
        assert isinstance(runner, Runner) and runner.session is not None
        runner.set_shape(blob.shape)
        runner.h2d(blob)
        ms = runner.execute()
        out = runner.d2h()
        assert ms > 0 and list(out) == ["output0"] and out["output0"].dtype == np.float32
        np.testing.assert_array_equal(out["output0"], expected)
        np.testing.assert_array_equal(runner.infer(blob)["output0"], expected)
        assert runner.settings()["provider"] == "CPUExecutionProvider"
    assert runner.session is None  # closed on leaving the block


def test_auto_picks_what_runs_here_and_says_why():
    cfg, = preflight([])
    backend, reason = backends.resolve(cfg)
    assert reason is None
    assert backend.name == ("onnxruntime" if TRT_MISSING else "tensorrt")
    choice = backends.auto_choice()
    assert choice.startswith(f"runner: backend=auto -> {backend.name}")


@pytest.mark.skipif(not TRT_MISSING, reason="tensorrt is installed here")
def test_explicit_tensorrt_without_it_is_skipped_with_the_reason():
    cfg, = preflight(["backend=tensorrt"])
    backend, reason = backends.resolve(cfg)
    assert backend.name == "tensorrt" and reason == "tensorrt is not installed (pip install 'runner[gpu]')"


def test_build_ultralytics_rules():
    trt = TensorrtBackend()
    ok, torch_export, crossed = (preflight(o)[0] for o in (
        ["build=ultralytics", "shape=dynamic"], ["build=ultralytics", "export=torch"],
        ["build=ultralytics", "shape=static", "export.shape=dynamic"]))
    assert trt.applies(ok) is None
    assert trt.applies(torch_export) == ("build=ultralytics exports its own ONNX with ultralytics; export=torch does "
                                         "not apply")
    assert "export.shape=dynamic with shape=static does not apply" in trt.applies(crossed)
    assert OnnxruntimeBackend().applies(ok) == ("build=ultralytics makes a TensorRT engine; backend=onnxruntime runs "
                                                "the ONNX (use backend=tensorrt)")
    assert trt.precision_mechanism(preflight(["build=ultralytics", "precision=fp16"])[0]) == "ultralytics"


def test_half_input_applies_to_engines_whose_first_layers_are_not_fp32():
    trt = TensorrtBackend()
    fp32, theirs = (preflight(o)[0] for o in (["backend.half_input=true"],
                                              ["backend.half_input=true", "build=ultralytics", "precision=fp16"]))
    assert trt.applies(fp32) == ("backend.half_input: precision fp32 via none keeps a float input; it applies to "
                                 "fp16 (builder_flag), int8 Q/DQ and implicit int8 from onnxruntime's ranges "
                                 "(precision.calibrator=percentile)")
    assert trt.applies(theirs) == "backend.half_input: build=ultralytics makes its own engine; use build=tensorrt_api"
    from runner.backends.tensorrt.build import half_input_applies

    assert half_input_applies("calibrator", "percentile") and half_input_applies("qdq", "entropy2")
    assert not any(half_input_applies("calibrator", c) for c in ("entropy2", "minmax"))  # they feed float batches


@pytest.mark.parametrize("backend, overrides, label, refusal", [
    ("tensorrt", [], "trt st fp16 head-maps gpu-pre gpu-post", None),
    ("ultralytics", [], "trt st fp16 predict",  # the peer keeps the whole head: it is measured once, without
     "backend.head_maps: predict decodes the whole head; it applies to backend=tensorrt"),
    ("tensorrt", ["build=ultralytics"], "ul-trt st fp16 gpu-pre gpu-post",
     "backend.head_maps: build=ultralytics makes its own engine; use build=tensorrt_api"),
    ("tensorrt", ["export.head=end2end", "model=yolov10n"], "trt st fp16 head-maps gpu-pre gpu-post",
     "backend.head_maps: export.head=end2end ends in its own (B, N, 6) detections; it applies to export.head=one2many"),
])
def test_head_maps_are_runners_tensorrt_rows_of_one_to_many_heads(backend, overrides, label, refusal):
    cfg, = preflight(["precision=fp16", f"backend={backend}", "backend.head_maps=true", *overrides])
    cfg, _ = backends.resolve_auto(cfg, backends.get(backend))
    assert cell_of(cfg, backend, "builder_flag").build.label == label
    assert backends.get(backend).applies(cfg) == refusal


def test_the_peer_is_measured_once_whatever_bench_cuda_graph_says():
    """A sweep over bench.cuda_graph runs the peer at false and auto (one row: graphs do not apply to predict) and
    skips it at true, saying why; runner's TensorRT rows take every value."""
    peer, ours = backends.get("ultralytics"), backends.get("tensorrt")
    for value, refusal in (("false", None), ("auto", None), ("true", "bench.cuda_graph: predict launches its own "
                                                              "work; runner's CUDA graphs apply to backend=tensorrt")):
        cfg, = preflight(["precision=fp16", "backend=ultralytics", f"bench.cuda_graph={value}"])
        assert peer.applies(cfg) == refusal
        assert ours.applies(cfg) is None


def test_int8_auto_refuses_shared_concat_scales_where_tensorrts_own_calibrator_takes_it(monkeypatch):
    """The int8 preset shares Concat ranges; where auto resolves to TensorRT's calibrator (8.6, 10: stood in for
    here), entropy2 cannot, and the variant says so; percentile ranges can."""
    monkeypatch.setattr(TensorrtBackend, "precision_mechanism", lambda self, cfg: "calibrator")
    trt = TensorrtBackend()
    theirs, ranges = (preflight(["precision=int8", *o])[0] for o in (["precision.calibrator=entropy2"], []))
    assert trt.applies(theirs) == ("precision.concat_scales=shared: TensorRT's calibrator sets its own scales; use "
                                   "precision=int8_qdq, or precision.calibrator=percentile, whose ranges can share "
                                   "them; or precision.concat_scales=own with the calibrator")
    assert trt.applies(ranges) is None and ranges.precision.calibrator.value == "percentile"


@pytest.mark.skipif(not TRT_MISSING, reason="tensorrt is installed here")
def test_build_ultralytics_on_auto_without_tensorrt_says_both_reasons():
    cfg, = preflight(["build=ultralytics"])
    backend, reason = backends.resolve(cfg)
    assert backend.name == "onnxruntime"
    assert reason.startswith("build=ultralytics makes a TensorRT engine")
    assert reason.endswith("TensorRT unavailable here: tensorrt is not installed (pip install 'runner[gpu]')")


class RefusingModel:
    """A stand-in for `YOLO(engine)` (TensorRT is not here): its predict refuses the frame's shape as ultralytics'
    TensorRT backend does, or fails otherwise."""

    def __init__(self, message: str):
        self.message = message

    def predict(self, *args, **kwargs):
        raise ValueError(self.message)


def test_the_peer_says_what_to_do_when_predict_letterboxes_outside_the_profile():
    runner = UltralyticsRunner("model.engine", (640, 640))
    runner.model = RefusingModel(f"input size (1, 3, 480, 640) is {OUTSIDE_PROFILE}")
    with pytest.raises(ValueError, match=r"480, 640\) is outside .*: predict letterboxes each frame to its own "
                                         r"rectangle on a dynamic engine; give the profile those shapes"):
        runner.predict([np.zeros((480, 640, 3), np.uint8)], (640, 640), 0.25, 0.7, 300)
    runner.model = RefusingModel("something else")
    with pytest.raises(ValueError, match="^something else$"):
        runner.predict([np.zeros((480, 640, 3), np.uint8)], (640, 640), 0.25, 0.7, 300)


@pytest.mark.parametrize("key", ["pin_int8", "pin_int8_float_out"])
def test_int8_pins_apply_to_int8_alone(key):
    fp16, = preflight(["precision=fp16", f"precision.{key}=[*/Conv]"])
    why = f"precision.{key}=['*/Conv']: precision fp16 has no int8 layer; the pins apply to precision=int8"
    assert OnnxruntimeBackend().applies(fp16) == why and TensorrtBackend().applies(fp16) == why
