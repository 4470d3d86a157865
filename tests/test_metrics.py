"""Numeric agreement and detection metrics on arrays whose answers are known exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ultralytics.utils.metrics import compute_ap

from runner.metrics import (IOU_THRESHOLDS, box_iou, correct_at_thresholds, match_detections,
                            mean_average_precision, tensor_metrics)


def det(*rows) -> np.ndarray:
    """(n, 6) detections [x1, y1, x2, y2, score, cls]."""
    return np.asarray(rows, np.float64).reshape(-1, 6)


# ---------------------------------------------------------------- tensor_metrics

def test_identical_tensors():
    a = np.random.default_rng(0).normal(size=(2, 7, 100)).astype(np.float32)
    m = tensor_metrics(a, a.copy(), atol=0.0, rtol=0.0)
    assert m["max_abs"] == 0.0 and m["mean_abs"] == 0.0
    assert m["rel_l2"] == 0.0
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert m["allclose_rate"] == 1.0


def test_known_perturbation():
    ref = np.array([3.0, 4.0])  # |ref| = 5
    test = np.array([3.0, 5.0])  # diff (0, 1): |diff| = 1
    m = tensor_metrics(test, ref, atol=0.5, rtol=0.0)
    assert m["rel_l2"] == pytest.approx(0.2, rel=1e-12)
    assert m["max_abs"] == 1.0
    assert m["mean_abs"] == 0.5
    assert m["cosine"] == pytest.approx((9 + 20) / (5 * math.sqrt(34)), rel=1e-12)
    assert m["allclose_rate"] == 0.5  # the first element within atol, the second not


def test_rel_l2_of_a_scaled_tensor():
    ref = np.random.default_rng(1).normal(size=1000)
    m = tensor_metrics(ref * 1.01, ref, atol=0, rtol=0)
    assert m["rel_l2"] == pytest.approx(0.01, rel=1e-9)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)  # same direction


def test_allclose_rate_uses_rtol_of_the_reference():
    ref = np.array([100.0, 1.0, 0.0, -50.0])
    test = np.array([101.0, 1.5, 0.0, -50.4])
    m = tensor_metrics(test, ref, atol=0.0, rtol=0.01)
    assert m["allclose_rate"] == 0.75  # 1 <= 1.0, 0.5 > 0.01, 0 <= 0, 0.4 <= 0.5


def test_fp16_input_is_compared_in_float64():
    ref = np.linspace(-3, 3, 1001, dtype=np.float32)
    test = ref.astype(np.float16)
    m = tensor_metrics(test, ref, atol=0, rtol=0)
    expected = np.linalg.norm(test.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64))
    assert m["rel_l2"] == pytest.approx(expected, rel=1e-12)
    assert 0 < m["rel_l2"] < 1e-3


def test_orthogonal_tensors_have_zero_cosine():
    m = tensor_metrics(np.array([1.0, 0.0]), np.array([0.0, 1.0]), atol=0, rtol=0)
    assert m["cosine"] == 0.0
    assert m["rel_l2"] == pytest.approx(math.sqrt(2))


# ---------------------------------------------------------------- box_iou / match_detections

def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10]], np.float64)
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [5, 5, 15, 15], [20, 20, 30, 30]], np.float64)
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 0.5, 25 / 175, 0.0]], rtol=1e-12)


def test_identical_detections_match_perfectly():
    ref = det([0, 0, 10, 10, 0.9, 0], [20, 20, 40, 50, 0.8, 1], [100, 100, 120, 130, 0.5, 2])
    m = match_detections(ref.copy(), ref, 0.5)
    assert m == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "mean_iou": 1.0, "score_delta": 0.0, "matched": 3}


def test_same_box_different_class_does_not_match():
    ref = det([0, 0, 10, 10, 0.9, 0])
    test = det([0, 0, 10, 10, 0.9, 1])
    m = match_detections(test, ref, 0.5)
    assert m["matched"] == 0
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0


def test_iou_threshold_boundary_is_inclusive():
    ref = det([0, 0, 10, 10, 0.9, 0])
    test = det([0, 0, 10, 5, 0.7, 0])  # IoU exactly 0.5
    at = match_detections(test, ref, 0.5)
    assert at["matched"] == 1 and at["f1"] == 1.0
    assert at["mean_iou"] == 0.5
    assert at["score_delta"] == pytest.approx(0.2)
    above = match_detections(test, ref, 0.5 + 1e-9)
    assert above["matched"] == 0 and above["f1"] == 0.0


def test_each_reference_is_matched_once_highest_score_first():
    ref = det([0, 0, 10, 10, 0.9, 0])
    test = det([0, 0, 10, 10, 0.5, 0], [0, 0, 10, 9, 0.8, 0])  # both overlap the one reference
    m = match_detections(test, ref, 0.5)
    assert m["matched"] == 1
    assert m["precision"] == 0.5 and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["mean_iou"] == pytest.approx(0.9)  # the 0.8-score box won, not the exact one
    assert m["score_delta"] == pytest.approx(0.1)


def test_missing_and_extra_detections():
    ref = det([0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.9, 1])
    only_one = match_detections(ref[:1].copy(), ref, 0.5)
    assert (only_one["precision"], only_one["recall"]) == (1.0, 0.5)
    assert match_detections(det(), ref, 0.5)["f1"] == 0.0
    assert match_detections(ref, det(), 0.5)["precision"] == 0.0
    assert match_detections(det(), det(), 0.5)["f1"] == 1.0  # nothing to find, nothing found


# ---------------------------------------------------------------- mAP

def _gts():
    return [(np.array([0, 1], np.float32), np.array([[10, 10, 50, 60], [100, 120, 180, 200]], np.float64)),
            (np.array([2], np.float32), np.array([[30, 40, 90, 70]], np.float64))]


# ultralytics' 101-point interpolated AP of a perfect precision-recall curve: its validator reports 0.995, not 1.0,
# for perfect detections, and runner's mAP is the validator's (`ultralytics.utils.metrics.ap_per_class`).
PERFECT_AP = float(compute_ap(np.array([1.0]), np.array([1.0]))[0])


def test_perfect_ap_is_ultralytics_ceiling():
    assert PERFECT_AP == pytest.approx(0.995, abs=1e-12)


def test_perfect_detections_have_the_perfect_map():
    gts = _gts()
    dets = [np.concatenate([b, np.full((len(c), 1), 0.9), c[:, None]], 1) for c, b in gts]
    m = mean_average_precision(dets, gts)
    assert m["map50"] == pytest.approx(PERFECT_AP, abs=1e-12)
    assert m["map50_95"] == pytest.approx(PERFECT_AP, abs=1e-12)


def test_a_missed_object_halves_recall_of_its_class():
    gts = [(np.array([0.0, 0.0]), np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float64))]
    m = mean_average_precision([det([0, 0, 10, 10, 0.9, 0])], gts)
    assert m["map50"] == pytest.approx(float(compute_ap(np.array([0.5]), np.array([1.0]))[0]), abs=1e-12)
    assert 0.45 < m["map50"] < 0.55


def test_wrong_class_everywhere_has_map_zero():
    gts = _gts()
    dets = [np.concatenate([b, np.full((len(c), 1), 0.9), ((c + 1) % 3)[:, None]], 1) for c, b in gts]
    m = mean_average_precision(dets, gts)
    assert m["map50"] == 0.0 and m["map50_95"] == 0.0


def test_loose_boxes_count_at_05_but_not_095():
    gts = [(np.array([0.0]), np.array([[0, 0, 100, 100]], np.float64))]
    dets = [det([0, 0, 100, 70, 0.9, 0])]  # IoU 0.7: a true positive at 0.5..0.7 only
    m = mean_average_precision(dets, gts)
    assert m["map50"] == pytest.approx(PERFECT_AP, abs=1e-12)
    assert m["map50_95"] == pytest.approx(PERFECT_AP * 5 / 10, abs=1e-12)  # thresholds 0.50, ..., 0.70 of ten


def test_no_ground_truth_gives_no_map():
    assert mean_average_precision([det([0, 0, 10, 10, 0.9, 0])], [(np.zeros(0), np.zeros((0, 4)))]) == {}


def test_correct_at_thresholds_matches_pinned_ultralytics_on_real_detections(export_model, held_out_images,
                                                                             tmp_path):
    """On the default model's real detections (validator-style conf 0.001) the TP matrix is ultralytics' own."""
    import onnxruntime as ort
    from ultralytics.models.yolo.detect import DetectionValidator

    from runner.data import load_samples
    from runner.processing import postprocess, preprocess

    validator = DetectionValidator(save_dir=tmp_path)
    np.testing.assert_allclose(validator.iouv.numpy(), IOU_THRESHOLDS, rtol=1e-6)
    onnx = export_model("ultralytics", dynamic=False)
    session = ort.InferenceSession(onnx.path, providers=["CPUExecutionProvider"])
    samples, _ = load_samples(str(held_out_images), None, 16, tmp_path)
    assert all(s.gt_cls is not None for s in samples)
    compared = 0
    for s in samples:
        blob, boxes = preprocess([s.image], (640, 640))
        d = postprocess(session.run(None, {session.get_inputs()[0].name: blob})[0], boxes, conf=0.25)[0]
        d = d[np.argsort(-d[:, 4], kind="stable")]
        ours = correct_at_thresholds(d, s.gt_cls, s.gt_boxes)
        theirs = validator.match_predictions(torch.from_numpy(d[:, 5]), torch.from_numpy(s.gt_cls.astype(np.float32)),
                                             torch.from_numpy(box_iou(s.gt_boxes, d[:, :4]))).numpy()
        assert np.array_equal(ours, theirs), s.name
        compared += len(d)
    assert compared > 0


def test_correct_at_thresholds_matches_pinned_ultralytics_in_a_crowded_scene(tmp_path):
    from ultralytics.models.yolo.detect import DetectionValidator

    gt_cls = np.zeros(2, np.float32)
    gt_boxes = np.array([[2.0, 17.4, 25.7, 42.6], [3.5, 21.4, 30.2, 44.8]])
    d = det([0.1, 22.0, 25.6, 37.1, 0.9, 0], [3.3, 13.2, 25.9, 42.7, 0.1, 0])
    iou = box_iou(gt_boxes, d[:, :4])  # det0: 0.570 / 0.493, det1: 0.804 / 0.588 (away from every threshold)
    theirs = DetectionValidator(save_dir=tmp_path).match_predictions(
        torch.from_numpy(d[:, 5].astype(np.float32)), torch.from_numpy(gt_cls), torch.from_numpy(iou)).numpy()
    assert theirs[:, 0].sum() == 2  # at IoU 0.5 both detections are true positives: det0-gt0, det1-gt1
    assert np.array_equal(correct_at_thresholds(d, gt_cls, gt_boxes), theirs)
