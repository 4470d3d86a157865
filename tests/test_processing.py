"""Pre/postprocessing against ultralytics itself, on the wheel's real images and the real model's output."""
from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from ultralytics.data.augment import LetterBox
from ultralytics.utils import ASSETS
from ultralytics.utils import ops
from ultralytics.utils.nms import non_max_suppression

from runner.processing import (PAD_VALUE, decode, fit, letterbox, postprocess, preprocess,
                               scale_boxes, to_blob)

WHEEL_IMAGES = ["bus.jpg", "zidane.jpg"]  # 810x1080 portrait, 1280x720 landscape
TARGETS = [(640, 640), (480, 640), (640, 480), (320, 320), (384, 640), (1280, 1280)]
CONF, IOU, MAX_DET = 0.25, 0.7, 300


@pytest.fixture(scope="module", params=WHEEL_IMAGES)
def wheel_image(request) -> np.ndarray:
    img = cv2.imread(str(ASSETS / request.param))
    assert img is not None, f"{request.param} missing from the ultralytics wheel"
    return img


@pytest.mark.parametrize("shape", TARGETS, ids=[f"{h}x{w}" for h, w in TARGETS])
def test_letterbox_full_pad_equals_ultralytics(wheel_image, shape):
    ours, lb = letterbox(wheel_image, shape, auto=False)
    theirs = LetterBox(new_shape=shape, auto=False, stride=32)(image=wheel_image.copy())
    assert ours.shape == (*shape, 3)
    assert ours.dtype == theirs.dtype == np.uint8
    assert np.array_equal(ours, theirs)
    assert lb.orig_shape == wheel_image.shape[:2]
    # the padding really is the pad colour, and the image sits inside it
    left, top = lb.pad
    if top:
        assert (ours[:top] == PAD_VALUE[0]).all()
    if left:
        assert (ours[:, :left] == PAD_VALUE[0]).all()


@pytest.mark.parametrize("shape", TARGETS, ids=[f"{h}x{w}" for h, w in TARGETS])
def test_letterbox_auto_stride_aligned_equals_ultralytics(wheel_image, shape):
    ours, lb = letterbox(wheel_image, shape, auto=True, stride=32)
    theirs = LetterBox(new_shape=shape, auto=True, stride=32)(image=wheel_image.copy())
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    h, w = ours.shape[:2]
    assert h % 32 == 0 and w % 32 == 0
    assert h <= shape[0] and w <= shape[1]
    # only the stride remainder is padded: less than one stride beyond the resized image on each axis
    unpad_w, unpad_h = (round(g * s) for g, s in zip(lb.gain, wheel_image.shape[1::-1]))
    assert 0 <= h - unpad_h < 32 and 0 <= w - unpad_w < 32


def test_letterbox_on_generated_images_of_every_aspect(held_out_images):
    paths = sorted(held_out_images.iterdir())[:12]
    sizes = set()
    for path in paths:
        img = cv2.imread(str(path))
        sizes.add(img.shape[:2])
        for shape in ((640, 640), (480, 640)):
            ours, _ = letterbox(img, shape)
            assert np.array_equal(ours, LetterBox(new_shape=shape)(image=img.copy())), (path.name, shape)
    assert len(sizes) >= 2  # portrait, landscape and square images are really exercised


def test_to_blob_equals_manual_conversion(wheel_image):
    a, _ = letterbox(wheel_image, (640, 640))
    b, _ = letterbox(wheel_image[::-1].copy(), (640, 640))
    blob = to_blob([a, b])
    manual = np.stack([np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)) / 255.0 for im in (a, b)])
    assert blob.dtype == np.float32
    assert blob.shape == (2, 3, 640, 640)
    np.testing.assert_allclose(blob, manual.astype(np.float32), rtol=0, atol=1e-7)
    assert blob.min() >= 0.0 and blob.max() <= 1.0
    # channel 0 is red: BGR -> RGB really happened
    assert np.array_equal(np.round(blob[0, 0] * 255).astype(np.uint8), a[..., 2])


def test_preprocess_batches_letterboxed_images(wheel_image):
    blob, boxes = preprocess([wheel_image, wheel_image], (480, 640))
    assert blob.shape == (2, 3, 480, 640) and blob.dtype == np.float32
    assert np.array_equal(blob[0], blob[1])
    single, _ = letterbox(wheel_image, (480, 640))
    np.testing.assert_allclose(blob[0], to_blob([single])[0], rtol=0, atol=0)
    assert boxes[0] == boxes[1]


