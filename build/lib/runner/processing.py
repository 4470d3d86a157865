"""Pre- and postprocessing shared by every backend (numpy + OpenCV, no torch).

Letterbox and box scaling follow ultralytics' `LetterBox` and `ops.scale_boxes`; the decode of
`(B, 4 + nc, anchors)` and class-aware NMS follow `ops.non_max_suppression` (single label per box).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = (114, 114, 114)
MAX_NMS = 30000


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network input: (x, y) scale gains and (left, top) padding."""
    gain: tuple[float, float]
    pad: tuple[int, int]
    orig_shape: tuple[int, int]  # h, w of the source image


def letterbox(img: np.ndarray, new_shape: tuple[int, int], auto: bool = False, stride: int = 32,
              scaleup: bool = True) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio and pad to `new_shape` (h, w); `auto` pads only to a stride multiple."""
    h, w = img.shape[:2]
    r = min(new_shape[0] / h, new_shape[1] / w)
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w, h) != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=PAD_VALUE)
    return img, Letterbox((new_unpad[0] / w, new_unpad[1] / h), (left, top), (h, w))


def to_blob(images: list[np.ndarray]) -> np.ndarray:
    """BGR HWC uint8 images of one size -> float32 NCHW RGB in [0, 1]."""
    return cv2.dnn.blobFromImages(images, scalefactor=1 / 255.0, swapRB=True)


def preprocess(images: list[np.ndarray], hw: tuple[int, int], auto: bool = False, stride: int = 32
               ) -> tuple[np.ndarray, list[Letterbox]]:
    """Letterbox each image to `hw`, then normalise, BGR->RGB and HWC->CHW into one batch."""
    boxed = [letterbox(im, hw, auto=auto, stride=stride) for im in images]
    return to_blob([b[0] for b in boxed]), [b[1] for b in boxed]


def scale_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """xyxy boxes in network-input pixels -> source-image pixels, clipped to the image."""
    out = boxes.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - lb.pad[0]) / lb.gain[0]
    out[:, [1, 3]] = (out[:, [1, 3]] - lb.pad[1]) / lb.gain[1]
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, lb.orig_shape[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, lb.orig_shape[0])
    return out


def decode(pred: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[np.ndarray]:
    """(B, 4 + nc, anchors) raw head output -> per image (n, 6) [x1, y1, x2, y2, score, cls] after NMS."""
    results = []
    for p in np.asarray(pred, dtype=np.float32):
        p = p.T  # anchors, 4 + nc
        cls = p[:, 4:].argmax(1)
        scores = p[np.arange(len(p)), 4 + cls]
        keep = scores > conf
        p, cls, scores = p[keep], cls[keep], scores[keep]
        if len(scores) > MAX_NMS:
            top = np.argsort(-scores)[:MAX_NMS]
            p, cls, scores = p[top], cls[top], scores[top]
        xywh = p[:, :4]
        xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        idx = cv2.dnn.NMSBoxesBatched(np.concatenate([xyxy[:, :2], xywh[:, 2:]], 1).astype(np.float64).tolist(),
                                      scores.tolist(), cls.tolist(), conf, iou, top_k=max_det) if len(p) else []
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)[:max_det]
        results.append(np.concatenate([xyxy[idx], scores[idx, None], cls[idx, None].astype(np.float32)], 1))
    return results


def postprocess(pred: np.ndarray, boxes: list[Letterbox], conf: float = 0.25, iou: float = 0.7,
                max_det: int = 300) -> list[np.ndarray]:
    """Decode + NMS + scale back to each source image."""
    dets = decode(pred, conf, iou, max_det)
    for d, lb in zip(dets, boxes):
        d[:, :4] = scale_boxes(d[:, :4], lb)
    return dets
