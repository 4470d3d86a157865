"""The rewrites of the ONNX under test. The Split->Concat fold: what it rewrites and what it leaves, that onnxruntime
gives the same bits before and after on the 128-px yolov8n and yolo11n, and which variants' export stage folds. The
cut at the head's maps: the host decode of the maps gives the whole graph's output on yolov8n, yolov5nu and yolo11n
(dynamic, batch 2, non-square), the cut is refused in one line where there is no Detect head, and only runner's
TensorRT runner on the API build gets it, and a Q/DQ ONNX made from the cut keeps its record."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import ASSETS, SMALL_IMGSZ, export_spec
from runner.config import BackendName, BuildTool, Calibrator, Head, Mechanism, Precision
from runner.export import export_onnx
from runner.preflight import preflight
from runner.processing import decode_maps
from runner.results import StageError
from runner.rewrite import NoHeadMaps, cut_at_head_maps, fold_split_concat, folded_onnx, head_maps_onnx
from runner.variant import export_stage


def graph_of(*nodes, outputs=("out",)) -> onnx.ModelProto:
    """A float (1, 4, 2, 2) input `x` through `nodes`, the named outputs of (1, any, 2, 2)."""
    graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, list("nchw")) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def split(axis=1, outputs=("a", "b")):
    return helper.make_node("Split", ["x"], list(outputs), name="split", axis=axis)


def concat(*inputs, axis=1):
    return helper.make_node("Concat", list(inputs), ["out"], name="concat", axis=axis)


def outputs_of(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("nodes, folded, concat_inputs", [
    # every output, in order, beside another input: the run reads the Split's input; the Split goes
    ((split(), helper.make_node("Relu", ["b"], ["r"]), concat("a", "b", "r")), 1, ["x", "r"]),
    # out of order, a part, another axis: left as they are
    ((split(), concat("b", "a")), 0, ["b", "a"]),
    ((split(), helper.make_node("Relu", ["b"], ["r"]), concat("a", "r")), 0, ["a", "r"]),
    ((split(axis=2), concat("a", "b")), 0, ["a", "b"]),
])
def test_a_concat_reads_the_split_input_only_for_every_output_in_order_on_its_axis(nodes, folded, concat_inputs):
    model = graph_of(*nodes)
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2) - 8
    before = outputs_of(model, x)
    assert fold_split_concat(model) == folded
    onnx.checker.check_model(model)
    assert list(next(n for n in model.graph.node if n.op_type == "Concat").input) == concat_inputs
    assert [n.op_type == "Split" for n in model.graph.node].count(True) == 1  # the Relu still reads "b"
    np.testing.assert_array_equal(outputs_of(model, x)[0], before[0])


def test_a_split_no_node_reads_any_more_goes():
    model = graph_of(split(), concat("a", "b"))
    assert fold_split_concat(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Concat"]
    assert list(model.graph.node[0].input) == ["x"]


@pytest.mark.parametrize("model, folds", [("yolov8n", 8), ("yolo11n", 8)])
def test_folded_yolo_gives_the_same_bits_and_is_cached(export_cache, tmp_path, model, folds):
    reference = export_onnx(export_spec("ultralytics", weights=ASSETS / f"{model}.pt", imgsz=SMALL_IMGSZ),
                            export_cache)
    folded, count = folded_onnx(reference, tmp_path)
    assert count == folds and folded.folded_splits == folds and folded.path != reference.path
    x = np.random.default_rng(0).random((1, 3, *SMALL_IMGSZ), np.float32)
    runs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
            for p in (reference.path, folded.path)]
    np.testing.assert_array_equal(runs[1], runs[0])
    again, count_again = folded_onnx(reference, tmp_path)
    assert (again.cached, again.path, count_again) == (True, folded.path, folds)


def test_the_export_stage_folds_the_onnx_under_test_of_tensorrt_api_builds_only(export_cache):
    cfg, = preflight(["backend=onnxruntime", "tracking.enabled=false", f"cache_dir={export_cache}",
                      f"model.imgsz=[{SMALL_IMGSZ[0]},{SMALL_IMGSZ[1]}]"])
    on_ort = export_stage(cfg, Mechanism.none, "onnxruntime")
    assert (on_ort.folded_splits, on_ort.tested.path) == (None, on_ort.reference.path)
    trt = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, name=BackendName.tensorrt))
    on_trt = export_stage(trt, Mechanism.builder_flag, "tensorrt")
    assert on_trt.folded_splits == 8 and on_trt.tested.path != on_trt.reference.path
    assert on_trt.reference.path == on_ort.reference.path  # onnxruntime's reference stays the export
    for off in (dataclasses.replace(trt, backend=dataclasses.replace(trt.backend, fold_split_concat=False)),
                dataclasses.replace(trt, build=dataclasses.replace(trt.build, tool=BuildTool.ultralytics))):
        assert export_stage(off, Mechanism.builder_flag, "tensorrt").folded_splits is None


@pytest.mark.parametrize("model", ["yolov8n", "yolov5nu", "yolo11n"])
def test_the_decode_of_the_head_maps_gives_the_whole_graphs_output(export_cache, tmp_path, model):
    reference = export_onnx(export_spec("ultralytics", weights=ASSETS / f"{model}.pt", imgsz=SMALL_IMGSZ,
                                        dynamic=True), export_cache)
    cut = head_maps_onnx(reference, tmp_path)
    record = cut.head_maps
    assert (record["output"], record["reg_max"], len(record["maps"])) == ("output0", 16, 6)
    assert record["classes"] == len(reference.names) and not cut.cached
    x = np.random.default_rng(1).random((2, 3, 96, 128), np.float32)  # batch 2, non-square, inside 128 px
    whole = ort.InferenceSession(reference.path, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    maps = ort.InferenceSession(cut.path, providers=["CPUExecutionProvider"]).run(record["maps"], {"images": x})
    assert [m.shape[1] for m in maps] == [64, record["classes"]] * 3
    decoded = decode_maps(maps, record["reg_max"], x.shape[2:])
    assert decoded.shape == whole.shape
    np.testing.assert_allclose(decoded, whole, rtol=1e-5, atol=1e-3)  # fp32 rounding of box pixels up to 128
    assert head_maps_onnx(reference, tmp_path).cached


def test_a_graph_without_a_detect_head_is_refused_in_one_line():
    with pytest.raises(NoHeadMaps, match="no YOLO Detect head maps to cut at .*one-to-many YOLO heads"):
        cut_at_head_maps(graph_of(split(), concat("a", "b")))


def test_only_runners_tensorrt_runner_on_the_api_build_ends_at_the_head_maps(export_cache):
    cfg, = preflight(["backend=tensorrt", "backend.head_maps=true", "tracking.enabled=false",
                      f"cache_dir={export_cache}", f"model.imgsz=[{SMALL_IMGSZ[0]},{SMALL_IMGSZ[1]}]"])
    cut = export_stage(cfg, Mechanism.builder_flag, "tensorrt")
    assert cut.tested.head_maps["maps"] == [o["name"] for o in cut.tested.signature["outputs"]]
    assert cut.reference.head_maps is None
    qdq = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, name=Precision.int8,
                                                                 calibration_images=4, calibrator=Calibrator.minmax))
    quantized = export_stage(qdq, Mechanism.qdq, "tensorrt").tested  # cut first, then Q/DQ: the record stays
    assert quantized.quantization and quantized.head_maps == cut.tested.head_maps
    assert [o["name"] for o in quantized.signature["outputs"]] == cut.tested.head_maps["maps"]
    for backend, off in (("ultralytics", cfg), ("tensorrt", dataclasses.replace(
            cfg, build=dataclasses.replace(cfg.build, tool=BuildTool.ultralytics)))):
        assert export_stage(off, Mechanism.builder_flag, backend).tested.head_maps is None
    end2end = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(ASSETS / "yolov10n.pt")),
                                  export=dataclasses.replace(cfg.export, head=Head.end2end))
    with pytest.raises(StageError, match=r"backend.head_maps: the output output0 \[1, 300, 6\] is not the one-to-many"):
        export_stage(end2end, Mechanism.builder_flag, "tensorrt")
    assert export_stage(end2end, Mechanism.builder_flag, "tensorrt", head_maps_auto=True).tested.head_maps is None
