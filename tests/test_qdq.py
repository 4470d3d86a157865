"""Q/DQ placement and precision pins on the CPU: which nodes of the 128-px yolov8n ONNX get Q/DQ and which stay
float (onnxruntime's quantizer, run for real), what names the Q/DQ cache, the calibration settings refused or
recorded; and, slow, what the placement and pins buy in mAP on the whole held-out split at 640 px."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import SMALL_IMGSZ, UNTIMED, export_spec
from runner.data import calibration_files
from runner.export import export_onnx
from runner.preflight import preflight
from runner.quantize import CalibrationSet, calibrate, qdq_folder, quantize_qdq, quantize_variant
from runner.results import OnnxArtifact
from runner.variant import cell_of, run_variant

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


def test_a_kept_node_whose_input_a_quantized_node_also_reads_reads_it_in_float(small, export_cache):
    """quantize_static feeds every reader of a quantized tensor from one Q/DQ pair: the head's first box conv
    shares its input with the class branch and the next block, and read int8 while pinned."""
    reference, calibration = small
    kept = "/model.22/cv2.0/cv2.0.0/conv/Conv"
    artifact = quantize_qdq(reference, calibration, "minmax", export_cache, [kept], ["Conv"])
    model = onnx.load(artifact.path)
    dq = fed_by_dq(model)
    shared = next(n.input[0] for n in model.graph.node if n.name == kept)
    assert artifact.quantization["kept_float_nodes"] == [kept] and not any(dq[kept])
    assert any(n.name != kept and shared in n.input for n in model.graph.node)  # the float tensor is shared
    assert dq["/model.22/cv3.0/cv3.0.0/conv/Conv"][:2] == [True, True]  # its sibling still reads int8


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
    dq_before = fed_by_dq(onnx.load(before.path))  # Conv-only: an input shared with a Conv is its Q/DQ's output
    assert not any(all(dq_before[n]) for n in residual + concats)
    assert before.quantization["quantized"] == {"Conv": 64}


def test_the_qdq_cache_is_named_by_keep_float_ops_calibration_count_and_source(small, export_cache,
                                                                                 held_out_images):
    reference, calibration = small

    def folder(calibration=calibration, keep=("*/dfl/*",), ops=("Conv", "Add")):
        return qdq_folder(reference, calibration, "minmax", export_cache, keep, ops)

    other_source = CalibrationSet(tuple(sorted(held_out_images.iterdir())[:2]), calibration.shape)
    three = CalibrationSet(tuple(sorted(calibration.files[0].parent.iterdir())[:3]), calibration.shape)
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


def test_the_calibrator_takes_percentile_ranges_whose_concats_may_share_them():
    """TensorRT has no percentile calibrator; onnxruntime's ranges stand in, so their Concats' scales are a dimension
    (TensorRT's own calibrators refuse it: the test above)."""
    cfgs = preflight(["-m", "precision=int8_calibrator", "precision.calibrator=percentile",
                      "precision.concat_scales=own,shared", "backend=onnxruntime", "tracking.enabled=false"])
    builds = {cell_of(cfg, "tensorrt", "calibrator").build.label for cfg in cfgs}
    assert builds == {"trt st int8 percentile", "trt st int8 percentile concat shared"}
    pinned, = preflight(["precision=int8", "precision.pin_int8=[*/Conv]",
                         "precision.pin_int8_float_out=[*cv2.*.2/Conv]", "backend=onnxruntime",
                         "tracking.enabled=false"])
    assert cell_of(pinned, "tensorrt", "calibrator").build.label == (
        "trt st int8 percentile concat shared int8 pins 1 int8 float-out 1")


def test_tensor_ranges_cover_what_qdq_quantizes_and_leave_the_pins_and_the_decode_float(small, export_cache):
    """onnxruntime's percentile ranges for TensorRT's implicit INT8: the Conv/Add/Concat tensors Q/DQ would quantize,
    none for a pinned convolution's own input or the head's decode; shared Concat ranges are one; cached."""
    from runner.quantize import kept_float, tensor_ranges

    reference, calibration = small
    p = default_int8()
    ranges, path, cached = tensor_ranges(reference.path, calibration, "percentile", export_cache, p.keep_float,
                                         "shared")
    assert not cached and path.is_file() and all(r > 0 for r in ranges.values())
    model = onnx.load(reference.path)
    node = {n.name: n for n in model.graph.node}
    assert "images" in ranges and node["/model.0/act/Mul"].output[0] in ranges  # model.1's input
    assert node["/model.0/conv/Conv"].output[0] not in ranges  # inside the convolution TensorRT fuses with its SiLU
    assert node[FINAL_CONVS[0]].input[0] in ranges  # its int8 producer's activation, read in fp16
    assert not any(t in ranges for conv in FINAL_CONVS for t in node[conv].output)  # the logits stay float
    decode = [t for n in model.graph.node if n.name.startswith(f"{HEAD}/") and n.op_type in ("Sigmoid", "Sub", "Div")
              for t in n.output]
    assert decode and not any(t in ranges for t in decode)
    concat = node["/model.2/Concat"]
    assert len({ranges[t] for t in (*concat.input, *concat.output)}) == 1  # one range for the Concat's tensors
    again, _, cached = tensor_ranges(reference.path, calibration, "percentile", export_cache,
                                     list(reversed(p.keep_float)), "shared")
    assert cached and again == ranges
    own, other, _ = tensor_ranges(reference.path, calibration, "percentile", export_cache, p.keep_float, "own")
    assert other != path and set(own) == set(ranges)
    pinned, elsewhere, _ = tensor_ranges(reference.path, calibration, "percentile", export_cache, p.keep_float,
                                         "shared", conv_outputs=True)  # for convolutions pinned in int8
    assert elsewhere not in (path, other) and set(pinned) - set(ranges) == {
        n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.name not in kept_float(model, p.keep_float)}


@pytest.mark.parametrize("override, message", [
    ("precision.qdq_ops=[Conv,Relu]", "precision.qdq_ops: a list of op types from Conv, Add, Concat, MatMul, Gemm, "
                                      "got ['Conv', 'Relu']"),
    ("precision.calibration_images=0", "precision.calibration_images: must be a positive integer, got 0"),
    ("precision.pin_int8=[*/Conv]", "precision.pin_int8=['*/Conv']: a Q/DQ ONNX runs int8 where its Q/DQ nodes are; "
                                    "the pins apply to TensorRT's implicit INT8 (precision=int8_calibrator or int8, "
                                    "TensorRT <= 10)"),
    ("precision.pin_int8_float_out=[*cv2.*.2/Conv]",
     "precision.pin_int8_float_out=['*cv2.*.2/Conv']: a Q/DQ ONNX runs int8 where its Q/DQ nodes are; the pins apply "
     "to TensorRT's implicit INT8 (precision=int8_calibrator or int8, TensorRT <= 10)"),
])
def test_bad_int8_settings_are_refused_naming_the_key(runner_main, tmp_path, override, message):
    said = runner_main(["precision=int8_qdq", override, f"outputs={tmp_path}"])
    assert said.returncode == 2 and said.stderr.strip() == f"runner: error: {message}"


def test_too_few_calibration_images_in_the_source_is_refused_before_work(runner_main, tmp_path, held_out_images):
    said = runner_main(["precision=int8_qdq", f"precision.calibration_source={held_out_images}",
                        "precision.calibration_images=70", "data.limit=8", f"outputs={tmp_path}"])
    assert said.returncode == 2 and len(said.stderr.strip().splitlines()) == 1
    assert said.stderr.startswith(f"runner: error: precision.calibration_images=70: {held_out_images} has 64 "
                                  f"images apart from the 8 validated on")


def concat_scales(model: onnx.ModelProto) -> list[set[float]]:
    """For each Concat fed by DequantizeLinear nodes: the scales of those inputs and of the Q/DQ its output gets."""
    initializers = {i.name: float(onnx.numpy_helper.to_array(i)) for i in model.graph.initializer
                    if i.name.endswith("_scale") and onnx.numpy_helper.to_array(i).size == 1}
    made_by = {out: n for n in model.graph.node for out in n.output}
    read_by = {}
    for node in model.graph.node:
        for tensor in node.input:
            read_by.setdefault(tensor, []).append(node)
    groups = []
    for node in model.graph.node:
        fed = [made_by[i] for i in node.input if i in made_by and made_by[i].op_type == "DequantizeLinear"]
        if node.op_type == "Concat" and fed:
            out_q = [q for q in read_by.get(node.output[0], []) if q.op_type == "QuantizeLinear"]
            groups.append({initializers[n.input[1]] for n in [*fed, *out_q]})
    return groups


def test_shared_concat_scales_give_every_concat_one_scale(small, export_cache):
    reference, calibration = small
    p = default_int8()
    own = quantize_qdq(reference, calibration, "minmax", export_cache, p.keep_float, p.qdq_ops)
    shared = quantize_qdq(reference, calibration, "minmax", export_cache, p.keep_float, p.qdq_ops, "shared")
    assert shared.path != own.path and shared.quantization["concat_scales"] == "shared"
    groups = concat_scales(onnx.load(shared.path))
    assert len(groups) == 13 and all(len(scales) == 1 for scales in groups)  # yolov8n's 13 quantized Concats
    assert any(len(scales) > 1 for scales in concat_scales(onnx.load(own.path)))
    assert shared.quantization["widened_ranges"] > 0 and own.quantization["widened_ranges"] == 0


def test_add_inputs_skip_leaves_each_residual_adds_convolution_input_in_float(small, export_cache):
    reference, calibration = small
    p = default_int8()
    both = quantize_qdq(reference, calibration, "minmax", export_cache, p.keep_float, p.qdq_ops)
    skip = quantize_qdq(reference, calibration, "minmax", export_cache, p.keep_float, p.qdq_ops, add_inputs="skip")
    assert skip.path != both.path and skip.quantization["add_inputs"] == "skip"
    fed_both, fed_skip = fed_by_dq(onnx.load(both.path)), fed_by_dq(onnx.load(skip.path))
    adds = [name for name, fed in fed_both.items() if name.endswith("/Add") and fed == [True, True]]
    assert len(adds) == 6  # yolov8n's bottleneck residuals: model.2, 4 (two), 6 (two), 8
    assert all(fed_skip[name] == [True, False] for name in adds)  # x + cv2(cv1(x)): x stays int8, cv2's is float
    assert skip.quantization["float_add_inputs"] == 6 and both.quantization["float_add_inputs"] == 0


def test_a_variant_and_the_sensitivity_search_quantize_with_every_precision_setting(small, export_cache):
    """`quantize_variant`, what the export stage and `runner sensitivity` both call, takes all of the config's
    settings (a search with shared Concat scales measures the model the sweep builds), the pins overridable."""
    reference, calibration = small
    cfg, = preflight(["precision=int8_qdq", "precision.concat_scales=shared", "precision.calibrator=minmax",
                      "precision.add_inputs=skip", "backend=onnxruntime", "tracking.enabled=false",
                      f"cache_dir={export_cache}"])
    made = quantize_variant(cfg, reference, calibration=calibration)
    q = made.quantization
    assert (q["calibrator"], q["concat_scales"], q["add_inputs"]) == ("minmax", "shared", "skip")
    assert q["keep_float"] == sorted(cfg.precision.keep_float)
    pinned = quantize_variant(cfg, reference, ["*/dfl/*"], calibration)
    assert pinned.quantization["keep_float"] == ["*/dfl/*"] and pinned.quantization["concat_scales"] == "shared"


def test_shared_concat_scales_and_skip_add_inputs_are_qdq_settings_named_in_the_label(runner_main, tmp_path):
    said = runner_main(["precision=int8_calibrator", "precision.concat_scales=shared", f"outputs={tmp_path}"])
    assert said.returncode == 2 and said.stderr.strip() == (
        "runner: error: precision.concat_scales=shared: TensorRT's calibrator sets its own scales; use "
        "precision=int8_qdq, or precision.calibrator=percentile, whose ranges can share them; or "
        "precision.concat_scales=own with the calibrator")
    said = runner_main(["precision=int8_calibrator", "precision.add_inputs=skip", f"outputs={tmp_path}"])
    assert said.returncode == 2 and said.stderr.strip() == (
        "runner: error: precision.add_inputs=skip: TensorRT's calibrator places no Q/DQ; use precision=int8_qdq, "
        "whose Q/DQ ONNX can leave an Add's convolution input in float; or precision.add_inputs=all with the "
        "calibrator")
    said = runner_main(["precision=int8_qdq", "precision.int8_mode=calibrator", "precision.calibrator=minmax",
                        f"outputs={tmp_path}"])  # the preset's shared scales, with the calibrator asked for
    assert said.returncode == 2 and said.stderr.strip().endswith("or precision.concat_scales=own with the calibrator")
    shipped, placed = (preflight(["precision=int8_qdq", *more, "backend=onnxruntime", "tracking.enabled=false"])[0]
                       for more in ([], ["precision.concat_scales=own", "precision.add_inputs=skip"]))
    assert shipped.precision.concat_scales.value == "shared"  # the preset's: the fastest on TensorRT 8.6
    assert cell_of(shipped, "onnxruntime", "qdq").onnx.label == "ul st qdq percentile"
    assert cell_of(placed, "onnxruntime", "qdq").onnx.label == "ul st qdq percentile concat own add skip"


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


def tiny_conv(folder: Path) -> OnnxArtifact:
    """A one-Conv ONNX (3 -> 4 channels, ReLU after it) at 32 px, as the export stage records one."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["conv"], name="/conv/Conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["output0"], name="/act/Relu")], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4, 32, 32])], [weight])
    path = folder / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return OnnxArtifact(path=str(path), tool="onnx", dynamic=False, precision="fp32",
                        signature={"inputs": [{"name": "images"}]}, checker="ok", size_bytes=0, export_s=0,
                        cached=False)


def test_entropy2_and_percentile_search_a_histogram_minmax_does_not(tmp_path):
    """With quantize_static's own 128 bins, entropy2 had one candidate, the min-max range: its ONNX was minmax's."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    reference = tiny_conv(tmp_path)
    calibration = CalibrationSet(tuple(calibration_files(None, None, 2, 2, tmp_path)), (1, 3, 32, 32))
    highest = {}
    for method in ("minmax", "entropy2", "percentile"):
        (tmp_path / method).mkdir()
        ranges = load_tensors_data(calibrate(reference.path, "images", calibration, method, ["Conv"], tmp_path / method))
        highest[method] = float(np.abs(np.asarray(ranges["conv"].range_value, dtype=np.float64)).max())
    assert highest["entropy2"] < 0.95 * highest["minmax"] and highest["percentile"] < highest["minmax"], highest


@pytest.mark.slow
def test_placement_and_pins_bring_the_int8_drop_within_001_on_the_whole_held_out_split(export_cache, tmp_path):
    """yolov8n, 640, the 64 held-out images, percentile, onnxruntime: the presets' placement and pins against Conv
    inputs only without pins (results/int8-ort/: 0.004 against 0.018)."""
    drops = {}
    for name, overrides in {"before": ["precision.qdq_ops=[Conv]", "precision.keep_float=[]"], "after": []}.items():
        cfg, = preflight(["precision=int8_qdq", "precision.calibrator=percentile", "backend=onnxruntime",
                          "data.limit=64", *UNTIMED, "tracking.enabled=false",
                          f"outputs={tmp_path}", f"cache_dir={export_cache}", *overrides])
        check = run_variant(cfg, "onnxruntime").validate.shapes["static"]
        drops[name] = check.ref_map50_95 - check.map50_95
    assert drops["after"] <= 0.008 and drops["before"] >= drops["after"] + 0.01, drops
