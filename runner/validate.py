"""Validation stage: the model under test against the onnxruntime reference, shape by shape.

At each shape both backends see the same letterboxed batches. Tensors are compared per output
(max/mean abs, rel-L2, cosine, atol/rtol pass rate): the engine's numerics alone. Detections go through the
variant's own chain (`prepost`: GPU letterbox, GPU filter, or the peer's predict), matched by class-aware IoU against
the reference's; a GPU letterbox is also compared with the CPU one (`input_max_abs`, within
`GPU_LETTERBOX_TOLERANCE`); and, where the data has labels, mAP50 / mAP50-95 against ground truth. Where the reference
finds nothing, detections are not measured ("no reference detections"), and a shape passes on what was.
An end-to-end or RT-DETR output `(B, N, 6)` is a ranked top-k, whose rows near-equal scores reorder: it is
compared as detections only.
When the model under test is the reference itself (onnxruntime on the CPU running the reference ONNX),
nothing is compared, since nothing could differ: the result says `reference` and reports only mAP.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np

from runner.config import Thresholds, ValidateConfig
from runner.data import Sample
from runner.metrics import match_detections, mean_average_precision, tensor_metrics
from runner.processing import RANKED, postprocess, preprocess
from runner.results import DetectionMetrics, ShapeCheck, TensorMetrics, ValidateResult

log = logging.getLogger(__name__)


def headline_shape(profile: list[list[int]], imgsz: list[int]) -> list[int] | None:
    """Where a row's headline mAP is measured: the static variant's shape, `imgsz` at the profile's smallest batch;
    None where the profile does not hold it."""
    lo, _, hi = profile
    shape = [lo[0], 3, *imgsz]
    return shape if all(a <= s <= b for a, s, b in zip(lo, shape, hi)) else None


def shapes_to_check(profile: list[list[int]], stride: int, non_square: bool,
                    imgsz: list[int]) -> list[tuple[str, list[int]]]:
    """The shapes to check inside a (min, opt, max) profile: its one shape when static; else min, opt,
    max, one non-square shape on the stride and the headline shape (`headline_shape`, labelled `imgsz`)."""
    lo, mid, hi = (list(s) for s in profile)
    if lo == hi:
        return [("static", mid)]
    shapes = [("min", lo), ("opt", mid), ("max", hi)]
    if headline := headline_shape(profile, imgsz):
        shapes.append(("imgsz", headline))
    if non_square:
        h = max(-(-lo[2] // stride) * stride, (hi[2] * 3 // 4) // stride * stride)  # on the stride, inside the range
        candidate = [mid[0], 3, h, hi[3] // stride * stride]
        if all(a <= c <= b for a, c, b in zip(lo, candidate, hi)) and candidate[2] != candidate[3]:
            shapes.append(("non_square", candidate))
    seen, unique = set(), []
    for label, shape in shapes:
        if tuple(shape) not in seen:
            seen.add(tuple(shape))
            unique.append((label, shape))
    return unique


def off_stride(shape: list[int], stride: int) -> str | None:
    """Why a model cannot be validated at `shape`: its H or W is not a multiple of the stride, so the feature maps
    of its levels do not line up (onnxruntime refuses it). None where it can."""
    off = [f"{dim} {size}" for dim, size in zip("HW", shape[2:]) if size % stride]
    return f"{' and '.join(off)} not a multiple of the stride {stride}" if off else None


def _batches(samples: list[Sample], batch: int):
    """(chunk, real): `batch` samples at a time, the last chunk padded with its final sample to fill the input's
    batch; only its first `real` count, so no image is scored twice."""
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        yield chunk + [chunk[-1]] * (batch - len(chunk)), len(chunk)


NO_REFERENCE_DETECTIONS = "no reference detections"
TENSORS_NOT_COMPARED = "tensors not compared (an end-to-end output is a ranked top-k)"
REASON_CHARS = 500  # a shape's skip or failure reason
GPU_LETTERBOX_TOLERANCE = 1 / 255 + 2 ** -10  # one level of the resize's rounding, plus an fp16 input's rounding


def _detection_metrics(det_test: list[np.ndarray], det_ref: list[np.ndarray], match_iou: float
                       ) -> DetectionMetrics | None:
    """Detections of the model under test matched to the reference's; None when the reference has none."""
    if not any(len(d) for d in det_ref):
        return None
    matched = [match_detections(t, r, match_iou) for t, r in zip(det_test, det_ref)]
    tp = sum(m["matched"] for m in matched)
    n_test, n_ref = sum(len(d) for d in det_test), sum(len(d) for d in det_ref)
    precision, recall = tp / n_test if n_test else 0.0, tp / n_ref
    hits = [m for m in matched if m["matched"]]
    return DetectionMetrics(precision=precision, recall=recall,
                            f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                            mean_iou=float(np.mean([m["mean_iou"] for m in hits] or [0.0])),
                            score_delta=float(np.mean([m["score_delta"] for m in hits] or [0.0])),
                            n_test=n_test, n_ref=n_ref)


