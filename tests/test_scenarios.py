"""The scenarios on onnxruntime on the CPU: single-stream, offline (a batch sweep end to end and of the engine alone,
limited to the batches the built profile holds) and server (Poisson arrivals, one worker), on yolov8n's dynamic
128-px ONNX and real frames. The records of a sweep (results.json, MLflow, summary) are in test_comparable.py."""
from __future__ import annotations

import json
import math
import time

import cv2
import numpy as np
import pytest
from conftest import ASSETS, SMALL_IMGSZ, export_spec

from runner.backends.onnxruntime import OrtRunner
from runner.bench import bench, offline_batches, offline_point, run_until, runs_per_batch, warmup_rounds
from runner.config import BenchConfig
from runner.export import export_onnx
from runner.prepost import Chain
from runner.processing import postprocess, preprocess
from runner.results import BenchResult

PROFILE = [[1, 3, 64, 64], [1, 3, 128, 128], [4, 3, 128, 128]]
BY_COUNT = {"warmup_s": 0, "min_timed_s": 0}  # the chain loop by its counts alone
SHAPE = [1, 3, *SMALL_IMGSZ]


class CountingChain(Chain):
    """Our chain, saying how many frames each run was given."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def run(self, runner, frames, hw):
        self.batches.append(len(frames))
        return super().run(runner, frames, hw)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    bus = cv2.imread(str(ASSETS / "images" / "bus.jpg"))
    return [bus, cv2.resize(bus, (320, 240)), np.ascontiguousarray(bus[100:500, 50:700])]


@pytest.fixture(scope="module")
def onnx_path(export_cache) -> str:
    return export_onnx(export_spec("ultralytics", dynamic=True, imgsz=SMALL_IMGSZ), export_cache).path


def test_offline_batches_are_those_the_profile_holds():
    assert offline_batches([1, 8, 32], [[1, 3, 64, 64], [4, 3, 128, 128], [8, 3, 128, 128]]) == \
        ([1, 8], {"32": "the built profile holds batches 1..8"})
    static = [[4, 3, 128, 128]] * 3
    assert offline_batches([1, 8], static) == ([4], {"1": "the built profile holds batch 4 only",
                                                     "8": "the built profile holds batch 4 only"})
    assert offline_batches([], static) == ([], {})
    assert [runs_per_batch(b, 512) for b in (1, 8, 32, 512)] == [512, 64, 16, 3]
    assert [warmup_rounds(n) for n in (3, 16, 64, 512)] == [3, 3, 6, 51]


class HostOverlap:
    """A stand-in for TensorRT's overlapped batches (`Overlapped`; CUDA does not run here): each batch letterboxed
    and run on the host, handed back as `Overlapped.run` hands it: the first output, or per image the detections in
    source pixels that the GPU score filter and NMS give, None for an image past the filter's cap (`past_cap`)."""

    def __init__(self, runner, detections: bool, past_cap: tuple[int, ...] = ()):
        self.runner, self.detections, self.past_cap = runner, detections, past_cap

    def run(self, batches, hw, conf, iou, max_det):
        for n, frames in enumerate(batches):
            blob, boxes = preprocess(frames, hw)
            out = self.runner.infer(blob)["output0"]
            found = [None if n in self.past_cap else dets for dets in postprocess(out, boxes, conf, iou, max_det)]
            yield frames, boxes, found if self.detections else out

    def settings(self) -> str:
        return "overlapped: on the host"


@pytest.mark.parametrize(("detections", "past_cap"), [(False, ()), (True, ()), (True, (1,))],
                         ids=["output", "detections", "past-the-cap"])
