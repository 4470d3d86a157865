"""Q/DQ placement and precision pins on the CPU: which nodes of the 128-px yolov8n ONNX get Q/DQ and which stay
float (onnxruntime's quantizer, run for real), what names the Q/DQ cache, the calibration settings refused or
recorded; and, slow, what the placement and pins buy in mAP on the whole held-out split at 640 px."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from conftest import SMALL_IMGSZ, export_spec
from runner.data import calibration_files
from runner.export import export_onnx
from runner.preflight import preflight
from runner.quantize import CalibrationSet, qdq_folder, quantize_qdq

HEAD = "/model.22"  # yolov8n's Detect module
FINAL_CONVS = [f"{HEAD}/cv{b}.{i}/cv{b}.{i}.2/Conv" for i in range(3) for b in (2, 3)]  # box and class logits
DFL = [f"{HEAD}/dfl/{n}" for n in ("Reshape", "Transpose", "Softmax", "conv/Conv", "Reshape_1")]


def default_int8(*overrides: str):
    """The precision section of precision=int8_qdq as the presets compose it."""
    cfg, = preflight(["precision=int8_qdq", "backend=onnxruntime", "tracking.enabled=false", *overrides])
    return cfg.precision


@pytest.fixture(scope="module")
def small(export_cache, tmp_path_factory):
    """(the 128-px fp32 yolov8n ONNX, a calibration set of two generated calibration images at 128 px)."""
    reference = export_onnx(export_spec("ultralytics", imgsz=SMALL_IMGSZ), export_cache)
    files = calibration_files(None, None, 2, 2, tmp_path_factory.mktemp("calib"))
    return reference, CalibrationSet(tuple(files), (1, 3, *SMALL_IMGSZ))


def fed_by_dq(model: onnx.ModelProto) -> dict[str, list[bool]]:
    """Each node's name -> whether each of its inputs comes out of a DequantizeLinear."""
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    return {n.name: [producers.get(i) == "DequantizeLinear" for i in n.input if i] for n in model.graph.node}


@pytest.fixture(scope="module")
def placed(small, export_cache):
    """The Q/DQ ONNX of the presets' placement and pins, and the Conv-only one without pins (the old placement)."""
    reference, calibration = small
    p = default_int8()
    after = quantize_qdq(reference, calibration, "minmax", export_cache, p.keep_float, p.qdq_ops)
    before = quantize_qdq(reference, calibration, "minmax", export_cache, (), ["Conv"])
    return after, before


def test_the_default_pins_keep_exactly_the_heads_last_convs_and_the_dfl_in_float(placed):
    after, before = placed
    assert sorted(after.quantization["kept_float_nodes"]) == sorted(FINAL_CONVS + DFL)
    dq = fed_by_dq(onnx.load(after.path))
    assert not any(any(dq[name]) for name in FINAL_CONVS + DFL)
    convs = [name for name in dq if name.endswith("/Conv") and name not in FINAL_CONVS + DFL]
    assert len(convs) == 57 and all(dq[name][:2] == [True, True] for name in convs)  # input and weight
    assert before.quantization["kept_float_nodes"] == []
    assert all(fed_by_dq(onnx.load(before.path))[name][:2] == [True, True] for name in FINAL_CONVS)


def test_residual_adds_and_concats_get_qdq_on_their_inputs_the_heads_decode_does_not(placed):
    after, before = placed
    dq = fed_by_dq(onnx.load(after.path))
    residual = [n for n in dq if n.split("/")[-1] == "Add" and "/m." in n]  # the bottlenecks' shortcut Adds
    concats = [n for n in dq if n.endswith("/Concat") and not n.startswith(HEAD)]
    assert len(residual) == 6 and len(concats) == 13
    assert all(all(dq[n]) for n in residual + concats)
    decode = [n for n in dq if n.startswith(f"{HEAD}/") and n.split("/")[-1].startswith(("Add", "Concat"))]
    assert len(decode) == 6 and not any(any(dq[n]) for n in decode)
    assert after.quantization["quantized"] == {"Add": 6, "Concat": 13, "Conv": 57}
    assert not any(any(fed_by_dq(onnx.load(before.path))[n]) for n in residual + concats)
    assert before.quantization["quantized"] == {"Conv": 64}


def test_the_qdq_cache_is_named_by_keep_float_ops_calibration_count_and_source(small, export_cache, tmp_path,
                                                                                 held_out_images):
    reference, calibration = small

    def folder(calibration=calibration, keep=("*/dfl/*",), ops=("Conv", "Add")):
        return qdq_folder(reference, calibration, "minmax", export_cache, keep, ops)

    other_source = CalibrationSet(tuple(sorted(held_out_images.iterdir())[:2]), calibration.shape)
    three = CalibrationSet(tuple(calibration_files(None, None, 2, 3, tmp_path)), calibration.shape)
    base = folder()
    assert folder(ops=("Add", "Conv")) == base and folder(keep=["*/dfl/*"]) == base  # order and type do not count
    others = {folder(keep=()), folder(keep=("*/dfl/*", "*cv2.*.2/Conv")), folder(ops=("Conv",)),
              folder(calibration=three), folder(calibration=other_source)}
    assert base not in others and len(others) == 5


