"""Numeric agreement between two backends, and detection quality against ground truth."""
from __future__ import annotations

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def tensor_metrics(test: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, float]:
    """Max/mean abs error, rel-L2, cosine similarity and the atol/rtol pass rate of `test` against `ref`."""
    t, r = np.asarray(test, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    diff = np.abs(t - r)
    norm_r, norm_t = np.linalg.norm(r), np.linalg.norm(t)
    return {
        "max_abs": float(diff.max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(t - r) / max(norm_r, 1e-12)),
        "cosine": float(t @ r / max(norm_t * norm_r, 1e-12)),
        "allclose_rate": float(np.mean(diff <= atol + rtol * np.abs(r))) if diff.size else 1.0,
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, shape (len(a), len(b))."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).prod(1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def match_detections(test: np.ndarray, ref: np.ndarray, iou_thr: float = 0.5) -> dict[str, float]:
    """Greedy class-aware matching of (n, 6) detections, highest test score first."""
    if len(test) == 0 and len(ref) == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "mean_iou": 1.0, "score_delta": 0.0, "matched": 0}
    iou = box_iou(test[:, :4], ref[:, :4]) if len(test) and len(ref) else np.zeros((len(test), len(ref)))
    iou = np.where(test[:, None, 5] == ref[None, :, 5], iou, 0.0)
    used, ious, deltas = np.zeros(len(ref), bool), [], []
    for i in np.argsort(-test[:, 4]):
        candidates = np.where(used, -1.0, iou[i])
        j = int(candidates.argmax()) if len(ref) else -1
        if j >= 0 and candidates[j] >= iou_thr:
            used[j] = True
            ious.append(candidates[j])
            deltas.append(abs(float(test[i, 4] - ref[j, 4])))
    tp = len(ious)
    precision = tp / len(test) if len(test) else 0.0
    recall = tp / len(ref) if len(ref) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "score_delta": float(np.mean(deltas)) if deltas else 0.0, "matched": tp}


def correct_at_thresholds(det: np.ndarray, gt_cls: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(n_det, 10) true-positive matrix at IoU 0.5:0.95: greedy in descending confidence, each target
    claimed once per threshold, as ultralytics' `BaseValidator.match_predictions` (8.4) does."""
    correct = np.zeros((len(det), len(IOU_THRESHOLDS)), bool)
    if len(det) == 0 or len(gt_cls) == 0:
        return correct
    iou = box_iou(gt_boxes, det[:, :4]) * (gt_cls[:, None] == det[None, :, 5])
    claimed = np.zeros((len(gt_cls), len(IOU_THRESHOLDS)), bool)
    columns = np.arange(len(IOU_THRESHOLDS))
    for j in np.argsort(-det[:, 4], kind="stable"):
        available = np.where(claimed, 0.0, iou[:, j, None])
        best = available.argmax(0)
        correct[j] = available[best, columns] >= IOU_THRESHOLDS
        claimed[best, columns] |= correct[j]
    return correct


def mean_average_precision(dets: list[np.ndarray], gts: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """mAP50, mAP50-95 and AP50-95 per class index (`per_class`) of per-image detections against (classes,
    xyxy boxes) ground truth."""
    from ultralytics.utils.metrics import ap_per_class

    tp = np.concatenate([correct_at_thresholds(d, c, b) for d, (c, b) in zip(dets, gts)])
    conf = np.concatenate([d[:, 4] for d in dets])
    pred_cls = np.concatenate([d[:, 5] for d in dets])
    target_cls = np.concatenate([c for c, _ in gts])
    if len(target_cls) == 0:
        return {}
    stats = ap_per_class(tp, conf, pred_cls, target_cls)
    ap, classes = stats[5], stats[6]
    return {"map50": float(ap[:, 0].mean()) if len(ap) else 0.0, "map50_95": float(ap.mean()) if len(ap) else 0.0,
            "per_class": {int(c): float(a) for c, a in zip(classes, ap.mean(1))}}
