"""The GPU pipeline's two ends around a `TrtRunner`, on its stream, with the kernels of `kernels`.

`GpuLetterbox` uploads a batch of uint8 source images (each from its own memory where the runner pinned it, else
through a pinned staging buffer, contiguous copies merged into one) and letterboxes (for RT-DETR: stretches) them
into the runner's input buffer in one launch; `GpuScoreFilter` filters the one-to-many head output by score, runs
NMS on the candidates and maps the kept boxes to their source images, writing them into pinned host memory, so only
the detections cross to the host, with no copy back. Each owns its buffers and kernels and is closed with the runner
that made it; its GPU work is a stage of the runner's `CudaGraphs` (a graph per shape; growing a buffer of its own
drops the stage's graphs), and the letterbox's upload is timed as the runner's h2d.
"""
from __future__ import annotations

import numpy as np

from runner.backends.tensorrt.kernels import DETECTION, FIT_FIELDS, NMS_ROWS, ROW, SCALE_FIELDS, Kernels
from runner.backends.tensorrt.runtime import Buffers
from runner.processing import Letterbox, fit

CANDIDATE_CAP = NMS_ROWS  # rows per image the GPU filter keeps for its NMS; more falls back to the whole output
MAX_SOURCE_BYTES = 2**31 - 1  # a batch's source images: the letterbox kernel reads their offsets as int32


class GpuEnd:
    """Buffers and kernels of its own, on `runner`'s stream."""

    def __init__(self, runner):
        self.runner = runner
        self._buffers = Buffers(runner.rt)
        self._kernels: Kernels | None = None

    def kernels(self) -> Kernels:
        if self._kernels is None:
            self._kernels = Kernels.load(self.runner.rt)
        return self._kernels

    def close(self) -> None:
        if self._kernels is not None:
            self._kernels.unload()
        self._buffers.close()


def fit_table(images: list[np.ndarray], offsets: list[int], hw: tuple[int, int], geometry=fit
              ) -> tuple[np.ndarray, list[Letterbox]]:
    """The letterbox kernel's parameters for `images` packed back to back at `offsets` in one source buffer
    (`source_offsets`), a `Fit` row per image [offset, w, h, new_w, new_h, left, top, 0] (int32), and the
    `Letterbox` of each."""
    fits, boxes = np.zeros((len(images), FIT_FIELDS), np.int32), []
    for n, (image, offset) in enumerate(zip(images, offsets)):
        h, w = image.shape[:2]
        (new_w, new_h), (top, _, left, _), box = geometry(h, w, hw)
        fits[n] = offset, w, h, new_w, new_h, left, top, 0
        boxes.append(box)
    return fits, boxes


def source_offsets(images: list[np.ndarray]) -> list[int]:
    """Where each of `images` starts with the batch packed back to back in one source buffer, and (last) its end.
    Raises ValueError where that passes what the letterbox kernel's int32 offsets reach."""
    offsets = [0]
    for image in images:
        offsets.append(offsets[-1] + image.nbytes)
    if offsets[-1] > MAX_SOURCE_BYTES:
        raise ValueError(f"{len(images)} source images of {offsets[-1] / 2**30:.1f} GiB in one batch: the GPU "
                         f"letterbox takes at most 2 GiB; use a smaller batch or preprocess=cpu")
    return offsets


def scale_table(boxes: list[Letterbox]) -> np.ndarray:
    """The NMS kernel's way back to each source image, a `Scale` row per image [left, top, gain_x, gain_y, w, h]
    (float32: the gains as NumPy divides by them in `processing.scale_boxes`)."""
    return np.array([(*lb.pad, *lb.gain, lb.orig_shape[1], lb.orig_shape[0]) for lb in boxes], np.float32)


