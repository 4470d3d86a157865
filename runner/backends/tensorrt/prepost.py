"""The GPU pipeline's two ends around a `TrtRunner`, on its stream, with the kernels of `kernels`.

`GpuLetterbox` uploads a batch of uint8 source images (each from its own memory where the runner pinned it, else
through a pinned staging buffer, contiguous copies merged into one) and letterboxes (for RT-DETR: stretches) them
into the runner's input buffer in one launch; `GpuScoreFilter` filters the one-to-many head output by score before
the copy back, so only the candidates
cross to the host. Each
owns its buffers and kernels and is closed with the runner that made it; its GPU work is a stage of the runner's
`CudaGraphs` (a graph per shape; growing a buffer of its own drops the stage's graphs), and its copies are timed as
the runner's h2d / d2h.
"""
from __future__ import annotations

import numpy as np

from runner.backends.tensorrt.compat import cuda_call
from runner.backends.tensorrt.kernels import FIT_FIELDS, ROW, Kernels
from runner.backends.tensorrt.runtime import Buffers
from runner.processing import Letterbox, fit

CANDIDATE_CAP = 1024  # rows per image the GPU filter copies back; more falls back to the whole output
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


def fit_table(images: list[np.ndarray], hw: tuple[int, int], geometry=fit) -> tuple[np.ndarray, list[Letterbox]]:
    """The letterbox kernel's parameters for `images` packed back to back in one source buffer, a `Fit` row per
    image [offset, w, h, new_w, new_h, left, top, 0] (int32), and the `Letterbox` of each. Raises ValueError where
    the batch's sources pass what an int32 offset reaches."""
    total = sum(image.nbytes for image in images)
    if total > MAX_SOURCE_BYTES:
        raise ValueError(f"{len(images)} source images of {total / 2**30:.1f} GiB in one batch: the GPU letterbox "
                         f"takes at most 2 GiB; use a smaller batch or preprocess=cpu")
    fits, boxes, offset = np.zeros((len(images), FIT_FIELDS), np.int32), [], 0
    for n, image in enumerate(images):
        h, w = image.shape[:2]
        (new_w, new_h), (top, _, left, _), box = geometry(h, w, hw)
        fits[n] = offset, w, h, new_w, new_h, left, top, 0
        boxes.append(box)
        offset += image.nbytes
    return fits, boxes


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
    copies = []
    staging = buffers.host_array(name, np.uint8, offsets[-1] + images[-1].nbytes)
    for image, offset in zip(images, offsets):
        source = image.ctypes.data
        if not runner.pinned(image):
            staging[offset:offset + image.nbytes] = image.reshape(-1)
            source = buffers.host[name] + offset
        copies.append((buffers.device[name] + offset, source, image.nbytes))
    return copies


def fitted(runner, images: list[np.ndarray], hw: tuple[int, int], geometry
           ) -> tuple[list[np.ndarray], np.ndarray, list[Letterbox]]:
    """`images` made contiguous, their fit table and how each is fitted (`fit_table`) into the runner's input
    shape. Raises ValueError where they do not fill it."""
    batch, _, h, w = runner.shape
    if len(images) != batch or (h, w) != tuple(hw):
        raise ValueError(f"{len(images)} images at {list(hw)} do not fill the input shape {list(runner.shape)}")
    images = [np.ascontiguousarray(image) for image in images]
    return images, *fit_table(images, (h, w), geometry)