def validate_shape(runner, chain, reference, samples: list[Sample], shape: list[int], thresholds: Thresholds,
                   v: ValidateConfig, names: list[str] = ()) -> ShapeCheck:
    """Metrics of one shape. `reference=None`: the runner is the reference (mAP only). A reference that
    cannot run at this shape makes it `skipped`; a model under test that cannot, `failed`; one that runs but
    misses a limit, `inaccurate`. `names`: the class names, for the per-class AP deltas."""
    hw, head = (shape[2], shape[3]), chain.head
    outs_test, outs_ref, det_test, det_ref, gts, input_max_abs = {}, {}, [], [], [], None
    for chunk, real in _batches(samples, shape[0]):
        frames = [s.image for s in chunk]
        blob, boxes = preprocess(frames, hw, head=head)
        if reference is not None:
            try:
                ref = reference.infer(blob)
            except Exception as exc:  # the reference's own limit at this shape
                return ShapeCheck(shape, "skipped", reason=f"reference failed: {_message(exc)}")
        try:
            test = runner.infer(blob)
            dets = chain.detect(runner, frames, hw, boxes)
        except Exception as exc:
            status = "skipped" if reference is None else "failed"
            return ShapeCheck(shape, status, reason=_message(exc))
        det_test += dets[:real]
        deviation = chain.input_deviation(runner, blob)
        if deviation is not None:
            input_max_abs = max(input_max_abs or 0.0, deviation)
        if reference is not None:
            for name, value in ref.items():
                outs_ref.setdefault(name, []).append(value)
                outs_test.setdefault(name, []).append(test[name])
            det_ref += postprocess(ref[next(iter(ref))], boxes, v.conf, v.nms_iou, v.max_det, head)[:real]
        gts += [(s.gt_cls, s.gt_boxes) for s in chunk[:real]]
    labelled = [i for i, g in enumerate(gts) if g[0] is not None]
    accuracy = _accuracy([det_test[i] for i in labelled], [gts[i] for i in labelled])
    check = ShapeCheck(shape, "reference", map50=accuracy.get("map50"), map50_95=accuracy.get("map50_95"),
                       input_max_abs=input_max_abs)
    if reference is None:
        return check
    if labelled:
        ref_accuracy = _accuracy([det_ref[i] for i in labelled], [gts[i] for i in labelled])
        check.ref_map50_95 = ref_accuracy.get("map50_95")
        check.class_ap_delta = {_name(names, c): accuracy["per_class"].get(c, 0.0) - ap
                                for c, ap in ref_accuracy.get("per_class", {}).items()}
    if head not in RANKED:  # a top-k output's rows are ranked, and near-equal scores reorder them: detections only
        check.tensors = {name: TensorMetrics(**tensor_metrics(np.concatenate(outs_test[name]),
                                                              np.concatenate(outs_ref[name]),
                                                              thresholds.atol, thresholds.rtol)) for name in outs_ref}
    check.detections = d = _detection_metrics(det_test, det_ref, v.match_iou)
    if not check.tensors and d is None:
        check.status, check.reason = "skipped", f"nothing compared: {NO_REFERENCE_DETECTIONS}, and an end-to-end " \
                                                f"output is compared as detections only"
        return check
    misses = _misses(check, thresholds)
    check.status = "inaccurate" if misses else "passed"
    check.failed_metrics = list(misses)
    check.reason = "; ".join(misses.values()) or (NO_REFERENCE_DETECTIONS if d is None else None)
    return check


def _accuracy(dets: list[np.ndarray], gts: list) -> dict:
    return mean_average_precision(dets, gts) if gts else {}


