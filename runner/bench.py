"""Bench stage: one harness for every chain, timing preprocess / infer / postprocess / end to end.

The chain (`prepost`) says what each stage holds and times it: ours on the host clock after a synchronize,
infer with CUDA events on a GPU; the peer with its own speed dict and the wall time. Where there is a device, the
copies inside pre and post are timed on their own with CUDA events (h2d, d2h). After the chain loop comes the
engine alone: the same number of back-to-back `execute()` calls (compute), and its throughput in images/s at the
timed shape on one stream (`opt_batch`) and at batch 1 on two streams, on the runner's lanes (`Runner.lanes`).
Every variant of a sweep is timed at one shape, the static variant's (`RunConfig.timed_shape`); each figure is per
batch of its first dim (`BenchResult.per_image` divides it).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from runner.results import BENCH_STAGES as STAGES
from runner.results import BenchResult, Stats, first_line

log = logging.getLogger(__name__)
THROUGHPUT_LANES = {"opt_batch": 1, "batch1_2streams": 2}  # name -> streams


def summarize(samples_ms: list[float]) -> Stats:
    a = np.asarray(samples_ms, np.float64)
    return Stats(mean=float(a.mean()), p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                 p99=float(np.percentile(a, 99)), std=float(a.std()), n=int(a.size))


def images_per_second(runner, shape: tuple[int, ...], streams: int, iters: int) -> float | None:
    """Images/s of the model alone at `shape` on `streams` lanes enqueued round-robin, `iters` rounds after a tenth
    more that warm up, on the host clock; None where the runtime has no lanes."""
    lanes = runner.lanes(shape, streams)
    if lanes is None:
        return None
    with lanes:
        for round_ in range(iters + iters // 10):
            if round_ == iters // 10:
                lanes.synchronize()
                start = time.perf_counter()
            lanes.enqueue()
        lanes.synchronize()
        return iters * streams * shape[0] / (time.perf_counter() - start)


def throughput(runner, shape: list[int], iters: int) -> tuple[dict[str, float], str | None]:
    """Images/s of the engine alone: at `shape` on one stream, at batch 1 on two. (figures, note)."""
    shapes = {"opt_batch": tuple(shape), "batch1_2streams": (1, *shape[1:])}
    figures, notes = {}, []
    for name, streams in THROUGHPUT_LANES.items():
        try:
            value = images_per_second(runner, shapes[name], streams, iters)
        except Exception as exc:  # the runtime's limit (a second context on a one-profile engine, say)
            notes.append(f"{name}: {first_line(str(exc))[:200]}")
            continue
        if value is not None:
            figures[name] = value
    return figures, "; ".join(notes) or None


def bench(runner, chain, images: list[np.ndarray], shape: list[int], warmup: int, iters: int) -> BenchResult:
    """Time `chain` at `shape` (N, 3, H, W) over `images`, cycling through them."""
    batch, hw = shape[0], (shape[2], shape[3])
    runner.set_shape(tuple(shape))
    pinned = runner.pin(images)
    times: dict[str, list[float]] = {}
    log.info("bench: %d warm-up + %d timed runs at %s...", warmup, iters, list(shape))
    for i in range(warmup + iters):
        frames = [images[(i * batch + k) % len(images)] for k in range(batch)]
        _, stage_ms = chain.run(runner, frames, hw)
        if i >= warmup:
            for stage, ms in stage_ms.items():
                times.setdefault(stage, []).append(ms)
    compute = [runner.execute() for _ in range(iters)]
    figures, note = throughput(runner, shape, iters)
    settings = {"warmup": warmup, "iters": iters, "shape": list(shape), "images": len(images),
                "source_pinned": pinned, **chain.settings(), **runner.settings()}
    if note:
        settings["throughput_note"] = note
    copies = {name: summarize(times[name]) for name in ("h2d", "d2h") if name in times}
    result = BenchResult(**{stage: summarize(times[stage]) for stage in STAGES}, compute=summarize(compute),
                         settings=settings, throughput=figures, **copies)
    log.info("bench: p50 pre %.2f / infer %.2f / post %.2f / e2e %.2f ms%s", *(getattr(result, s).p50 for s in STAGES),
             "".join(f"; {k} {v:.0f} img/s" for k, v in figures.items()))
    return result
