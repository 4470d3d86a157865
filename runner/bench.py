"""Bench stage: one harness for every chain, timing preprocess / infer / postprocess / end to end, and the scenarios
MLPerf names.

The chain (`prepost`) says what each stage holds and times it: ours on the host clock after a synchronize,
infer with CUDA events on a GPU; the peer with its own speed dict and the wall time. Where there is a device, the
copies inside pre and post are timed on their own with CUDA events (h2d, d2h). After the chain loop comes the
engine alone: the same number of back-to-back `execute()` calls (compute), and its throughput in images/s at the
timed shape on one stream (`opt_batch`) and at batch 1 on two streams, on the runner's lanes (`Runner.lanes`),
which replay CUDA graphs where the chain does (`cuda_graph` in the settings).
Every variant of a sweep is timed at one shape, the static variant's (`RunConfig.timed_shape`); each figure is per
batch of its first dim (`BenchResult.per_image` divides it).

Scenarios: the chain loop is single-stream at batch 1 (multi-stream at a larger `bench.batch`): one query after
another, latency percentiles, after a warm-up of a count and a duration both, and timed for a count and a
duration both (`run_until`), as trtexec does. Offline: images/s end to end (frames in, detections out, the
variant's own chain in steady state, its batches overlapped where the chain overlaps them) and of the engine
alone, at each batch of `bench.offline_batches` that the built profile holds. Server (where `bench.server_rate` is
set): Poisson arrivals served one at a time at batch 1, latency from arrival.

Last, after everything timed, each layer's time at the timed shape (or at `bench.layers_batch`) where the runtime
has a per-layer profiler (`Runner.layer_times`): a profiler slows the runs it watches, so no figure above is taken
with one.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from runner import forensics
from runner.config import BenchConfig
from runner.processing import preprocess
from runner.results import BENCH_STAGES as STAGES
from runner.results import BenchResult, LayerProfile, OfflinePoint, ServerResult, Stats, first_line

log = logging.getLogger(__name__)
THROUGHPUT_LANES = {"opt_batch": 1, "batch1_2streams": 2}  # name -> streams
OFFLINE_MIN_RUNS = 3  # timed batches per offline point, however large the batch
MIN_WARMUP = 3  # warm-up rounds however few are timed: a CUDA graph's plain run and capture, its first replay, and
#   an overlapped chain's two slots in flight


def warmup_rounds(timed: int) -> int:
    """Rounds run untimed before `timed` ones: a tenth of them, at least MIN_WARMUP."""
    return max(MIN_WARMUP, timed // 10)


def summarize(samples_ms: list[float]) -> Stats:
    a = np.asarray(samples_ms, np.float64)
    return Stats(mean=float(a.mean()), p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                 p99=float(np.percentile(a, 99)), std=float(a.std()), n=int(a.size))


def images_per_second(runner, shape: tuple[int, ...], streams: int, iters: int) -> float | None:
    """Images/s of the model alone at `shape` on `streams` lanes enqueued round-robin, `iters` rounds after
    `warmup_rounds(iters)` more, on the host clock; None where the runtime has no lanes."""
    lanes = runner.lanes(shape, streams)
    if lanes is None:
        return None
    warmup = warmup_rounds(iters)
    with lanes:
        for round_ in range(iters + warmup):
            if round_ == warmup:
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


def latency_scenario(batch: int) -> str:
    """MLPerf's name for queries timed one after another: single-stream (one image each), multi-stream (a batch)."""
    return "single-stream" if batch == 1 else "multi-stream"


def offline_batches(wanted: list[int], profile: list[list[int]]) -> tuple[list[int], dict[str, str]]:
    """The offline scenario's batches: those of `wanted` that the built profile (min, opt, max) holds, else its max
    batch (a static engine's own); and each batch of `wanted` left out, with why. Nothing where `wanted` is empty."""
    if not wanted:
        return [], {}
    lo, hi = profile[0][0], profile[2][0]
    batches = sorted({b for b in wanted if lo <= b <= hi}) or [hi]
    held = f"batch {lo} only" if lo == hi else f"batches {lo}..{hi}"
    return batches, {str(b): f"the built profile holds {held}" for b in wanted if b not in batches}