def _name(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def _misses(check: ShapeCheck, t: Thresholds) -> dict[str, str]:
    """The accuracy limits a shape missed: metric -> what was measured against what was allowed."""
    misses, d = {}, check.detections
    if check.tensors and check.rel_l2 > t.max_rel_l2:
        misses["rel-L2"] = f"rel-L2 {check.rel_l2:.2e} > {t.max_rel_l2:.0e}"
    if d is not None and d.f1 < t.min_det_f1:
        misses["det F1"] = f"det F1 {d.f1:.3f} < {t.min_det_f1}"
    if check.map_drop is not None and check.map_drop > t.max_map_drop:
        misses["mAP50-95"] = (f"mAP50-95 {check.map50_95:.3f} vs reference {check.ref_map50_95:.3f}: drop "
                              f"{check.map_drop:.3f} > {t.max_map_drop}")
    if check.input_max_abs is not None and check.input_max_abs > GPU_LETTERBOX_TOLERANCE:
        misses["GPU letterbox"] = _letterbox_miss(check.input_max_abs)
    return misses


def validate(runner, chain, reference, samples: list[Sample], shapes: list[tuple[str, list[int]]],
             thresholds: Thresholds, v: ValidateConfig, reference_provider: str, skipped_images: list[str],
             names: list[str] = (), headline: list[int] | None = None, stride: int = 32,
             data_notes: list[str] = ()) -> ValidateResult:
    """Validate at every shape, detections through `chain`: passes when every shape the reference could run
    passes; `inaccurate` when they all ran but one missed a limit. `reference=None` when the model under test is
    the reference itself. `headline`: the shape of the headline mAP. A shape skipped off the `stride` says so. A
    pass names what it did not check: each shape skipped, then `data_notes` (what the data could not give), then
    what it did not measure."""
    head = chain.head
    per_shape = {}
    for label, shape in shapes:
        log.info("validate: %s %s on %d images...", label, shape, len(samples))
        per_shape[label] = s = validate_shape(runner, chain, reference, samples, shape, thresholds, v, names)
        if s.status == "skipped" and off_stride(shape, stride):
            s.reason = f"{off_stride(shape, stride)}: {s.reason}"
        scores = f"mAP50-95 {s.map50_95:.3f}" if s.map50_95 is not None else "no labels"
        if s.map_drop is not None:
            scores += f" (reference {s.ref_map50_95:.3f})"
        if s.tensors or s.detections:
            tensors = f"rel-L2 {s.rel_l2:.2e}" if s.tensors else TENSORS_NOT_COMPARED
            detections = f"det F1 {s.detections.f1:.3f}" if s.detections else NO_REFERENCE_DETECTIONS
            log.info("validate: %s %s: %s, %s, %s", label, s.status, tensors, detections, scores)
        else:
            log.info("validate: %s %s: %s", label, s.status, s.reason or scores)
    checked = {k: s for k, s in per_shape.items() if s.status != "skipped"}
    if not checked:
        status = "unchecked"
    elif reference is None:
        status = "reference"
    else:
        outcomes = {s.status for s in checked.values()}
        status = "failed" if "failed" in outcomes else "inaccurate" if "inaccurate" in outcomes else "passed"
    reason = None
    if status in ("failed", "inaccurate"):
        reason = "; ".join(f"{k} {s.shape}: {s.reason}" for k, s in checked.items() if s.status == status)
    elif status == "unchecked":
        reason = "no shape could be checked: " + "; ".join(f"{k}: {s.reason}" for k, s in per_shape.items())
    elif status in ("passed", "reference"):
        notes = [f"not validated: {k} {s.shape} ({s.reason})" for k, s in per_shape.items() if s.status == "skipped"]
        notes += data_notes
        unmeasured = [k for k, s in checked.items() if s.detections is None]
        if status == "passed" and unmeasured:
            notes.append(f"detections not measured, {NO_REFERENCE_DETECTIONS}: {', '.join(unmeasured)}")
        if status == "passed" and head in RANKED:
            notes.append(TENSORS_NOT_COMPARED)
        reason = "; ".join(notes) or None
    missed = list(dict.fromkeys(m for s in checked.values() for m in s.failed_metrics))
    return ValidateResult(status=status, shapes=per_shape, thresholds=asdict(thresholds),
                          reference_provider=reference_provider, images=len(samples),
                          skipped_images=list(skipped_images), reason=reason, head=head, failed_metrics=missed,
                          headline_shape=headline)


def _letterbox_miss(value: float) -> str:
    return f"GPU letterbox differs from the CPU one by {value:.2e} (limit {GPU_LETTERBOX_TOLERANCE:.2e})"


def _message(exc: BaseException) -> str:
    """An exception's message on one line (onnxruntime says which dim it refused on the next lines), or its type
    where it says nothing, up to REASON_CHARS."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:REASON_CHARS]
