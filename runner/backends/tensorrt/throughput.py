"""Throughput lanes of a `TrtRunner`'s engine: `streams` execution contexts at one input shape, each on its own
stream and device buffers, for `bench.images_per_second` to enqueue round-robin with no copies. Where the runner
replays CUDA graphs, each lane replays its own (captured after one plain run, as the runner's): the engine alone is
timed with the launches the chain has, so its images/s is not the host's launch rate at small batches.

A dynamic engine's concurrent contexts need an optimization profile each (on TensorRT 8.6 a second context has
none, and its enqueue fails), and profile 0 stays with the context that holds it: lane 0 is the runner's own
context, lent (`TrtRunner.lend_context`), and the others select profiles 1, 2, ...
"""
from __future__ import annotations

import math
from functools import partial

from runner.backends.tensorrt.compat import cuda_call
from runner.backends.tensorrt.runtime import CudaGraphs, ShapeError


def lane_profiles(dynamic: bool, profiles: int, streams: int) -> list[int | None]:
    """The optimization profile each of `streams` concurrent execution contexts selects (None: it keeps the one it
    has; the first context has profile 0). A static engine's contexts share its profile; a dynamic engine's need
    one each. Raises ValueError where a dynamic engine has fewer profiles than streams."""
    if not dynamic:
        return [None] * streams
    if profiles < streams:
        raise ValueError(f"{streams} streams on a dynamic engine need {streams} optimization profiles (one per "
                         f"execution context); this engine has {profiles}")
    return [None, *range(1, streams)]


class Lanes:
    """The lanes, made at once: raises ValueError before any context is made where the engine lacks the profiles,
    ShapeError where it does not take `shape`. A context manager; close() waits for and frees them."""

    def __init__(self, runner, shape: tuple[int, ...], streams: int):
        engine = runner.engine
        dynamic = -1 in tuple(engine.get_tensor_shape(runner.input_name))
        profiles = lane_profiles(dynamic, engine.num_optimization_profiles, streams)
        self._rt, self._logger = runner.rt, runner.logger
        self._lanes: list[tuple] = []  # (context, stream, buffers, graphs)
        try:
            for profile in profiles:
                context = engine.create_execution_context() if self._lanes else runner.lend_context()
                if context is None:
                    raise RuntimeError(f"cannot create another execution context: {self._logger.last_error}")
                self._add(context, profile, runner.input_name, shape, runner.dtypes, runner.graphs.on)
        except BaseException:
            self.close()
            raise

    def _add(self, context, profile: int | None, input_name: str, shape: tuple[int, ...], dtypes: dict,
             graphs_wanted: bool) -> None:
        rt = self._rt
        stream, buffers = cuda_call(rt.cudaStreamCreate), []
        graphs = CudaGraphs(rt, stream, graphs_wanted)
        self._lanes.append((context, stream, buffers, graphs))
        if profile is not None and not context.set_optimization_profile_async(profile, int(stream)):
            raise RuntimeError(f"cannot select optimization profile {profile}: {self._logger.last_error}")
        if not context.set_input_shape(input_name, shape):
            raise ShapeError(f"the engine does not take {list(shape)}: {self._logger.last_error}")
        for name, dtype in dtypes.items():
            buffers.append(cuda_call(rt.cudaMalloc, max(math.prod(context.get_tensor_shape(name)), 1) * dtype.itemsize))
            context.set_tensor_address(name, buffers[-1])
        graphs.at(shape, moved=False)

    @property
    def graphs(self) -> bool:
        """Whether every lane replays a CUDA graph (a failed capture turns its lane's off)."""
        return bool(self._lanes) and all(graphs.on for *_, graphs in self._lanes)

    def enqueue(self) -> None:
        """One run on every lane: its CUDA graph where graphs are on."""
        for context, stream, _, graphs in self._lanes:
            graphs.launch("engine", partial(self._run, context, stream))

    def _run(self, context, stream) -> None:
        if not context.execute_async_v3(int(stream)):
            raise RuntimeError(f"execute_async_v3 failed: {self._logger.last_error}")

    def synchronize(self) -> None:
        for _, stream, *_ in self._lanes:
            cuda_call(self._rt.cudaStreamSynchronize, stream)

    def close(self) -> None:
        self.synchronize()
        for _, stream, buffers, graphs in self._lanes:
            graphs.drop()
            cuda_call(self._rt.cudaStreamDestroy, stream)
            for buffer in buffers:
                cuda_call(self._rt.cudaFree, buffer)
        self._lanes = []

    def __enter__(self) -> Lanes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
