"""The pre -> infer -> post chains that the validate and bench stages run detections and timings through, one
shape: `run(runner, frames, hw)` -> (detections in source pixels, stage times in ms). `chain` assembles a variant's
from its runner and its config (`preprocess=cpu|gpu`, `postprocess=cpu|gpu`).

- `Chain`, ours around `runner.execute()`:
  - pre on cpu: letterbox (RT-DETR: stretch) + normalise on the host (OpenCV); the whole float input crosses to
    the device.
  - pre on gpu: the uint8 source crosses; the runner's `gpu_letterbox` fits it on the device, with the same
    geometry (`processing.geometry` of the decode).
  - post on cpu: every output crosses back; decode + NMS on the host.
  - post on gpu: the runner's `gpu_score_filter` filters by score, runs NMS and maps the boxes to the source images
    on the device; only the detections cross back. An end-to-end output `(B, N, 6)` is small already: it is copied
    back as it is.
  On a runner that queues its device work (`Runner.queues`: TensorRT) a run is queued and waited for once, as an
  application runs it; each stage is its host work until its device work starts, plus that work's GPU time
  between CUDA events (`ONE_WAIT`). Elsewhere each stage is waited for and timed on the host clock.
  `stream(runner, batches, hw)` gives the detections of many batches (the offline scenario): overlapped where the
  runner offers it with the GPU letterbox (`Runner.overlapped`: each batch's upload on a stream of its own while
  the batch before runs), else one batch at a time.
- `PeerChain`: a `Predictor`'s own `predict` (ultralytics' on the same engine and frames): its speed dict and the
  wall time.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from runner.backends import Predictor, Runner
from runner.config import Device, RunConfig
from runner.processing import ONE2MANY, RTDETR, geometry, postprocess, preprocess, quantize_input

ONE_AT_A_TIME = "one batch at a time"
ONE_WAIT = ("one wait per run: each stage's host work until its device work starts, plus that work's GPU time "
            "between CUDA events (pre: the host until the upload is queued, then the GPU from the upload's start to "
            "the engine's; post: from the engine's end to the end of its GPU work (the copy back, or the NMS writing "
            "to host memory), then the host's reading or decode); e2e on the host clock")
A_WAIT_PER_STAGE = "a wait after each stage: pre and post on the host clock, infer as the runner times it"


@dataclass
class Chain:
    """`letterbox` / `score_filter`: the runner's GPU ends (`Runner.gpu_letterbox`, `gpu_score_filter`); None runs
    that end on the host. `overlap`: the runner's overlapped offline batches (`Runner.overlapped`); None runs them
    one at a time. `queued`: the runner queues its device work (`Runner.queues`), so `run` waits once."""
    letterbox: object = None
    score_filter: object = None
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    head: str = ONE2MANY
    overlap: object = None
    queued: bool = False

    def pre(self, runner: Runner, frames: list[np.ndarray], hw: tuple[int, int]):
        """The input in place on the device; returns how each frame was fitted (`Letterbox`)."""
        boxes = self._queue_pre(runner, frames, hw)
        runner.sync()
        return boxes

    def _queue_pre(self, runner: Runner, frames: list[np.ndarray], hw: tuple[int, int]):
        """`pre`'s work queued on the runner (the host's letterbox done, its upload queued), not waited for."""
        if self.letterbox is not None:
            return self.letterbox.run(frames, hw, geometry(self.head))
        blob, boxes = preprocess(frames, hw, head=self.head)
        runner.h2d(blob)
        return boxes

    def post(self, runner: Runner, boxes) -> list[np.ndarray]:
        """Detections [x1, y1, x2, y2, score, cls] in source pixels, per frame."""
        if self.score_filter is not None and self.head == ONE2MANY:
            dets = self.score_filter.run(self.conf, self.iou, self.max_det, boxes)
            if all(d is not None for d in dets):
                return dets
        outputs = runner.d2h()  # cpu post, an end-to-end output, or more candidates than the filter keeps
        return self._from_output(next(iter(outputs.values())), boxes)

    def _from_output(self, output: np.ndarray, boxes) -> list[np.ndarray]:
        return postprocess(output, boxes, self.conf, self.iou, self.max_det, self.head)

    def run(self, runner: Runner, frames: list[np.ndarray], hw: tuple[int, int]) -> tuple[list[np.ndarray], dict]:
        if self.queued:
            return self._run_queued(runner, frames, hw)
        t0 = time.perf_counter()
        boxes = self.pre(runner, frames, hw)
        t1 = time.perf_counter()
        infer_ms = runner.execute()
        t2 = time.perf_counter()
        dets = self.post(runner, boxes)
        t3 = time.perf_counter()
        times = {"preprocess": (t1 - t0) * 1e3, "infer": infer_ms, "postprocess": (t3 - t2) * 1e3,
                 "e2e": (t3 - t0) * 1e3}
        return dets, {**times, **runner.copy_ms()}

    def _run_queued(self, runner, frames: list[np.ndarray], hw: tuple[int, int]) -> tuple[list[np.ndarray], dict]:
        """`run` on a runner that queues: pre's upload (and GPU letterbox), the engine, post's copy back (after the
        GPU filter) queued on the runner's stream, one wait, then the host's decode (`ONE_WAIT`)."""
        filtered = self.score_filter is not None and self.head == ONE2MANY
        t0 = time.perf_counter()
        boxes = self._queue_pre(runner, frames, hw)
        runner.launch()
        if filtered:
            self.score_filter.queue(self.conf, self.iou, self.max_det, boxes)
        else:
            runner.queue_d2h()
        runner.sync()
        t2 = time.perf_counter()
        found = self.score_filter.detections() if filtered else None
        if found is None:
            dets = self._from_output(next(iter(runner.outputs().values())), boxes)
        elif all(d is not None for d in found):
            dets = found
        else:  # more candidates than the filter keeps: the whole output crosses, on the host clock
            dets = self._from_output(next(iter(runner.d2h().values())), boxes)
        t3 = time.perf_counter()
        gpu_pre, gpu_post = runner.around_engine_ms()  # the events are read after the clock stops: no app reads them
        times = {"preprocess": (runner.upload_queued_at - t0) * 1e3 + gpu_pre, "infer": runner.infer_ms(),
                 "postprocess": gpu_post + (t3 - t2) * 1e3, "e2e": (t3 - t0) * 1e3}
        return dets, {**times, **runner.copy_ms()}

    def stream(self, runner: Runner, batches: Iterable[list[np.ndarray]], hw: tuple[int, int]
               ) -> Iterator[list[np.ndarray]]:
        """The detections of each batch, in order: through `overlap` where there is one (a batch with more candidates
        than the GPU filter keeps runs again through `run`), else one batch at a time."""
        if self.overlap is None:
            yield from one_at_a_time(self, runner, batches, hw)
            return
        for frames, boxes, out in self.overlap.run(batches, hw, self.conf, self.iou, self.max_det):
            if not isinstance(out, list):
                yield self._from_output(out, boxes)
            elif all(d is not None for d in out):
                yield out
            else:
                yield self.run(runner, frames, hw)[0]

    def detect(self, runner: Runner, frames: list[np.ndarray], hw: tuple[int, int], boxes) -> list[np.ndarray]:
        """The detections of `frames` right after `runner.infer` ran their CPU-letterboxed input (fitted as
        `boxes`): a host pre gives that same input, so only post runs; a GPU pre letterboxes and runs again."""
        if self.letterbox is not None:
            boxes = self.pre(runner, frames, hw)
            runner.execute()
        return self.post(runner, boxes)

    def input_deviation(self, runner: Runner, blob: np.ndarray) -> float | None:
        """Max |input on the device - `blob`| after `pre`, where the GPU letterboxed it; else None. An int8 input is
        compared in its own levels, each level apart counted as one pixel level (1/255): one pixel level of the
        resize's rounding moves it by one level at most."""
        if self.letterbox is None:
            return None
        got = self.letterbox.read_input()
        if runner.input_dtype != np.int8:
            return float(np.abs(got - blob).max())
        levels = runner.input_levels
        return float(np.abs(np.rint(got * levels) - quantize_input(blob, levels)).max()) / 255

    def settings(self) -> dict:
        post = "host decode + NMS"
        if self.score_filter is not None:
            post = ("gpu score filter + NMS + scaling, written to host memory" if self.head == ONE2MANY else
                    "end-to-end output copied as is")
        fitting = "stretch" if self.head == RTDETR else "letterbox"
        pre = f"host {fitting} (float upload)" if self.letterbox is None else f"gpu {fitting} (uint8 upload)"
        return {"preprocess": pre, "postprocess": post, "decode": self.head,
                "stage_timer": ONE_WAIT if self.queued else A_WAIT_PER_STAGE,
                "copies": ("h2d in preprocess, d2h in postprocess (none after the GPU NMS), each between CUDA events "
                           "where there is a device"),
                "offline": ONE_AT_A_TIME if self.overlap is None else self.overlap.settings()}