def test_a_second_quantization_with_the_same_settings_is_the_cached_one(small, placed, export_cache):
    reference, calibration = small
    p = default_int8()
    again = quantize_qdq(reference, calibration, "minmax", export_cache, list(reversed(p.keep_float)), p.qdq_ops)
    assert again.cached and again.path == placed[0].path and again.quantization == placed[0].quantization


def test_percentile_is_refused_for_tensorrts_calibrator_in_one_line(runner_main, tmp_path):
    said = runner_main(["precision=int8_calibrator", "precision.calibrator=percentile", f"outputs={tmp_path}"])
    assert said.returncode == 2 and not list(tmp_path.iterdir())
    assert said.err.strip() == ("runner: error: precision.calibrator=percentile: TensorRT's calibrator has none "
                                "(entropy2, minmax); use precision=int8_qdq for onnxruntime's percentile calibration")
    assert default_int8("precision.calibrator=percentile").calibrator == "percentile"  # onnxruntime has it


@pytest.mark.parametrize("override, message", [
    ("precision.qdq_ops=[Conv,Relu]", "precision.qdq_ops: a list of op types from Conv, Add, Concat, MatMul, Gemm, "
                                      "got ['Conv', 'Relu']"),
    ("precision.calibration_images=0", "precision.calibration_images: must be a positive integer, got 0"),
])
def test_bad_int8_settings_are_refused_naming_the_key(runner_main, tmp_path, override, message):
    said = runner_main(["precision=int8_qdq", override, f"outputs={tmp_path}"])
    assert said.returncode == 2 and said.err.strip() == f"runner: error: {message}"


def test_too_few_calibration_images_in_the_source_is_refused_before_work(runner_main, tmp_path, held_out_images):
    said = runner_main(["precision=int8_qdq", f"precision.calibration_source={held_out_images}",
                        "precision.calibration_images=60", "data.limit=8", f"outputs={tmp_path}"])
    assert said.returncode == 2 and len(said.err.strip().splitlines()) == 1
    assert said.err.startswith(f"runner: error: precision.calibration_images=60: {held_out_images} has 56 images "
                               f"apart from the 8 validated on")


def test_the_calibration_settings_are_swept_as_dimensions():
    cfgs = preflight(["-m", "precision=int8_qdq", "precision.calibrator=minmax,entropy2,percentile",
                      "precision.calibration_images=16,64", "tracking.enabled=false"])
    assert sorted((c.precision.calibrator.value, c.precision.calibration_images) for c in cfgs) == sorted(
        (a, n) for a in ("minmax", "entropy2", "percentile") for n in (16, 64))


def test_the_settings_and_what_they_touched_are_recorded(placed):
    after, _ = placed
    q = after.quantization
    assert (q["calibrator"], q["images"], Path(q["source"]).name, q["ops"]) == ("minmax", 2, "calib",
                                                                                ["Add", "Concat", "Conv"])
    assert q["keep_float"] == sorted(default_int8().keep_float)
    json.dumps(q)  # goes into result.json as it is


def test_each_calibrator_gives_its_own_ranges(small, placed, export_cache):
    """entropy2 and percentile search a 2048-bin histogram as TensorRT's entropy calibrator does: with
    quantize_static's own 128 bins entropy2 had one candidate, the min-max range, and made minmax's ONNX."""
    reference, calibration = small
    p = default_int8()
    scales = {}
    for method in ("entropy2", "percentile"):
        artifact = quantize_qdq(reference, calibration, method, export_cache, p.keep_float, p.qdq_ops)
        scales[method] = activation_scales(artifact.path)
    scales["minmax"] = activation_scales(placed[0].path)
    tensors = set(scales["minmax"])
    assert all(set(s) == tensors for s in scales.values()) and len(tensors) > 50
    for method in ("entropy2", "percentile"):  # the tighter ranges of most tensors: outliers clipped
        tighter = sum(scales[method][t] < 0.99 * scales["minmax"][t] for t in tensors)
        assert tighter > len(tensors) / 2, (method, tighter, len(tensors))


def activation_scales(path: str) -> dict[str, float]:
    """The per-tensor (activation) scales of a Q/DQ ONNX by tensor name."""
    from onnx import numpy_helper

    return {i.name: float(numpy_helper.to_array(i)) for i in onnx.load(path).graph.initializer
            if i.name.endswith("_scale") and not i.dims}
