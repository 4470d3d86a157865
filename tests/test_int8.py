"""INT8 and the harder held-out set, on the CPU: the generator, the default model's accuracy on it, the Q/DQ ONNX
made and validated with onnxruntime (with its mAP cost), calibration images apart from validation ones, and the
accuracy state in the tables and the gate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import IMGSZ, PRESETS, UNTIMED
from runner import synthetic
from runner.backends.onnxruntime import OrtRunner, open_reference
from runner.config import ConfigError, Thresholds, ValidateConfig
from runner.data import CALIBRATION_COUNT, HELD_OUT_COUNT, calibration_files, load_samples
from runner.preflight import preflight
from runner.metrics import box_iou, mean_average_precision
from runner.variant import run_variant
from runner.prepost import Chain
from runner.processing import ONE2MANY, postprocess, preprocess
from runner.report import gate, render
from runner.report.frame import INACCURATE, results_frame
from runner.track import int8_params
from runner.validate import validate
from test_report import variant

TARGET_BAND = (0.55, 0.85)  # fp32 mAP50-95 of every preset on the held-out split: deployable, not saturated


def test_the_generator_is_deterministic_and_hard():
    first = [synthetic.make_image(np.random.default_rng((1, i))) for i in range(24)]
    again = [synthetic.make_image(np.random.default_rng((1, i))) for i in range(24)]
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    counts = [len(labels) for _, labels in first]
    sides = np.array([min(w * img.shape[1], h * img.shape[0]) for img, labels in first for _, _, _, w, h in labels])
    assert np.mean(counts) >= 6 and max(counts) >= 12  # crowded
    assert np.mean(sides <= 16) >= 0.25 and sides.min() >= 4  # small objects, none below 4 px
    boxes = np.array([label[1:] for _, labels in first for label in labels])
    assert ((boxes >= 0) & (boxes <= 1)).all()
    overlapping = 0
    for _, labels in first:  # some visible boxes touch: occlusion and overlap
        xyxy = np.array([[x - w / 2, y - h / 2, x + w / 2, y + h / 2] for _, x, y, w, h in labels])
        overlapping += int((box_iou(xyxy, xyxy) > 0).sum() - len(labels)) // 2
    assert overlapping >= 5


@pytest.mark.parametrize("model", [pytest.param(m, marks=() if m == "yolov8n" else pytest.mark.slow) for m in PRESETS])
def test_every_preset_lands_in_the_target_band_on_the_held_out_split(export_model, held_out_images, model):
    """The fp32 onnxruntime reference (the one-to-many head, as exported by default), as every variant is validated
    against, on all 64 held-out images: every preset was trained on the current generator, so a multi-model table
    compares models, not training sets."""
    samples, _ = load_samples(str(held_out_images), None, HELD_OUT_COUNT, Path("unused"))
    reference = open_reference(export_model("ultralytics", model=model).path)
    dets = []
    for s in samples:
        blob, boxes = preprocess([s.image], IMGSZ)
        dets += postprocess(reference.infer(blob)["output0"], boxes, 0.25, 0.7, 300, ONE2MANY)
    accuracy = mean_average_precision(dets, [(s.gt_cls, s.gt_boxes) for s in samples])
    assert len(samples) == HELD_OUT_COUNT and sum(len(s.gt_cls) for s in samples) > 500
    assert TARGET_BAND[0] <= accuracy["map50_95"] <= TARGET_BAND[1], accuracy
    assert set(accuracy["per_class"]) == {0, 1, 2} and min(accuracy["per_class"].values()) > 0.4


def test_calibration_images_never_include_validation_images(tmp_path, held_out_images):
    generated = calibration_files(None, None, 16, 8, tmp_path)
    assert len(generated) == 8 and generated[0].parent.name == "calib"
    assert len(list(generated[0].parent.iterdir())) == CALIBRATION_COUNT
    validated = {p.name for p in sorted(held_out_images.iterdir())[:16]}
    mine = calibration_files(str(held_out_images), None, 16, 8, tmp_path)  # the folder past the validated images
    assert len(mine) == 8 and not validated & {p.name for p in mine}
    same_folder = calibration_files(str(held_out_images), str(held_out_images), 16, HELD_OUT_COUNT - 16, tmp_path)
    assert len(same_folder) == HELD_OUT_COUNT - 16 and not validated & {p.name for p in same_folder}
    with pytest.raises(ConfigError, match=r"^precision.calibration_images=49: .* has 48 images apart from the 16 "
                                          r"validated on; lower it, or set precision.calibration_source"):
        calibration_files(str(held_out_images), str(held_out_images), 16, HELD_OUT_COUNT - 15, tmp_path)
    with pytest.raises(ConfigError, match=r"^precision.calibration_images=8: .* has 0 images apart from the 64"):
        calibration_files(str(held_out_images), None, HELD_OUT_COUNT, 8, tmp_path)


def test_more_calibration_images_than_the_generated_split_holds_grow_it(tmp_path):
    """Asked for more than the split's 64, the generated split grows to the count; its first images stay the same."""
    first = calibration_files(None, None, 16, 8, tmp_path)
    before = [p.read_bytes() for p in first]
    more = calibration_files(None, None, 16, CALIBRATION_COUNT + 4, tmp_path)
    assert len(more) == CALIBRATION_COUNT + 4 and more[:8] == first and [p.read_bytes() for p in first] == before
    assert len(calibration_files(None, None, 16, 8, tmp_path)) == 8  # the grown split serves a smaller count


