"""The host side of the GPU letterbox at batch > 1, on the CPU: the kernel's parameter table against the CPU path's
own geometry, the limit of its int32 offsets, and the batch's upload merged into as few copies as are contiguous.
The kernels themselves run in test_gpu_pipeline.py."""
from __future__ import annotations

import numpy as np
import pytest

from runner.backends.tensorrt.prepost import MAX_SOURCE_BYTES, coalesced, fit_table
from runner.processing import fit, preprocess, stretch_fit

HW = (96, 128)


def test_fit_table_packs_a_batch_with_the_cpu_geometry():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((300, 200), (47, 61), (96, 128), (810, 1080))]
    fits, boxes = fit_table(images, HW)
    assert boxes == preprocess(images, HW)[1]
    assert fits.dtype == np.int32 and fits.shape == (4, 8)
    assert fits[:, 0].tolist() == [0, *np.cumsum([i.nbytes for i in images[:-1]]).tolist()]
    for row, image in zip(fits, images):
        (new_w, new_h), (top, _, left, _), _ = fit(*image.shape[:2], HW)
        assert row.tolist() == [row[0], image.shape[1], image.shape[0], new_w, new_h, left, top, 0]
    stretched, _ = fit_table(images, HW, stretch_fit)
    assert (stretched[:, 3:7] == [HW[1], HW[0], 0, 0]).all()


def test_fit_table_refuses_a_batch_past_int32_offsets():
    frame = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (2160, 3840, 3))  # a 4K frame's size, no memory
    batch = MAX_SOURCE_BYTES // frame.nbytes + 1
    assert len(fit_table([frame] * (batch - 1), HW)[1]) == batch - 1
    with pytest.raises(ValueError, match=rf"^{batch} source images of 2\.0 GiB in one batch: .* preprocess=cpu$"):
        fit_table([frame] * batch, HW)


def test_contiguous_copies_merge_into_one():
    staged = [(1000 + o, 5000 + o, n) for o, n in ((0, 10), (10, 20), (30, 5))]  # through the staging buffer
    pinned = (1035, 90000, 7)  # from an image's own pinned memory
    assert coalesced([*staged, pinned, (1042, 5035, 3)]) == [(1000, 5000, 35), pinned, (1042, 5035, 3)]
    assert coalesced([]) == []
