"""Offline batches through a `TrtRunner`'s engine, overlapped: a batch's upload (on a copy stream of its own) runs
while the letterbox, the engine and the score filter with its NMS work on the batch before (on the runner's
stream), and the host collects (or decodes) the one before that.

Each of the two slots has its own device source and fit table, candidates and detections, and their pinned host
copies; the engine's input and output are the runner's, used in stream order. CUDA events order the two streams: a
slot's upload waits until the letterbox has read the slot's last batch, the letterbox waits for the upload, and the
host reads a slot's results after its `done` event, before the slot takes another batch.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from runner.backends.tensorrt.compat import cuda_call
from runner.backends.tensorrt.kernels import FIT_FIELDS
from runner.backends.tensorrt.prepost import (Candidates, GpuEnd, coalesced, contiguous, fit_table, source_offsets,
                                              uploads)
from runner.backends.tensorrt.runtime import copy_async

SLOTS = 2
EVENTS = ("uploaded", "read", "done")  # per slot: its upload, the letterbox's read of it, its results on the host


class Overlapped(GpuEnd):
    """`run(batches, hw, conf, iou, max_det)` yields per batch, in order, (frames, fits, out): the detections per
    image in source pixels (None past CANDIDATE_CAP) where `score_filter`, else the first output as float32. The
    runner's shape must be each batch's; closed with the runner."""

    def __init__(self, runner, geometry, score_filter: bool):
        super().__init__(runner)
        self.geometry, self.score_filter = geometry, score_filter
        rt = runner.rt
        self._copy_stream = cuda_call(rt.cudaStreamCreate)
        self._events = [{name: cuda_call(rt.cudaEventCreateWithFlags, rt.cudaEventDisableTiming) for name in EVENTS}
                        for _ in range(SLOTS)]
        self._candidates = [Candidates(self._buffers, str(slot)) for slot in range(SLOTS)]

    def settings(self) -> str:
        return (f"overlapped: {SLOTS} slots, each batch uploaded on a copy stream while the batch before runs, "
                f"the host collecting the one before that" + ("" if self.score_filter else " (decode + NMS)"))

    def run(self, batches: Iterable[list[np.ndarray]], hw: tuple[int, int], conf: float, iou: float, max_det: int
            ) -> Iterator[tuple]:
        in_flight: deque = deque()
        for n, frames in enumerate(batches):
            # the slot's last batch is collected (copied out) first, this batch queued, and only then handed over:
            # the host decodes it while the GPU has the two after it
            done = self._collect(*in_flight.popleft()) if len(in_flight) == SLOTS else None
            in_flight.append((n % SLOTS, frames, self._enqueue(n % SLOTS, frames, hw, (conf, iou, max_det))))
            if done is not None:
                yield done
        while in_flight:
            yield self._collect(*in_flight.popleft())

    def _enqueue(self, slot: int, frames: list[np.ndarray], hw: tuple[int, int], nms: tuple[float, float, int]
                 ) -> list:
        """Queue one batch in `slot`, whose last batch the host has collected, its filter and NMS at `nms` (conf,
        iou, max_det); returns how each frame was fitted."""
        runner, buffers, rt, events = self.runner, self._buffers, self.runner.rt, self._events[slot]
        images = contiguous(runner, frames, hw)
        offsets = source_offsets(images)
        batch, _, h, w = runner.shape
        fits, boxes = fit_table(images, offsets, (h, w), self.geometry)
        source, table = f"source{slot}", f"fits{slot}"
        buffers.ensure(source, offsets[-1])
        buffers.ensure(table, batch * FIT_FIELDS * 4)
        buffers.host_array(table, np.int32, fits.size)[:] = fits.reshape(-1)
        cuda_call(rt.cudaStreamWaitEvent, self._copy_stream, events["read"], 0)
        copies = uploads(runner, buffers, source, images, offsets)
        copies.append((buffers.device[table], buffers.host[table], fits.nbytes))
        for dst, src, nbytes in coalesced(copies):
            copy_async(rt, self._copy_stream, dst, src, nbytes, to_device=True)
        cuda_call(rt.cudaEventRecord, events["uploaded"], self._copy_stream)

        cuda_call(rt.cudaStreamWaitEvent, runner.stream, events["uploaded"], 0)
        target, _, dtype = runner.tensor(runner.input_name)
        self.kernels().letterbox(runner.stream, buffers.device[source], buffers.device[table], target, batch, (h, w),
                                 dtype, runner.input_levels)
        cuda_call(rt.cudaEventRecord, events["read"], runner.stream)
        runner.enqueue()
        self._results(slot, boxes, *nms)
        cuda_call(rt.cudaEventRecord, events["done"], runner.stream)
        return boxes

    def _results(self, slot: int, boxes: list, conf: float, iou: float, max_det: int) -> None:
        """Queue, on the runner's stream, what crosses back into the slot's pinned buffers: the detections the NMS
        writes there (`boxes`: how each image was fitted, for their way back to source pixels), else the output's
        copy."""
        runner, buffers = self.runner, self._buffers
        head, shape, dtype = runner.tensor(runner.output_names[0])
        if not self.score_filter:
            buffers.ensure(f"out{slot}", math.prod(shape) * dtype.itemsize)
            runner.copy(buffers.host[f"out{slot}"], head, math.prod(shape) * dtype.itemsize, to_device=False)
            return
        candidates = self._candidates[slot]
        candidates.prepare(boxes, max_det)
        candidates.queue(runner, self.kernels(), conf, iou, max_det)

    def _collect(self, slot: int, frames: list[np.ndarray], boxes: list) -> tuple:
        """Wait for the slot's batch; its frames, fits and what crossed back (copies: the slot is reused next)."""
        cuda_call(self.runner.rt.cudaEventSynchronize, self._events[slot]["done"])
        buffers = self._buffers
        _, shape, dtype = self.runner.tensor(self.runner.output_names[0])
        if not self.score_filter:
            out = buffers.host_array(f"out{slot}", dtype, math.prod(shape)).reshape(shape)
            return frames, boxes, out.astype(np.float32)
        return frames, boxes, self._candidates[slot].read(shape[0])

    def close(self) -> None:
        rt = self.runner.rt
        cuda_call(rt.cudaStreamSynchronize, self._copy_stream)
        super().close()
        for events in self._events:
            for event in events.values():
                cuda_call(rt.cudaEventDestroy, event)
        cuda_call(rt.cudaStreamDestroy, self._copy_stream)
