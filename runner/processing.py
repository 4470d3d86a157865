"""Pre- and postprocessing shared by every backend (numpy + OpenCV, no torch).

Letterbox and box scaling follow ultralytics' `LetterBox` and `ops.scale_boxes`. Three decodes, which
`runner.heads` picks from what the model says it is:
- YOLO one-to-many `(B, 4 + nc, anchors)`: class-aware NMS, as `ops.non_max_suppression` (single label per box);
- YOLO end-to-end `(B, N, 6)` [x1, y1, x2, y2, score, class] in input pixels (an NMS-free head, or an export with
  NMS inside): by its score alone;
- RT-DETR `(B, N, 6)` [cx, cy, w, h] normalised to 0-1, score, class: by its score alone, on an image stretched
  to the input (ultralytics' `LetterBox(scale_fill=True)`, as `RTDETRPredictor` fits it), never letterboxed.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = (114, 114, 114)
INT8_MAX = 127  # symmetric int8: a range r maps to [-127, 127] levels, 127 / r per unit
MAX_NMS = 30000
ONE2MANY, END2END, RTDETR = "one2many", "end2end", "rtdetr"  # the decodes
RANKED = (END2END, RTDETR)  # a top-k output: near-equal scores reorder its rows, so it is compared as detections


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network input: (x, y) scale gains and (left, top) padding."""
    gain: tuple[float, float]
    pad: tuple[int, int]
    orig_shape: tuple[int, int]  # h, w of the source image


def fit(h: int, w: int, new_shape: tuple[int, int], auto: bool = False, stride: int = 32, scaleup: bool = True
        ) -> tuple[tuple[int, int], tuple[int, int, int, int], Letterbox]:
    """The letterbox geometry of an h x w image: the resized (w, h), the padding (top, bottom, left, right),
    and the `Letterbox` that maps boxes back. Both the CPU and the GPU preprocessing use it."""
    r = min(new_shape[0] / h, new_shape[1] / w)
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    return new_unpad, (top, bottom, left, right), Letterbox((new_unpad[0] / w, new_unpad[1] / h), (left, top), (h, w))


def stretch_fit(h: int, w: int, new_shape: tuple[int, int]
                ) -> tuple[tuple[int, int], tuple[int, int, int, int], Letterbox]:
    """`fit`'s geometry for RT-DETR: the h x w image resized to `new_shape` (h, w) on each axis, no padding."""
    return (new_shape[1], new_shape[0]), (0, 0, 0, 0), Letterbox((new_shape[1] / w, new_shape[0] / h), (0, 0), (h, w))


def geometry(head: str):
    """How a decode's input is fitted: `stretch_fit` for RT-DETR, else `fit` (letterbox)."""
    return stretch_fit if head == RTDETR else fit