@pytest.fixture(scope="module")
def qdq_result(export_cache, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("int8")
    cfg, = preflight(["precision=int8_qdq", "backend=onnxruntime", "data.limit=8", "precision.calibration_images=8",
                      *UNTIMED, f"outputs={outputs}", f"cache_dir={export_cache}"])  # its claim is accuracy
    return run_variant(cfg, "onnxruntime")


def test_the_qdq_onnx_is_made_and_validated_with_onnxruntime(qdq_result):
    r, limits = qdq_result, ValidateConfig().int8
    check = r.validate.shapes["static"]
    # its verdict is its accuracy against the int8 limits (the preset: percentile calibration)
    within = (check.map_drop <= limits.max_map_drop and check.detections.f1 >= limits.min_det_f1
              and check.rel_l2 <= limits.max_rel_l2)
    assert within and (r.status, r.failed_stage, r.validate.status) == ("ok", None, "passed"), \
        (r.error, check.map_drop, check.detections.f1, check.rel_l2)
    assert r.build.precision_mechanism == "qdq" and r.export.tested.precision == "int8"
    q = r.export.tested.quantization  # the settings in result.json, what they touched in the MLflow params
    assert (q["calibrator"], q["images"], q["ops"], len(q["kept_float_nodes"])) == ("percentile", 8,
                                                                                    ["Add", "Concat", "Conv"], 11)
    assert int8_params(r) == {"resolved.qdq_quantized": "Add 6, Concat 13, Conv 57", "resolved.kept_float_nodes": 11,
                              "resolved.calibration_images": 8, "resolved.calibration_source": q["source"]}
    assert r.cell.onnx.label == "ul st qdq percentile cal 8" and r.cell.build.label == "ort st int8"  # 8 images, not 32
    model = onnx.load(r.export.tested.path)
    zero_points = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert {p.key for p in model.metadata_props} >= {"names", "stride"}
    assert check.ref_map50_95 > 0.5 and check.map_drop == pytest.approx(check.ref_map50_95 - check.map50_95)
    assert set(check.class_ap_delta) == {"circle", "rectangle", "triangle"}
    assert 0.5 < check.detections.f1 < 1.0 and 1e-3 < check.rel_l2 < 0.25  # int8 moves the outputs, not the boxes
    metrics = r.metrics()
    assert metrics["val.map_drop"] == pytest.approx(check.map_drop)
    assert {"val.ap_delta.circle", "val.ref_map50_95", "val.static.map_drop"} <= set(metrics)


def test_an_int8_accuracy_miss_is_inaccurate_naming_the_metric(qdq_result, held_out_images):
    """The same Q/DQ ONNX held to a limit it cannot meet (even a gain would miss): it ran, so `inaccurate` with
    the metric, not `failed`."""
    r, strict = qdq_result, Thresholds(0.5, 0.1, 0.25, 0.8, max_map_drop=-1.0)
    samples, _ = load_samples(str(held_out_images), None, 4, Path("unused"))
    with OrtRunner(r.export.tested.path) as runner, open_reference(r.export.reference.path) as reference:
        result = validate(runner, Chain(None, None, 0.25, 0.7, 300, ONE2MANY), reference, samples,
                          [("static", [1, 3, 640, 640])], strict, ValidateConfig(), "CPUExecutionProvider", [],
                          r.export.tested.names)
    assert result.status == "inaccurate" and result.failed_metrics == ["mAP50-95"]
    assert "drop" in result.reason and "> -1.0" in result.reason


def test_the_accuracy_state_in_the_grid_and_the_gate():
    ok, inaccurate = variant("ul st qdq", "trt st int8"), variant("ul st qdq", "trt st int8", "failed", "accuracy",
                                                                   "static: mAP50-95 0.70 vs 0.73: drop 0.03 > 0.02")
    inaccurate.validate.status, inaccurate.validate.failed_metrics = "inaccurate", ["mAP50-95"]
    frame = results_frame([inaccurate, variant("ul st fp32", "trt st fp32")])
    grid = render.matrix(frame)
    assert grid.loc["trt st int8", "ul st qdq"] == INACCURATE and grid.loc["trt st fp32", "ul st fp32"] == "O"
    assert frame.loc[frame["build_label"] == "trt st int8", "accuracy_miss"].item() == "mAP50-95"
    baseline, current = gate.cells(results_frame([ok])), gate.cells(results_frame([inaccurate]))
    diff = gate.compare(baseline, current, 1.5, 0.02, 3.0)
    status = diff[diff["metric"] == "status"].iloc[0]
    assert status["verdict"] == "REGRESSION" and status["current"] == "△ (accuracy)"