def test_a_chain_streams_overlapped_batches_into_the_detections_of_one_batch_at_a_time(onnx_path, frames, detections,
                                                                                      past_cap):
    """`Chain.stream` decodes what an overlap hands back (the first output) or takes its detections in source
    pixels (a batch past the filter's cap runs again through the chain): the detections the chain gives one batch at
    a time."""
    batches = [frames[:2], frames[1:], frames[::2]]
    hw = tuple(SMALL_IMGSZ)
    with OrtRunner(onnx_path) as runner:
        runner.set_shape((2, 3, *hw))
        expected = list(Chain(conf=0.01).stream(runner, batches, hw))  # a 128-px model finds little above 0.25
        overlapped = Chain(conf=0.01, overlap=HostOverlap(runner, detections, past_cap))
        got = list(overlapped.stream(runner, batches, hw))
        assert overlapped.settings()["offline"] == "overlapped: on the host"
    assert Chain().settings()["offline"] == "one batch at a time"
    assert sum(len(d) for batch in expected for d in batch) > 0
    for ours, theirs in zip(got, expected, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_offline_sweeps_the_batches_end_to_end_and_the_engine_alone(onnx_path, frames):
    cfg = BenchConfig(warmup=1, iters=3, offline_batches=[4, 1, 2, 16], offline_images=8, **BY_COUNT)
    chain = CountingChain()
    with OrtRunner(onnx_path) as runner:
        result = bench(runner, chain, frames, SHAPE, cfg, PROFILE)
    assert result.settings["scenario"] == "single-stream" and result.e2e.n == 3
    assert [p.batch for p in result.offline] == [1, 2, 4]
    assert result.offline_skipped == {"16": "the built profile holds batches 1..4"}
    runs = [8, 4, 3]
    assert [p.runs for p in result.offline] == runs
    warmups = [3, 3, 3]  # at least MIN_WARMUP, in the same stream as the timed batches
    offline_runs = chain.batches[1 + 3:]  # after the single-stream warm-up and timed runs
    assert offline_runs == [b for b, n, w in zip((1, 2, 4), runs, warmups) for _ in range(n + w)]
    for point in result.offline:
        assert all(math.isfinite(v) and v > 0 for v in (point.e2e_img_s, point.engine_img_s, point.e2e_ms_per_batch))
    best = result.offline_best()
    assert best.e2e_img_s == max(p.e2e_img_s for p in result.offline)
    assert BenchResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_run_until_runs_for_the_count_and_the_time_both():
    calls = []
    assert run_until(3, 0, calls.append, first=5)[0] == 3 and calls == [5, 6, 7]
    runs, seconds = run_until(1, 0.05, lambda n: time.sleep(0.01))
    assert seconds >= 0.05 and runs <= 5  # each run takes 0.01 s or more: the fifth ends past the time
    assert run_until(4, 0.001, lambda n: time.sleep(0.01))[0] == 4  # the count outlasts the time


def test_the_chain_loop_warms_up_and_times_for_its_seconds_too(onnx_path, frames):
    """As trtexec does: a warm-up of 1 run and 0.2 s, then 2 timed runs and 0.2 s, each run counted and recorded."""
    chain = CountingChain()
    cfg = BenchConfig(warmup=1, warmup_s=0.2, iters=2, min_timed_s=0.2, offline_batches=[])
    with OrtRunner(onnx_path) as runner:
        settings = bench(runner, chain, frames, SHAPE, cfg, PROFILE).settings
    assert settings["warmup_s"] >= 0.2 and settings["timed_s"] >= 0.2
    assert settings["warmup"] > 1 and settings["iters"] > 2
    assert len(chain.batches) == settings["warmup"] + settings["iters"]


class SlowToFill(Chain):
    """Our chain, its offline stream filling for half a second before the first detections come out, then giving
    one batch's every few milliseconds (no detection)."""

    def stream(self, runner, batches, hw):
        time.sleep(0.5)
        for frames in batches:
            time.sleep(0.005)
            yield [np.zeros((0, 6), np.float32) for _ in frames]


def test_offline_end_to_end_is_the_steady_state_not_the_fill(onnx_path, frames):
    """Three timed batches after the warm-up ones: the fill is outside the clock (inside, a batch would take over
    500 / 3 ms)."""
    with OrtRunner(onnx_path) as runner:
        point = offline_point(runner, SlowToFill(), frames, (2, 3, *SMALL_IMGSZ), runs=3)
    assert point.runs == 3 and point.e2e_ms_per_batch < 100
    assert point.e2e_img_s == pytest.approx(2 * 1e3 / point.e2e_ms_per_batch)


def test_a_static_profile_gives_its_own_batch_and_no_list_none(onnx_path, frames):
    """A profile of batch 2 only: offline at 2, the listed batches named, no server (it serves batch 1)."""
    with OrtRunner(onnx_path) as runner:
        static = bench(runner, Chain(), frames, [2, 3, *SMALL_IMGSZ], BenchConfig(
            warmup=0, iters=1, offline_batches=[1, 8], offline_images=4, server_rate=100.0, **BY_COUNT),
            [[2, 3, *SMALL_IMGSZ]] * 3)
        off = bench(runner, Chain(), frames, SHAPE, BenchConfig(warmup=0, iters=1, offline_batches=[], **BY_COUNT),
                    PROFILE)
    assert static.settings["scenario"] == "multi-stream"
    assert [(p.batch, p.runs) for p in static.offline] == [(2, 3)]
    assert set(static.offline_skipped) == {"1", "8"}
    assert static.server is None and static.settings["server_note"] == \
        "not run: the built profile's batches start at 2, not 1"
    assert off.offline == [] and off.offline_skipped == {} and off.offline_best() is None


def test_server_queues_poisson_arrivals_behind_one_worker(onnx_path, frames):
    """Far above capacity queries queue and latency grows; at a tenth of the capacity just measured the worker keeps
    up with the arrivals. (Latencies are not compared: a CPU runtime woken after each idle gap serves slower than
    back to back.)"""
    queries = 12
    with OrtRunner(onnx_path) as runner:
        flooded = bench(runner, Chain(), frames, SHAPE, BenchConfig(
            warmup=1, iters=5, offline_batches=[], server_rate=1e6, server_queries=queries, **BY_COUNT), PROFILE)
        service = flooded.e2e.p50
        rate = 1e3 / (10 * service)  # images/s: a tenth of what one worker serves on this host now
        calm = bench(runner, Chain(), frames, SHAPE, BenchConfig(
            warmup=1, iters=5, offline_batches=[], server_rate=rate, server_queries=queries, **BY_COUNT), PROFILE)
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / rate, queries))
    assert calm.server.queries == queries and calm.server.latency.n == queries
    assert calm.server.offered_rate == pytest.approx(queries / (arrivals[-1] - arrivals[0]))
    assert calm.server.offered_rate / 2 < calm.server.achieved_rate <= calm.server.offered_rate  # it keeps up
    assert flooded.server.achieved_rate < flooded.server.offered_rate / 100  # it cannot
    assert flooded.server.latency.p99 > 5 * service  # the last queries waited for the ones before them