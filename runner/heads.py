"""The heads runner decodes, known from what the model says it is; every other head is refused in one line.

A checkpoint says it with its model class and its last layer, an ONNX with ultralytics' metadata `task` and
`head` (both exporters write them). An output shape alone never picks the decode: a YOLO end-to-end head and
RT-DETR's decoder both give `(B, N, 6)`, in pixels and in 0-1 of a stretched image.
- YOLO: a `DetectionModel` whose head is `Detect` or `v10Detect` (task detect). Its output's shape picks
  one-to-many (NMS) or end-to-end (`processing.head_format`).
- RT-DETR: an `RTDETRDetectionModel`, head `RTDETRDecoder`: `(B, N, 6)` only.
Segment, pose, OBB, classify and the other ultralytics tasks carry boxes (or none) that a detector's metrics
would score wrong, so they are refused before any export.
"""
from __future__ import annotations

import onnx

from runner.processing import RTDETR, UnknownHead, head_format

YOLO_HEADS = ("Detect", "v10Detect")
RTDETR_HEAD = "RTDETRDecoder"
MODELS = {"DetectionModel": YOLO_HEADS, "RTDETRDetectionModel": (RTDETR_HEAD,)}  # model class -> its heads
DECODED = "runner decodes detection heads only (YOLO Detect / v10Detect, RT-DETR's RTDETRDecoder)"


class UnsupportedHead(ValueError):
    """A model whose head runner cannot decode; the message is one line naming the task and the head."""


def check_model(model) -> str:
    """The head of an ultralytics model (as a checkpoint holds it) that runner decodes, or UnsupportedHead
    naming its class, task and head."""
    from ultralytics.nn.tasks import guess_model_task

    kind, head = type(model).__name__, type(model.model[-1]).__name__
    if head not in MODELS.get(kind, ()):
        raise UnsupportedHead(f"holds a {kind} (task {_task(guess_model_task, model)}, head {head}); {DECODED}")
    return head


def _task(guess, model) -> str:
    try:
        return guess(model)
    except SyntaxError:  # ultralytics' own "could not guess" (it says so with a SyntaxError)
        return "unknown"


def onnx_metadata(path: str) -> dict:
    """An ONNX's metadata as ultralytics writes it (str values)."""
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def decode(metadata: dict, output: dict, num_classes: int | None) -> str:
    """The decode of an ONNX's first `output` ({name, shape}) from its ultralytics metadata: task detect and a head
    runner knows, then a layout that head gives. Raises UnsupportedHead in one line naming what is wrong."""
    task, head = metadata.get("task"), metadata.get("head")
    if task != "detect" or head not in YOLO_HEADS + (RTDETR_HEAD,):
        said = f"task {task}, head {head}" if task or head else "no ultralytics metadata (task, head)"
        raise UnsupportedHead(f"the ONNX says {said}; {DECODED}")
    shape = list(output["shape"])
    if head == RTDETR_HEAD:
        if len(shape) != 3 or shape[2] != 6:
            raise UnsupportedHead(f"{output['name']}: output shape {shape} is not RT-DETR's (B, N, 6) "
                                  f"[cx, cy, w, h, score, class]")
        return RTDETR
    try:
        return head_format(shape, num_classes)
    except UnknownHead as exc:
        raise UnsupportedHead(f"{output['name']}: {head} head: {exc}") from None

