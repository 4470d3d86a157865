"""Bench stage: one harness for every backend, timing preprocess / infer / postprocess / end to end.

preprocess = letterbox + normalise + host-to-device copy (synchronised);
infer      = `runner.execute()`: CUDA events around the enqueue on TensorRT, host clock on onnxruntime;
postprocess= device-to-host copy + decode + NMS + scale; end to end is host to host.
After the pipeline loop, the same number of back-to-back `execute()` calls gives the pure compute time.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from runner.processing import postprocess, preprocess
from runner.results import BENCH_STAGES as STAGES
from runner.results import BenchResult, Stats

log = logging.getLogger(__name__)


def summarize(samples_ms: list[float]) -> Stats:
    a = np.asarray(samples_ms, np.float64)
    return Stats(mean=float(a.mean()), p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                 p99=float(np.percentile(a, 99)), std=float(a.std()), n=int(a.size))


def bench(runner, images: list[np.ndarray], shape: list[int], warmup: int, iters: int, conf: float = 0.25,
          iou: float = 0.7, max_det: int = 300, head: str = "one2many") -> BenchResult:
    """Time the full pipeline at `shape` (N, 3, H, W) over `images`, cycling through them."""
    batch, hw = shape[0], (shape[2], shape[3])
    runner.set_shape(tuple(shape))
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    log.info("bench: %d warm-up + %d timed runs at %s...", warmup, iters, list(shape))
    for i in range(warmup + iters):
        frame = [images[(i * batch + k) % len(images)] for k in range(batch)]
        t0 = time.perf_counter()
        blob, boxes = preprocess(frame, hw)
        runner.h2d(blob)
        runner.sync()
        t1 = time.perf_counter()
        infer_ms = runner.execute()
        t2 = time.perf_counter()
        outputs = runner.d2h()
        postprocess(next(iter(outputs.values())), boxes, conf, iou, max_det, head)
        t3 = time.perf_counter()
        if i >= warmup:
            for stage, ms in zip(STAGES, ((t1 - t0) * 1e3, infer_ms, (t3 - t2) * 1e3, (t3 - t0) * 1e3)):
                times[stage].append(ms)
    compute = [runner.execute() for _ in range(iters)]
    result = BenchResult(**{stage: summarize(v) for stage, v in times.items()}, compute=summarize(compute),
                         settings={"warmup": warmup, "iters": iters, "shape": list(shape),
                                   "copies": "h2d in preprocess, d2h in postprocess", "decode": head,
                                   **runner.settings()})
    log.info("bench: p50 pre %.2f / infer %.2f / post %.2f / e2e %.2f ms",
             *(getattr(result, s).p50 for s in STAGES))
    return result