def coalesced(copies: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(dst, src, nbytes) copies in order, each run of them contiguous at both ends merged into one copy."""
    merged: list[tuple[int, int, int]] = []
    for dst, src, nbytes in copies:
        if merged and merged[-1][0] + merged[-1][2] == dst and merged[-1][1] + merged[-1][2] == src:
            merged[-1] = merged[-1][0], merged[-1][1], merged[-1][2] + nbytes
        else:
            merged.append((dst, src, nbytes))
    return merged


def uploads(runner, buffers: Buffers, name: str, images: list[np.ndarray], offsets: list[int]
            ) -> list[tuple[int, int, int]]:
    """Each image's copy to its offset in the device buffer `name`, as (dst, src, nbytes): straight from its own
    memory where `runner` pinned it, else through the pinned host buffer `name`, written here."""
    copies, staging = [], None
    for image, offset in zip(images, offsets):
        source = image.ctypes.data
        if not runner.pinned(image):
            if staging is None:
                staging = buffers.host_array(name, np.uint8, offsets[-1])
            staging[offset:offset + image.nbytes] = image.reshape(-1)
            source = buffers.host[name] + offset
        copies.append((buffers.device[name] + offset, source, image.nbytes))
    return copies


def contiguous(runner, images: list[np.ndarray], hw: tuple[int, int]) -> list[np.ndarray]:
    """`images` made contiguous. Raises ValueError where they do not fill the runner's input shape at `hw`."""
    batch, _, h, w = runner.shape
    if len(images) != batch or (h, w) != tuple(hw):
        raise ValueError(f"{len(images)} images at {list(hw)} do not fill the input shape {list(runner.shape)}")
    return [np.ascontiguousarray(image) for image in images]


class Candidates:
    """The score filter's per-image counts and candidate rows (device only; the counts are zero between runs), the
    NMS's way back to each source image (`scales<suffix>`: a `Scale` row per image), and its kept counts and
    detections (`found<suffix>`: every image's count, int32, then every image's `max_det` detection rows, float32),
    the last two in pinned host memory that the kernels read and write over the bus, in `buffers`: filled on the
    runner's stream from its first output, read per image. `max_det`: the detections per image of the run queued
    last (`prepare`)."""

    def __init__(self, buffers: Buffers, suffix: str = ""):
        self.buffers, self.max_det = buffers, 0
        self.counts, self.rows, self.found = f"counts{suffix}", f"rows{suffix}", f"found{suffix}"
        self.scales = f"scales{suffix}"

    def prepare(self, boxes: list[Letterbox], max_det: int) -> bool:
        """Room for the run about to be queued, its images fitted as `boxes` and `max_det` detections each, and
        their `Scale` rows written (before the GPU runs it); True where a buffer moved."""
        self.max_det, batch, buffers = max_det, len(boxes), self.buffers
        moved = (buffers.ensure(self.counts, batch * 4, zeroed=True)  # from here on the NMS zeroes what it reads
                 | buffers.ensure(self.rows, batch * NMS_ROWS * ROW * 4)
                 | buffers.ensure(self.scales, batch * SCALE_FIELDS * 4, device=False)
                 | buffers.ensure(self.found, self._found_bytes(batch), device=False))
        table = scale_table(boxes)
        buffers.host_array(self.scales, np.float32, table.size)[:] = table.reshape(-1)
        return moved

    def queue(self, runner, kernels: Kernels, conf: float, iou: float, max_det: int) -> None:
        """Filter the head output (or decode its maps, `runner.head_maps`) by `conf` into the rows, then NMS them at
        `iou` into the detections on the host, on the runner's stream."""
        device, host, maps = self.buffers.device, self.buffers.host, runner.head_maps
        head, shape, dtype = runner.tensor(runner.output_names[0])
        if maps:
            tensors = [runner.tensor(name)[:2] for name in maps["maps"]]
            kernels.map_candidates(runner.stream, tensors, maps["classes"], maps["reg_max"], runner.shape[2], conf,
                                   device[self.rows], device[self.counts], CANDIDATE_CAP, dtype == np.float16)
        else:
            kernels.candidates(runner.stream, head, *shape, conf, device[self.rows], device[self.counts],
                               CANDIDATE_CAP, dtype == np.float16)
        batch, found = shape[0], host[self.found]
        kernels.nms(runner.stream, batch, device[self.rows], device[self.counts], iou, max_det, host[self.scales],
                    found, found + batch * 4)

    def read(self, batch: int) -> list[np.ndarray | None]:
        """Per image, a copy of its detections [x1, y1, x2, y2, score, class] in source pixels, best first; None
        where the filter found more than CANDIDATE_CAP rows. After the NMS is done."""
        found = self.buffers.host_array(self.found, np.int32, batch + batch * self.max_det * DETECTION)
        kept = found[batch:].view(np.float32).reshape(batch, self.max_det, DETECTION)
        return [kept[n, :k].copy() if k >= 0 else None for n, k in enumerate(found[:batch].tolist())]

    def _found_bytes(self, batch: int) -> int:
        return batch * 4 * (1 + self.max_det * DETECTION)


class GpuLetterbox(GpuEnd):
    """Source images in, the runner's input out: the CPU path's geometry (`processing.fit` or `stretch_fit`),
    resized on the GPU, a batch in one kernel launch."""

    def run(self, images: list[np.ndarray], hw: tuple[int, int], geometry=fit) -> list[Letterbox]:
        """Upload uint8 BGR images and fit them into the input buffer, in its dtype, by `geometry` (`fit`, or
        `stretch_fit` for RT-DETR: the kernel resizes each axis by its own scale). Asynchronous: the runner's sync()
        before reading anything it wrote."""
        runner, buffers = self.runner, self._buffers
        images = contiguous(runner, images, hw)
        offsets = source_offsets(images)
        batch, _, h, w = runner.shape
        if buffers.ensure("source", offsets[-1]) | buffers.ensure("fits", batch * FIT_FIELDS * 4):
            runner.graphs.drop("letterbox")  # its graphs read the old buffers
        copies = coalesced(uploads(runner, buffers, "source", images, offsets))  # host staging first
        with runner.timed("h2d"):
            for dst, src, nbytes in copies:
                runner.copy(dst, src, nbytes, to_device=True)
        fits, boxes = fit_table(images, offsets, (h, w), geometry)  # while the upload runs
        buffers.host_array("fits", np.int32, fits.size)[:] = fits.reshape(-1)
        target, _, dtype = runner.tensor(runner.input_name)

        def enqueue():
            runner.copy(buffers.device["fits"], buffers.host["fits"], fits.nbytes, to_device=True)
            self.kernels().letterbox(runner.stream, buffers.device["source"], buffers.device["fits"], target, batch,
                                     (h, w), dtype, runner.input_levels)

        runner.graphs.launch("letterbox", enqueue)
        return boxes

    def read_input(self) -> np.ndarray:
        """The input buffer as the GPU holds it (float32), after a sync: what the letterbox wrote."""
        return self.runner.read(self.runner.input_name)


class GpuScoreFilter(GpuEnd):
    """The runner's first output, a one-to-many head `(B, 4 + nc, A)`, or its head maps, cut to its candidates,
    NMS'd and mapped to the source images on the GPU: only the detections cross to the host."""

    def __init__(self, runner):
        super().__init__(runner)
        self._candidates = Candidates(self._buffers)

    def run(self, conf: float, iou: float, max_det: int, boxes: list[Letterbox]) -> list[np.ndarray | None]:
        """Per image, fitted into the input as `boxes` says, its detections [x1, y1, x2, y2, score, class] in source
        pixels after NMS, as `processing.postprocess` gives them from the rows whose best class score is above
        `conf`. None for an image with more than CANDIDATE_CAP such rows (decode the whole output instead)."""
        self.queue(conf, iou, max_det, boxes)
        self.runner.sync()
        return self.detections()

    def queue(self, conf: float, iou: float, max_det: int, boxes: list[Letterbox]) -> None:
        """Queue the filter and the NMS, which writes the detections to the host, on the runner's stream
        (`detections` after a sync)."""
        runner, candidates = self.runner, self._candidates
        batch = runner.tensor(runner.output_names[0])[1][0]
        if len(boxes) != batch:
            raise ValueError(f"{len(boxes)} fitted images for an output of batch {batch}")
        if candidates.prepare(boxes, max_det):
            runner.graphs.drop("candidates")  # its graphs use the old buffers
        runner.graphs.launch("candidates", lambda: candidates.queue(runner, self.kernels(), conf, iou, max_det),
                             (conf, iou, max_det))
        runner.posted()

    def detections(self) -> list[np.ndarray | None]:
        """`run`'s detections of the run queued last, once the runner's stream is synchronized."""
        return self._candidates.read(self.runner.tensor(self.runner.output_names[0])[1][0])