def runs_per_batch(batch: int, images: int) -> int:
    """Timed runs of an offline point: about `images` images, at least OFFLINE_MIN_RUNS batches."""
    return max(OFFLINE_MIN_RUNS, -(-images // batch))


def run_until(runs: int, seconds: float, run, first: int = 0) -> tuple[int, float]:
    """`run(n)` for n = first, first + 1, ... until it has run at least `runs` times and for `seconds`; (the runs,
    the seconds they took)."""
    n, start = 0, time.perf_counter()
    while n < runs or time.perf_counter() - start < seconds:
        run(first + n)
        n += 1
    return n, time.perf_counter() - start


def runs_text(runs: int, seconds: float) -> str:
    """'20 runs and 0.2 s', or '3 runs' where no time is asked for."""
    return f"{runs} runs" + (f" and {seconds:g} s" if seconds else "")


def batch_of(images: list[np.ndarray], i: int, batch: int) -> list[np.ndarray]:
    """The `i`-th batch of `batch` frames, cycling through `images`."""
    return [images[(i * batch + k) % len(images)] for k in range(batch)]


def offline_point(runner, chain, images: list[np.ndarray], shape: tuple[int, ...], runs: int) -> OfflinePoint:
    """`runs` batches at `shape` through the chain's `stream` (overlapped where the chain overlaps batches), after
    `warmup_rounds(runs)` more in the same stream, then the engine alone on the last batch's input. End to end,
    images/s is the timed images over the wall time from the last warm-up batch's detections out to the last timed
    batch's: the steady state, the pipeline's fill and drain left out however few batches are timed."""
    batch, hw = shape[0], shape[2:]
    runner.set_shape(shape)
    warmup = warmup_rounds(runs)
    stream = chain.stream(runner, (batch_of(images, i, batch) for i in range(warmup + runs)), hw)
    out = [time.perf_counter() for _ in stream]  # when each batch's detections are out
    wall_ms = (out[-1] - out[warmup - 1]) * 1e3
    return OfflinePoint(batch=batch, e2e_img_s=batch * runs * 1e3 / wall_ms,
                        engine_img_s=engine_images_per_second(runner, chain, batch_of(images, warmup + runs - 1, batch),
                                                              shape, runs),
                        e2e_ms_per_batch=wall_ms / runs, runs=runs)


def engine_images_per_second(runner, chain, frames: list[np.ndarray], shape: tuple[int, ...], iters: int) -> float:
    """Images/s of the engine alone at `shape`: on one lane where the runtime has lanes, else from the p50 of
    back-to-back `execute()` calls on `frames`' host-preprocessed input."""
    value = images_per_second(runner, shape, 1, iters)
    if value is not None:
        return value
    runner.set_shape(shape)
    runner.h2d(preprocess(frames, shape[2:], head=chain.head)[0])
    return shape[0] * 1e3 / float(np.percentile([runner.execute() for _ in range(iters)], 50))


def offline(runner, chain, images: list[np.ndarray], hw: tuple[int, int], batches: list[int],
            images_per_batch: int) -> tuple[list[OfflinePoint], dict[str, str]]:
    """The offline scenario's point at each of `batches`; a batch the runtime refuses (memory, say) is named with
    its error instead. (points, failed batch -> why)."""
    points, failed = [], {}
    for batch in batches:
        runs = runs_per_batch(batch, images_per_batch)
        try:
            points.append(offline_point(runner, chain, images, (batch, 3, *hw), runs))
        except Exception as exc:  # the runtime's limit at this batch; the other batches still count
            failed[str(batch)] = f"failed: {first_line(str(exc), 200)}"
            log.warning("offline: batch %d: %s", batch, failed[str(batch)])
            continue
        log.info("offline: batch %d: %.1f img/s end to end, %.1f img/s engine alone (%d runs)", batch,
                 points[-1].e2e_img_s, points[-1].engine_img_s, runs)
    return points, failed


def server(runner, chain, images: list[np.ndarray], hw: tuple[int, int], rate: float, queries: int,
           seed: int = 0) -> ServerResult:
    """`queries` images arriving as a Poisson process at `rate` images/s (exponential gaps, seeded), served one at a
    time at batch 1 in arrival order, on the host clock: an idle worker sleeps until the next arrival, a busy one
    takes the next query as soon as it is done."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, queries))
    runner.set_shape((1, 3, *hw))
    chain.run(runner, [images[0]], hw)  # warm at this shape
    latencies, start = [], time.perf_counter()
    for n, arrival in enumerate(arrivals):
        idle = arrival - (time.perf_counter() - start)
        if idle > 0:
            time.sleep(idle)
        chain.run(runner, [images[n % len(images)]], hw)
        latencies.append((time.perf_counter() - start - arrival) * 1e3)
    achieved = queries / (time.perf_counter() - start - arrivals[0])
    offered = queries / (arrivals[-1] - arrivals[0])
    log.info("server: %d queries at %.1f img/s (offered %.1f, achieved %.1f): latency p50 %.2f / p99 %.2f ms",
             queries, rate, offered, achieved, np.percentile(latencies, 50), np.percentile(latencies, 99))
    return ServerResult(target_rate=rate, offered_rate=offered, achieved_rate=achieved, queries=queries,
                        latency=summarize(latencies))


def layers_shape(shape: list[int], batch: int | None, profile: list[list[int]]) -> tuple[list[int] | None, str | None]:
    """Where each layer is profiled: the timed `shape`, or at `batch` (`bench.layers_batch`) where the built
    profile (min, opt, max) holds it; (None, why) where it does not."""
    if batch is None:
        return shape, None
    lo, hi = profile[0][0], profile[2][0]
    if not lo <= batch <= hi:
        return None, f"not profiled: bench.layers_batch={batch} is outside the built profile's batches {lo}..{hi}"
    return [batch, *shape[1:]], None


def layer_profile(runner, shape: list[int], iters: int,
                  layers_path: str | None) -> tuple[LayerProfile | None, str | None]:
    """Each layer's mean time at `shape` over `iters` profiled runs, joined with the engine inspector's layers at
    that shape where the runtime has an inspector, else those at `layers_path` (`forensics`). (profile, None);
    (None, None) where the runtime has no per-layer profiler;
    (None, why) where profiling failed, the variant's other figures standing."""
    try:
        times, layers = runner.layer_times(tuple(shape), iters), []
        if times:
            layers = runner.layer_info(tuple(shape)) or (forensics.read_layers(layers_path) if layers_path else [])
    except Exception as exc:  # the runtime's or the file's problem, said; never the variant's failure
        log.warning("bench: layer profile: %s", exc)
        return None, f"not profiled: {first_line(f'{type(exc).__name__}: {exc}', 200)}"
    if times is None:
        return None, None
    if not times:
        return None, "not profiled: the profiler reported no layer"
    note = None if layers else "no engine inspector JSON: the layers' types and precisions are unknown"
    return forensics.join(layers, times, shape, iters), note


def bench(runner, chain, images: list[np.ndarray], shape: list[int], cfg: BenchConfig,
          profile: list[list[int]], layers_path: str | None = None) -> BenchResult:
    """Time `chain` at `shape` (N, 3, H, W) over `images`, cycling through them; then the scenarios of `cfg` that
    the built `profile` (min, opt, max) holds; last, untimed, each layer's time at `shape` (or at
    `cfg.layers_batch`) where the runtime profiles layers (`layers_path`: the engine inspector's JSON)."""
    batch, hw, iters = shape[0], (shape[2], shape[3]), cfg.iters
    runner.set_shape(tuple(shape))
    pinned = runner.pin(images)
    log.info("bench: %s at %s: warm-up for %s, then %s timed...", latency_scenario(batch), list(shape),
             runs_text(cfg.warmup, cfg.warmup_s), runs_text(iters, cfg.min_timed_s))
    warmup, warmup_s = run_until(cfg.warmup, cfg.warmup_s, lambda n: chain.run(runner, batch_of(images, n, batch), hw))
    times: dict[str, list[float]] = {}

    def timed(n: int) -> None:
        for stage, ms in chain.run(runner, batch_of(images, n, batch), hw)[1].items():
            times.setdefault(stage, []).append(ms)
    timed_runs, timed_s = run_until(iters, cfg.min_timed_s, timed, first=warmup)
    compute = [runner.execute() for _ in range(iters)]
    figures, note = throughput(runner, shape, iters)
    settings = {"scenario": latency_scenario(batch), "warmup": warmup, "warmup_s": round(warmup_s, 3),
                "iters": timed_runs, "timed_s": round(timed_s, 3), "shape": list(shape), "images": len(images),
                "source_pinned": pinned, **chain.settings(), **runner.settings()}
    if note:
        settings["throughput_note"] = note
    copies = {name: summarize(times[name]) for name in ("h2d", "d2h") if name in times}
    result = BenchResult(**{stage: summarize(times[stage]) for stage in STAGES}, compute=summarize(compute),
                         settings=settings, throughput=figures, **copies)
    log.info("bench: p50 pre %.2f / infer %.2f / post %.2f / e2e %.2f ms%s", *(getattr(result, s).p50 for s in STAGES),
             "".join(f"; {k} {v:.0f} img/s" for k, v in figures.items()))
    scenarios(runner, chain, images, hw, cfg, profile, result)
    at, note = layers_shape(shape, cfg.layers_batch, profile)
    if at is not None:
        result.layers, note = layer_profile(runner, at, iters, layers_path)
    if note:
        result.settings["layers_note"] = note
    if result.layers:
        log.info("bench: %d layers profiled at %s, %.2f ms in all, %d reformats", len(result.layers.rows),
                 result.layers.shape, result.layers.total_ms, len(result.layers.reformats))
    return result


def scenarios(runner, chain, images: list[np.ndarray], hw: tuple[int, int], cfg: BenchConfig,
              profile: list[list[int]], result: BenchResult) -> None:
    """The offline scenario, and the server one where `cfg` sets its rate, into `result`, as the profile holds
    them; what was left out is named (`offline_skipped`, `settings["server_note"]`)."""
    batches, result.offline_skipped = offline_batches(list(cfg.offline_batches), profile)
    if batches:
        log.info("offline: batches %s%s", batches, said_left_out(result.offline_skipped))
    result.offline, failed = offline(runner, chain, images, hw, batches, cfg.offline_images)
    result.offline_skipped.update(failed)
    if cfg.server_rate is None:
        return
    if profile[0][0] > 1:
        result.settings["server_note"] = f"not run: the built profile's batches start at {profile[0][0]}, not 1"
    else:
        result.server = server(runner, chain, images, hw, cfg.server_rate, cfg.server_queries)


def said_left_out(skipped: dict[str, str]) -> str:
    """The log's `; not 4, 8: why`, once per reason in `skipped` (batch -> why)."""
    batches: dict[str, list[str]] = {}
    for batch, why in skipped.items():
        batches.setdefault(why, []).append(batch)
    return "".join(f"; not {', '.join(b)}: {why}" for why, b in batches.items())