class Candidates:
    """The score filter's per-image counts and candidate rows in `buffers`, under the names `counts<suffix>` and
    `rows<suffix>`: filled on the runner's stream from its first output, copied back, read per image."""

    def __init__(self, buffers: Buffers, suffix: str = ""):
        self.buffers, self.counts, self.rows = buffers, f"counts{suffix}", f"rows{suffix}"

    def ensure(self, batch: int) -> bool:
        """Room for `batch` images; True where a buffer moved."""
        return self.buffers.ensure(self.counts, batch * 4) | self.buffers.ensure(self.rows, self._rows_bytes(batch))

    def queue(self, runner, kernels: Kernels, conf: float) -> None:
        """Zero the counts and filter the head output (or decode its maps, `runner.head_maps`) by `conf` into the
        rows, on the runner's stream."""
        device, maps = self.buffers.device, runner.head_maps
        head, shape, dtype = runner.tensor(runner.output_names[0])
        cuda_call(runner.rt.cudaMemsetAsync, device[self.counts], 0, shape[0] * 4, runner.stream)
        if maps:
            tensors = [runner.tensor(name)[:2] for name in maps["maps"]]
            kernels.map_candidates(runner.stream, tensors, maps["classes"], maps["reg_max"], runner.shape[2], conf,
                                   device[self.rows], device[self.counts], CANDIDATE_CAP, dtype == np.float16)
        else:
            kernels.candidates(runner.stream, head, *shape, conf, device[self.rows], device[self.counts],
                               CANDIDATE_CAP, dtype == np.float16)

    def copy_back(self, runner, batch: int) -> None:
        """Queue the copies of the counts and rows to their pinned host buffers on the runner's stream."""
        host, device = self.buffers.host, self.buffers.device
        runner.copy(host[self.counts], device[self.counts], batch * 4, to_device=False)
        runner.copy(host[self.rows], device[self.rows], self._rows_bytes(batch), to_device=False)

    def read(self, batch: int) -> list[np.ndarray | None]:
        """Per image, a copy of its rows [cx, cy, w, h, score, class, anchor, 0]; None past CANDIDATE_CAP. After the
        copies back are done."""
        found = self.buffers.host_array(self.counts, np.int32, batch).tolist()
        kept = self.buffers.host_array(self.rows, np.float32, batch * CANDIDATE_CAP * ROW)
        kept = kept.reshape(batch, CANDIDATE_CAP, ROW)
        return [kept[n, :k].copy() if k <= CANDIDATE_CAP else None for n, k in enumerate(found)]

    @staticmethod
    def _rows_bytes(batch: int) -> int:
        return batch * CANDIDATE_CAP * ROW * 4


class GpuLetterbox(GpuEnd):
    """Source images in, the runner's input out: the CPU path's geometry (`processing.fit` or `stretch_fit`),
    resized on the GPU, a batch in one kernel launch."""

    def run(self, images: list[np.ndarray], hw: tuple[int, int], geometry=fit) -> list[Letterbox]:
        """Upload uint8 BGR images and fit them into the input buffer, in its dtype, by `geometry` (`fit`, or
        `stretch_fit` for RT-DETR: the kernel resizes each axis by its own scale). Asynchronous: the runner's sync()
        before reading anything it wrote."""
        runner, buffers = self.runner, self._buffers
        images, fits, boxes = fitted(runner, images, hw, geometry)
        batch, _, h, w = runner.shape
        total = sum(image.nbytes for image in images)
        if buffers.ensure("source", total) | buffers.ensure("fits", batch * FIT_FIELDS * 4):
            runner.graphs.drop("letterbox")  # its graphs read the old buffers
        buffers.host_array("fits", np.int32, fits.size)[:] = fits.reshape(-1)
        copies = coalesced(uploads(runner, buffers, "source", images, fits[:, 0].tolist()))  # host staging first
        with runner.timed("h2d"):
            for dst, src, nbytes in copies:
                runner.copy(dst, src, nbytes, to_device=True)
        target, _, dtype = runner.tensor(runner.input_name)

        def enqueue():
            runner.copy(buffers.device["fits"], buffers.host["fits"], fits.nbytes, to_device=True)
            self.kernels().letterbox(runner.stream, buffers.device["source"], buffers.device["fits"], target, batch,
                                     (h, w), dtype == np.float16)

        runner.graphs.launch("letterbox", enqueue)
        return boxes

    def read_input(self) -> np.ndarray:
        """The input buffer as the GPU holds it (float32), after a sync: what the letterbox wrote."""
        return self.runner.read(self.runner.input_name)


class GpuScoreFilter(GpuEnd):
    """The runner's first output, a one-to-many head `(B, 4 + nc, A)`, or its head maps, cut to its candidates on the
    GPU."""

    def __init__(self, runner):
        super().__init__(runner)
        self._candidates = Candidates(self._buffers)

    def run(self, conf: float) -> list[np.ndarray | None]:
        """Per image, the rows [cx, cy, w, h, score, class, anchor, 0] whose best class score is above `conf`:
        only these cross to the host. None for an image with more than CANDIDATE_CAP of them (decode the whole
        output instead)."""
        self.queue(conf)
        self.runner.sync()
        return self.rows()

    def queue(self, conf: float) -> None:
        """Queue the filter and the copy back of its candidates on the runner's stream (`rows` after a sync)."""
        runner, candidates = self.runner, self._candidates
        batch = runner.tensor(runner.output_names[0])[1][0]
        if candidates.ensure(batch):
            runner.graphs.drop("candidates")  # its graphs write the old buffers
        runner.graphs.launch("candidates", lambda: candidates.queue(runner, self.kernels(), conf), conf)
        with runner.timed("d2h"):
            candidates.copy_back(runner, batch)

    def rows(self) -> list[np.ndarray | None]:
        """`run`'s rows of the filter queued last, once the runner's stream is synchronized."""
        return self._candidates.read(self.runner.tensor(self.runner.output_names[0])[1][0])
