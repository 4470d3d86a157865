"""Validation stage: the model under test against the onnxruntime reference, shape by shape.

At each shape both backends see the same letterboxed batches. Tensors are compared per output
(max/mean abs, rel-L2, cosine, atol/rtol pass rate); detections by class-aware IoU matching against
the reference's; and, where the data has labels, mAP50 / mAP50-95 against ground truth.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from runner.data import Sample
from runner.metrics import match_detections, mean_average_precision, tensor_metrics
from runner.processing import postprocess, preprocess


def check_shapes(mode: str, lo: list[int], mid: list[int], hi: list[int], stride: int, non_square: bool
                 ) -> list[tuple[str, list[int]]]:
    """Static: its one shape. Dynamic: min, opt, max and one non-square shape inside the profile."""
    if mode == "static":
        return [("static", list(mid))]
    shapes = [("min", list(lo)), ("opt", list(mid)), ("max", list(hi))]
    if non_square:
        h = max(lo[2], (hi[2] * 3 // 4) // stride * stride)
        candidate = [mid[0], 3, h, hi[3]]
        if all(a <= c <= b for a, c, b in zip(lo, candidate, hi)) and candidate[2] != candidate[3]:
            shapes.append(("non_square", candidate))
    seen, unique = set(), []
    for label, shape in shapes:
        if tuple(shape) not in seen:
            seen.add(tuple(shape))
            unique.append((label, shape))
    return unique


def _batches(samples: list[Sample], batch: int):
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        yield chunk + [chunk[-1]] * (batch - len(chunk))


def validate_shape(runner, reference, samples: list[Sample], shape: list[int], thresholds, conf: float,
                   nms_iou: float, match_iou: float, max_det: int) -> dict:
    """Metrics of one shape. A reference that cannot run there makes the shape `skipped`."""
    hw = (shape[2], shape[3])
    outs_test, outs_ref, det_test, det_ref, gts = {}, {}, [], [], []
    for chunk in _batches(samples, shape[0]):
        blob, boxes = preprocess([s.image for s in chunk], hw)
        try:
            ref = reference.infer(blob)
        except Exception as exc:  # the reference's own limit at this shape
            return {"status": "skipped", "shape": shape, "reason": f"reference failed: {_first_line(exc)}"}
        try:
            runner.set_shape(tuple(blob.shape))
            test = runner.infer(blob)
        except Exception as exc:
            return {"status": "failed", "shape": shape, "error": _first_line(exc)}
        for name, value in ref.items():
            outs_ref.setdefault(name, []).append(value)
            outs_test.setdefault(name, []).append(test[name])
        first = next(iter(ref))
        det_ref += postprocess(ref[first], boxes, conf, nms_iou, max_det)
        det_test += postprocess(test[first], boxes, conf, nms_iou, max_det)
        gts += [(s.gt_cls, s.gt_boxes) for s in chunk]
    tensors = {name: tensor_metrics(np.concatenate(outs_test[name]), np.concatenate(outs_ref[name]),
                                    thresholds.atol, thresholds.rtol) for name in outs_ref}
    matched = [match_detections(t, r, match_iou) for t, r in zip(det_test, det_ref)]
    tp = sum(m["matched"] for m in matched)
    n_test, n_ref = sum(len(d) for d in det_test), sum(len(d) for d in det_ref)
    precision = tp / n_test if n_test else float(n_ref == 0)
    recall = tp / n_ref if n_ref else float(n_test == 0)
    detections = {"precision": precision, "recall": recall,
                  "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                  "mean_iou": float(np.mean([m["mean_iou"] for m in matched if m["matched"]] or [0.0])),
                  "score_delta": float(np.mean([m["score_delta"] for m in matched if m["matched"]] or [0.0])),
                  "n_test": n_test, "n_ref": n_ref}
    labelled = [(d, g) for d, g in zip(det_test, gts) if g[0] is not None]
    accuracy = mean_average_precision([d for d, _ in labelled], [g for _, g in labelled]) if labelled else {}
    worst_rel_l2 = max(t["rel_l2"] for t in tensors.values())
    passed = worst_rel_l2 <= thresholds.max_rel_l2 and detections["f1"] >= thresholds.min_det_f1
    return {"status": "passed" if passed else "failed", "shape": shape, "tensors": tensors,
            "detections": detections, "accuracy": accuracy, "rel_l2": worst_rel_l2}


def validate(runner, reference, samples: list[Sample], shapes: list[tuple[str, list[int]]], thresholds,
             conf: float, nms_iou: float, match_iou: float, max_det: int, progress=print) -> dict:
    """Validate at every shape; passes when every shape the reference could run passes."""
    per_shape = {}
    for label, shape in shapes:
        progress(f"validate: {label} {shape} on {len(samples)} images...")
        per_shape[label] = r = validate_shape(runner, reference, samples, shape, thresholds, conf, nms_iou,
                                              match_iou, max_det)
        if r["status"] == "skipped":
            progress(f"validate: {label} skipped: {r['reason']}")
        elif "error" in r:
            progress(f"validate: {label} failed: {r['error']}")
        else:
            progress(f"validate: {label} {r['status']}: rel-L2 {r['rel_l2']:.2e}, "
                     f"det F1 {r['detections']['f1']:.3f}, mAP50-95 {r['accuracy'].get('map50_95', float('nan')):.3f}")
    checked = [r for r in per_shape.values() if r["status"] != "skipped"]
    summary = {"passed": bool(checked) and all(r["status"] == "passed" for r in checked),
               "shapes": per_shape, "thresholds": asdict(thresholds)}
    ran = [r for r in checked if "tensors" in r]
    if ran:
        summary.update(rel_l2=max(r["rel_l2"] for r in ran),
                       max_abs=max(t["max_abs"] for r in ran for t in r["tensors"].values()),
                       cosine=min(t["cosine"] for r in ran for t in r["tensors"].values()),
                       allclose_rate=min(t["allclose_rate"] for r in ran for t in r["tensors"].values()),
                       det_f1=min(r["detections"]["f1"] for r in ran),
                       det_mean_iou=min(r["detections"]["mean_iou"] for r in ran))
        maps = [r["accuracy"] for r in ran if r["accuracy"]]
        if maps:
            summary.update(map50=min(m["map50"] for m in maps), map50_95=min(m["map50_95"] for m in maps))
    if not checked:
        summary["error"] = "no shape could be checked: " + "; ".join(
            f"{k}: {r['reason']}" for k, r in per_shape.items())
    return summary


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