@dataclass
class PeerChain:
    """`predict` as its users call it, on in-memory BGR frames."""
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    head: str = ONE2MANY

    def run(self, runner: Predictor, frames: list[np.ndarray], hw: tuple[int, int]
            ) -> tuple[list[np.ndarray], dict]:
        t0 = time.perf_counter()
        results = runner.predict(frames, hw, self.conf, self.iou, self.max_det)
        wall = (time.perf_counter() - t0) * 1e3
        speed = results[0].speed  # ms per image, averaged over the batch
        n = len(frames)
        times = {"preprocess": speed["preprocess"] * n, "infer": speed["inference"] * n,
                 "postprocess": speed["postprocess"] * n, "e2e": wall}
        return [r.boxes.data.float().cpu().numpy() for r in results], times

    def stream(self, runner: Predictor, batches: Iterable[list[np.ndarray]], hw: tuple[int, int]
               ) -> Iterator[list[np.ndarray]]:
        """predict's detections of each batch, one `predict` call after another."""
        return one_at_a_time(self, runner, batches, hw)

    def detect(self, runner: Predictor, frames: list[np.ndarray], hw: tuple[int, int], boxes) -> list[np.ndarray]:
        """predict's detections of `frames` (it letterboxes them itself)."""
        return self.run(runner, frames, hw)[0]

    def input_deviation(self, runner: Predictor, blob: np.ndarray) -> None:
        """predict's input is its own."""
        return None

    def settings(self) -> dict:
        return {"preprocess": "ultralytics predict", "postprocess": "ultralytics predict", "decode": self.head,
                "timer": "ultralytics' speed dict per stage; e2e: wall time of one predict call",
                "offline": ONE_AT_A_TIME}


def one_at_a_time(chain: Chain | PeerChain, runner: Runner, batches: Iterable[list[np.ndarray]],
                  hw: tuple[int, int]) -> Iterator[list[np.ndarray]]:
    for frames in batches:
        yield chain.run(runner, frames, hw)[0]


def chain(runner: Runner, cfg: RunConfig, head: str) -> Chain | PeerChain:
    """The chain of a variant whose opened `runner` decodes `head`: a `Predictor`'s own, else ours with the ends
    the config puts on the GPU, its offline batches overlapped where the runner can and `bench.offline_overlap`."""
    v = cfg.validate
    if isinstance(runner, Predictor):
        return PeerChain(v.conf, v.nms_iou, v.max_det, head)
    letterbox = runner.gpu_letterbox() if cfg.preprocess.device == Device.gpu else None
    score_filter = runner.gpu_score_filter() if cfg.postprocess.device == Device.gpu else None
    overlap = None
    if letterbox is not None and cfg.bench.offline_overlap:
        overlap = runner.overlapped(geometry(head), score_filter is not None and head == ONE2MANY)
    return Chain(letterbox, score_filter, v.conf, v.nms_iou, v.max_det, head, overlap, runner.queues)