def stretch(img: np.ndarray, new_shape: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resize to `new_shape` (h, w) without keeping the aspect ratio, as RT-DETR's predictor does."""
    new_size, _, box = stretch_fit(*img.shape[:2], new_shape)
    return cv2.resize(img, new_size, interpolation=cv2.INTER_LINEAR) if new_size != img.shape[1::-1] else img, box


def letterbox(img: np.ndarray, new_shape: tuple[int, int], auto: bool = False, stride: int = 32,
              scaleup: bool = True) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio and pad to `new_shape` (h, w); `auto` pads only to a stride multiple."""
    h, w = img.shape[:2]
    new_unpad, (top, bottom, left, right), box = fit(h, w, new_shape, auto, stride, scaleup)
    if (w, h) != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=PAD_VALUE)
    return img, box


def to_blob(images: list[np.ndarray]) -> np.ndarray:
    """BGR HWC uint8 images of one size -> float32 NCHW RGB in [0, 1]."""
    return cv2.dnn.blobFromImages(images, scalefactor=1 / 255.0, swapRB=True)


def quantize_input(blob: np.ndarray, levels: float) -> np.ndarray:
    """An input blob in int8 at `levels` per unit (127 / the input's range): round(v * levels), clamped to
    [-128, 127], as TensorRT quantizes and the GPU letterbox's int8 kernel writes."""
    return np.clip(np.rint(blob.astype(np.float32) * np.float32(levels)), -128, 127).astype(np.int8)


def preprocess(images: list[np.ndarray], hw: tuple[int, int], auto: bool = False, stride: int = 32,
               head: str = ONE2MANY) -> tuple[np.ndarray, list[Letterbox]]:
    """Letterbox (stretch, for the RT-DETR `head`) each image to `hw`, then normalise, BGR->RGB and HWC->CHW into
    one batch."""
    boxed = [stretch(im, hw) if head == RTDETR else letterbox(im, hw, auto=auto, stride=stride) for im in images]
    return to_blob([b[0] for b in boxed]), [b[1] for b in boxed]


def scale_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """xyxy boxes in network-input pixels -> source-image pixels, clipped to the image."""
    out = boxes.copy()
    for axis, size in ((0, lb.orig_shape[1]), (1, lb.orig_shape[0])):  # x1, x2 then y1, y2: views, in place
        coords = out[:, axis::2]
        coords -= lb.pad[axis]
        coords /= lb.gain[axis]
        np.minimum(np.maximum(coords, 0, out=coords), size, out=coords)
    return out


class UnknownHead(ValueError):
    """An output shape that neither decoder knows."""


def head_format(shape: list, num_classes: int | None) -> str:
    """one2many for `(B, 4 + nc, anchors)`, end2end for `(B, N, 6)`; dims may be symbolic (str). With the class
    count unknown, any fixed channel count above 4 is taken as 4 + nc. Raises UnknownHead naming the shape."""
    dims = list(shape)
    if len(dims) == 3:
        if num_classes and dims[1] == 4 + num_classes:
            return ONE2MANY
        if dims[2] == 6:
            return END2END
        if not num_classes and isinstance(dims[1], int) and dims[1] > 4:
            return ONE2MANY
    expected = f"4 + nc = {4 + num_classes}" if num_classes else "4 + nc"
    raise UnknownHead(f"output shape {dims} is neither one-to-many (B, {expected}, anchors) nor end-to-end "
                      f"(B, N, 6)")


def decode_end2end(pred: np.ndarray, conf: float = 0.25, max_det: int = 300) -> list[np.ndarray]:
    """(B, N, 6) end-to-end output, best first -> per image (n, 6) [x1, y1, x2, y2, score, cls] above `conf`."""
    results = []
    for p in np.asarray(pred, dtype=np.float32):
        p = p[p[:, 4] > conf]
        results.append(p[np.argsort(-p[:, 4], kind="stable")][:max_det])
    return results


def decode_rtdetr(pred: np.ndarray, boxes: list[Letterbox], conf: float = 0.25, max_det: int = 300
                  ) -> list[np.ndarray]:
    """(B, N, 6) RT-DETR output of stretched images, best first -> per image (n, 6) [x1, y1, x2, y2, score, cls]
    above `conf` in source pixels, as `RTDETRPredictor.postprocess` makes them; then clipped to the image, as
    ultralytics' validator clips every box."""
    results = []
    for p, lb in zip(np.asarray(pred, dtype=np.float32), boxes):
        p = p[p[:, 4] > conf][:max_det]
        h, w = lb.orig_shape
        xyxy = np.concatenate([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1) * np.float32([w, h, w, h])
        xyxy[:, [0, 2]], xyxy[:, [1, 3]] = xyxy[:, [0, 2]].clip(0, w), xyxy[:, [1, 3]].clip(0, h)
        results.append(np.concatenate([xyxy, p[:, 4:6]], 1))
    return results


def nms(xywh: np.ndarray, scores: np.ndarray, cls: np.ndarray, conf: float, iou: float, max_det: int
        ) -> np.ndarray:
    """Class-aware NMS over candidate boxes (cx, cy, w, h) -> (n, 6) [x1, y1, x2, y2, score, cls], best first."""
    if len(scores) > MAX_NMS:
        top = np.argsort(-scores)[:MAX_NMS]
        xywh, cls, scores = xywh[top], cls[top], scores[top]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    idx = cv2.dnn.NMSBoxesBatched(np.concatenate([xyxy[:, :2], xywh[:, 2:]], 1).astype(np.float64).tolist(),
                                  scores.tolist(), cls.tolist(), conf, iou, top_k=max_det) if len(scores) else []
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)[:max_det]
    return np.concatenate([xyxy[idx], scores[idx, None], cls[idx, None].astype(np.float32)], 1)


def decode(pred: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[np.ndarray]:
    """(B, 4 + nc, anchors) raw head output -> per image (n, 6) [x1, y1, x2, y2, score, cls] after NMS."""
    results = []
    for p in np.asarray(pred, dtype=np.float32):
        p = p.T  # anchors, 4 + nc
        cls = p[:, 4:].argmax(1)
        scores = p[np.arange(len(p)), 4 + cls]
        keep = scores > conf
        results.append(nms(p[keep, :4], scores[keep], cls[keep], conf, iou, max_det))
    return results


def decode_maps(maps: list[np.ndarray], reg_max: int, input_hw: tuple[int, int]) -> np.ndarray:
    """A YOLO Detect head's per-level maps [box_0, class_0, box_1, ...], `(B, 4 * reg_max, h, w)` and
    `(B, nc, h, w)` -> the `(B, 4 + nc, anchors)` its graph's decode gives, as ultralytics' Detect makes it: per
    side the DFL's expectation over its bins (the distance itself where reg_max is 1), distances from each cell's
    centre, xywh times the level's stride (the input's height over the map's), class sigmoids."""
    boxes, classes, centres, strides = [], [], [], []
    for box, cls in zip(maps[::2], maps[1::2]):
        b, _, h, w = box.shape
        boxes.append(box.reshape(b, 4, reg_max, h * w))
        classes.append(cls.reshape(b, cls.shape[1], h * w))
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5,
                             indexing="ij")
        centres.append(np.stack([xs.ravel(), ys.ravel()]))
        strides.append(np.full(h * w, input_hw[0] / h, np.float32))
    box = np.concatenate(boxes, -1).astype(np.float32)
    if reg_max > 1:
        weights = np.exp(box - box.max(2, keepdims=True))
        bins = np.arange(reg_max, dtype=np.float32)[:, None]
        box = (weights * bins).sum(2, keepdims=True) / weights.sum(2, keepdims=True)
    dist, centre = box[:, :, 0], np.concatenate(centres, -1)
    left_top, right_bottom = centre - dist[:, :2], centre + dist[:, 2:]
    xywh = np.concatenate([(left_top + right_bottom) / 2, right_bottom - left_top], 1) * np.concatenate(strides)
    scores = 1 / (1 + np.exp(-np.concatenate(classes, -1).astype(np.float32)))
    return np.concatenate([xywh, scores], 1)


def scale_all(dets: list[np.ndarray], boxes: list[Letterbox]) -> list[np.ndarray]:
    """Detections in network-input pixels -> each source image's pixels, in place."""
    for d, lb in zip(dets, boxes):
        d[:, :4] = scale_boxes(d[:, :4], lb)
    return dets


def postprocess(pred: np.ndarray, boxes: list[Letterbox], conf: float = 0.25, iou: float = 0.7,
                max_det: int = 300, head: str = ONE2MANY) -> list[np.ndarray]:
    """Decode (with NMS for a one-to-many head) and scale back to each source image."""
    if head == RTDETR:
        return decode_rtdetr(pred, boxes, conf, max_det)
    dets = decode_end2end(pred, conf, max_det) if head == END2END else decode(pred, conf, iou, max_det)
    return scale_all(dets, boxes)
