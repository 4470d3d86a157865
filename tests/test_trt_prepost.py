"""The host side of the GPU letterbox at batch > 1 and of the NMS's way back, on the CPU: the kernels' parameter
tables against the CPU path's own geometry and scaling, the limit of the int32 offsets, and the batch's upload merged
into as few copies as are contiguous. The kernels themselves run in test_gpu_pipeline.py."""
from __future__ import annotations

import numpy as np
import pytest

from runner.backends.tensorrt.kernels import SCALE_FIELDS
from runner.backends.tensorrt.prepost import MAX_SOURCE_BYTES, coalesced, fit_table, scale_table, source_offsets
from runner.processing import fit, preprocess, scale_boxes, stretch_fit

HW = (96, 128)


def test_fit_table_packs_a_batch_with_the_cpu_geometry():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((300, 200), (47, 61), (96, 128), (810, 1080))]
    fits, boxes = fit_table(images, source_offsets(images), HW)
    assert boxes == preprocess(images, HW)[1]
    assert fits.dtype == np.int32 and fits.shape == (4, 8)
    assert fits[:, 0].tolist() == [0, *np.cumsum([i.nbytes for i in images[:-1]]).tolist()]
    for row, image in zip(fits, images):
        (new_w, new_h), (top, _, left, _), _ = fit(*image.shape[:2], HW)
        assert row.tolist() == [row[0], image.shape[1], image.shape[0], new_w, new_h, left, top, 0]
    stretched, _ = fit_table(images, source_offsets(images), HW, stretch_fit)
    assert (stretched[:, 3:7] == [HW[1], HW[0], 0, 0]).all()


def test_source_offsets_refuse_a_batch_past_int32_offsets():
    frame = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (2160, 3840, 3))  # a 4K frame's size, no memory
    batch = MAX_SOURCE_BYTES // frame.nbytes + 1
    assert len(source_offsets([frame] * (batch - 1))) == batch
    with pytest.raises(ValueError, match=rf"^{batch} source images of 2\.0 GiB in one batch: .* preprocess=cpu$"):
        source_offsets([frame] * batch)


def test_the_scale_table_gives_scale_boxes_in_the_kernels_float32_arithmetic():
    """The NMS kernel's way back to source pixels, (v - pad) / gain clipped to [0, size] in float32 from its
    `Scale` rows, is `processing.scale_boxes` bit for bit."""
    rng = np.random.default_rng(1)
    boxes = [fit(h, w, (640, 640))[2] for h, w in ((300, 200), (47, 61), (810, 1080), (333, 517))]
    table = scale_table(boxes)
    assert table.dtype == np.float32 and table.shape == (len(boxes), SCALE_FIELDS)
    for (left, top, gain_x, gain_y, w, h), box in zip(table, boxes):
        xyxy = rng.uniform(-20, 660, (50, 4)).astype(np.float32)
        axes = [(left, gain_x, w), (top, gain_y, h)] * 2
        kernel = np.stack([np.minimum(np.maximum((xyxy[:, k] - pad) / gain, np.float32(0)), size)
                           for k, (pad, gain, size) in enumerate(axes)], 1)
        np.testing.assert_array_equal(kernel, scale_boxes(xyxy, box))


def test_contiguous_copies_merge_into_one():
    staged = [(1000 + o, 5000 + o, n) for o, n in ((0, 10), (10, 20), (30, 5))]  # through the staging buffer
    pinned = (1035, 90000, 7)  # from an image's own pinned memory
    assert coalesced([*staged, pinned, (1042, 5035, 3)]) == [(1000, 5000, 35), pinned, (1042, 5035, 3)]
    assert coalesced([]) == []


def test_an_int8_inputs_gpu_letterbox_is_judged_in_its_own_levels():
    """The validate check on an int8 input: a level apart (one pixel level of the resize's rounding moves it by one
    at most) is within the GPU letterbox's tolerance, two are not; a float input is compared as it is."""
    from types import SimpleNamespace as NS

    from runner.prepost import Chain
    from runner.processing import quantize_input
    from runner.validate import GPU_LETTERBOX_TOLERANCE

    blob = np.random.default_rng(3).random((1, 3, 8, 8), dtype=np.float32)
    levels = 127 / 0.9995
    runner = NS(input_dtype=np.dtype(np.int8), input_levels=levels)
    for apart, within in ((0, True), (1, True), (2, False)):
        device = (quantize_input(blob, levels).astype(np.float32) + apart) / levels  # as read_input dequantizes it
        deviation = Chain(letterbox=NS(read_input=lambda: device)).input_deviation(runner, blob)
        assert deviation == pytest.approx(apart / 255) and (deviation <= GPU_LETTERBOX_TOLERANCE) is within
    half = Chain(letterbox=NS(read_input=lambda: blob + 0.002)).input_deviation(NS(input_dtype=np.float16), blob)
    assert half == pytest.approx(0.002, abs=1e-6)