@pytest.mark.parametrize("shape", TARGETS, ids=[f"{h}x{w}" for h, w in TARGETS])
def test_scale_boxes_equals_ultralytics(wheel_image, shape):
    _, lb = letterbox(wheel_image, shape)
    rng = np.random.default_rng(0)
    xy = rng.uniform(-20, [shape[1], shape[0]], (50, 2))
    wh = rng.uniform(1, 300, (50, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    theirs = ops.scale_boxes(shape, torch.from_numpy(boxes.copy()), wheel_image.shape[:2]).numpy()
    np.testing.assert_allclose(scale_boxes(boxes, lb), theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", TARGETS, ids=[f"{h}x{w}" for h, w in TARGETS])
def test_fit_is_the_geometry_the_letterbox_draws(wheel_image, shape):
    """The GPU letterbox gets its geometry from `fit`: the CPU letterbox is exactly the resize at fit's size,
    placed at fit's padding, in the pad colour elsewhere."""
    (new_w, new_h), (top, bottom, left, right), box = fit(*wheel_image.shape[:2], shape)
    ours, lb = letterbox(wheel_image, shape)
    assert lb == box and (top + new_h + bottom, left + new_w + right) == shape
    inner = cv2.resize(wheel_image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(ours[top:top + new_h, left:left + new_w], inner)
    outside = np.ones(shape, bool)
    outside[top:top + new_h, left:left + new_w] = False
    assert (ours[outside] == PAD_VALUE[0]).all()


def test_decode_of_nothing_above_threshold_is_empty():
    pred = np.zeros((2, 7, 8400), np.float32)
    pred[:, 4:] = 0.1
    dets = decode(pred, conf=0.25)
    assert len(dets) == 2
    assert all(d.shape == (0, 6) for d in dets)


def _ultralytics_postprocess(pred: np.ndarray, hw: tuple[int, int], orig_shapes: list) -> list[np.ndarray]:
    out = non_max_suppression(torch.from_numpy(pred.copy()), conf_thres=CONF, iou_thres=IOU, max_det=MAX_DET)
    dets = []
    for d, orig in zip(out, orig_shapes):
        d = d.clone()
        d[:, :4] = ops.scale_boxes(hw, d[:, :4], orig)
        dets.append(d.numpy())
    return dets


def _sorted(d: np.ndarray) -> np.ndarray:
    return d[np.lexsort((d[:, 0], d[:, 1], -d[:, 4]))]


@pytest.mark.parametrize("dynamic,hw", [(False, (640, 640)), (True, (480, 640)), (True, (320, 320))],
                         ids=["static-640x640", "dynamic-480x640", "dynamic-320x320"])
def test_postprocess_matches_ultralytics_on_real_model_output(export_model, held_out_images, dynamic, hw):
    onnx = export_model("ultralytics", dynamic=dynamic)
    session = ort.InferenceSession(onnx.path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = [cv2.imread(str(p)) for p in sorted(held_out_images.iterdir())[:10]]
    total = 0
    for img in images:
        blob, boxes = preprocess([img], hw)
        pred = session.run(None, {name: blob})[0]
        assert pred.shape[:2] == (1, 7)  # 4 box + 3 classes
        ours = postprocess(pred, boxes, CONF, IOU, MAX_DET)[0]
        theirs = _ultralytics_postprocess(pred, hw, [img.shape[:2]])[0]
        assert ours.shape == theirs.shape, (ours, theirs)
        ours, theirs = _sorted(ours), _sorted(theirs)
        np.testing.assert_allclose(ours[:, :4], theirs[:, :4], atol=1e-2, rtol=0)
        np.testing.assert_allclose(ours[:, 4], theirs[:, 4], atol=1e-6, rtol=0)
        assert np.array_equal(ours[:, 5], theirs[:, 5])
        # in the source image's pixels
        assert (ours[:, [0, 2]] <= img.shape[1]).all() and (ours[:, [1, 3]] <= img.shape[0]).all()
        total += len(ours)
    assert total >= len(images), "the default model should find shapes in its own held-out split"


def test_postprocess_batch_equals_per_image(export_model, held_out_images):
    onnx = export_model("ultralytics", dynamic=True)
    session = ort.InferenceSession(onnx.path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = [cv2.imread(str(p)) for p in sorted(held_out_images.iterdir())[:4]]
    blob, boxes = preprocess(images, (640, 640))
    pred = session.run(None, {name: blob})[0]
    batched = postprocess(pred, boxes, CONF, IOU, MAX_DET)
    theirs = _ultralytics_postprocess(pred, (640, 640), [im.shape[:2] for im in images])
    assert len(batched) == len(theirs) == 4
    for ours, ref in zip(batched, theirs):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(_sorted(ours)[:, :4], _sorted(ref)[:, :4], atol=1e-2, rtol=0)


def test_quantize_input_rounds_to_the_nearest_level_and_clamps():
    """An int8 input at 127 levels per unit of its range: halves to even (as rintf on the GPU), clamped to int8."""
    from runner.processing import quantize_input

    blob = np.array([0.0, 0.5 / 127, 1.5 / 127, 0.5, 1.0, 1.2, -2.0], np.float32)
    assert quantize_input(blob, 127.0).tolist() == [0, 0, 2, 64, 127, 127, -128]
    assert quantize_input(blob, 127.0 / 0.5).dtype == np.int8
