"""TensorRT runtime on cuda-python: name-based tensor I/O, pinned host buffers, one stream, CUDA events.

Besides the host pipeline (a preprocessed blob in, every output out), it runs the GPU pipeline's two ends:
`letterbox` uploads uint8 source images and letterboxes them into the input buffer, `candidates` filters the
head output by score before the copy back (kernels in `kernels`). With `cuda_graph`, each stage's GPU work
(letterbox, engine, filter) is a CUDA graph captured on first use; copies stay outside, between CUDA events.
"""
from __future__ import annotations

import ctypes
import json
import math
import time
from contextlib import contextmanager

import numpy as np

from runner.backends import Runner
from runner.backends.tensorrt import compat
from runner.backends.tensorrt.compat import cuda_call
from runner.backends.tensorrt.kernels import FIT_FIELDS, ROW, Kernels
from runner.config import BackendName
from runner.processing import Letterbox, fit

CANDIDATE_CAP = 1024  # rows per image the GPU filter copies back; more falls back to the whole output


class ShapeError(ValueError):
    """Input shape outside the engine's optimization profile."""


def load_plan(path: str) -> tuple[bytes, dict | None]:
    """Plain plan, or an ultralytics .engine: 4-byte little-endian signed length + JSON metadata + plan.
    Returns (plan, metadata or None)."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:4], "little", signed=True)
    if 0 < n <= len(data) - 4:
        try:
            meta = json.loads(data[4 : 4 + n].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = None
        if isinstance(meta, dict):
            return data[4 + n :], meta
    return data, None


def lane_profiles(dynamic: bool, profiles: int, streams: int) -> list[int | None]:
    """The optimization profile each of `streams` concurrent execution contexts selects (None: it keeps the one it
    has; the first context has profile 0). A static engine's contexts share its profile; a dynamic engine's need
    one each (on TensorRT 8.6 a second context has none, and its enqueue fails). Raises ValueError where a dynamic
    engine has fewer profiles than streams."""
    if not dynamic:
        return [None] * streams
    if profiles < streams:
        raise ValueError(f"{streams} streams on a dynamic engine need {streams} optimization profiles (one per "
                         f"execution context); this engine has {profiles}")
    return [None, *range(1, streams)]


def engine_profile(engine, input_name: str) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shape of profile 0; a static engine's one shape three times."""
    static = tuple(engine.get_tensor_shape(input_name))
    if -1 in static:
        return tuple(tuple(d) for d in engine.get_tensor_profile_shape(input_name, 0))
    return static, static, static


class TrtRunner(Runner):
    """One engine, one execution context, one CUDA stream. Single input, any number of outputs.

    Reads plain plans and ultralytics .engine files (JSON header + plan)."""

    name = BackendName.tensorrt.value

    def __init__(self, engine_path: str, cuda_graph: bool = False):
        self.engine_path, self._want_graph = engine_path, cuda_graph
        self._closed = True

    def open(self) -> None:
        import tensorrt as trt

        self._trt = trt
        self._rt = rt = compat.cudart()
        self._logger = compat.get_logger()
        plan, self.metadata = load_plan(self.engine_path)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise RuntimeError(f"cannot deserialize {self.engine_path}: {self._logger.last_error}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"cannot create an execution context: {self._logger.last_error}")
        eng = self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ValueError(f"TrtRunner supports engines with one input, this one has {inputs}")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n != self.input_name]
        self._dtypes = {n: compat.dtype_to_numpy(trt, eng.get_tensor_dtype(n)) for n in names}
        self.input_dtype = self._dtypes[self.input_name]
        self.profile = engine_profile(eng, self.input_name)
        self._use_graph = self._want_graph and self.profile[0] == self.profile[2]
        self._graph_note = "" if self._use_graph or not self._want_graph else "dynamic engine: no CUDA graph"
        self._graphs: dict[str, tuple] = {}  # stage -> (graph, executable graph)
        self._kernels: Kernels | None = None
        self._pinned: dict[int, int] = {}  # host-registered source images: address -> bytes
        self._timed_copies: set[str] = set()  # h2d, d2h: the copies whose events have been recorded
        self._stream = cuda_call(rt.cudaStreamCreate)
        self._start = cuda_call(rt.cudaEventCreate)
        self._end = cuda_call(rt.cudaEventCreate)
        self._copy_events = {copy: (cuda_call(rt.cudaEventCreate), cuda_call(rt.cudaEventCreate))
                             for copy in ("h2d", "d2h")}
        self._dev: dict[str, int] = {}
        self._host: dict[str, int] = {}
        self._capacity: dict[str, int] = {}
        self._views: dict[str, np.ndarray] = {}
        self._shape: tuple[int, ...] | None = None
        self._closed = False

    def set_shape(self, shape: tuple[int, ...]) -> None:
        """Set the input shape, size buffers (grow only) and bind every I/O tensor address."""
        shape = tuple(int(s) for s in shape)
        if shape == self._shape:
            return
        lo, opt, hi = self.profile
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise ShapeError(
                f"input shape {list(shape)} for '{self.input_name}' is outside the engine's optimization "
                f"profile 0: min={list(lo)} opt={list(opt)} max={list(hi)}"
            )
        if not self._context.set_input_shape(self.input_name, shape):
            raise ShapeError(f"TensorRT rejected input shape {list(shape)}: {self._logger.last_error}")
        for name, dtype in self._dtypes.items():
            tshape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in tshape):
                raise RuntimeError(f"shape of '{name}' unresolved after set_input_shape: {tshape}")
            self._ensure(name, math.prod(tshape) * dtype.itemsize)
            self._views[name] = self._host_array(name, dtype, math.prod(tshape)).reshape(tshape)
            if not self._context.set_tensor_address(name, self._dev[name]):
                raise RuntimeError(f"set_tensor_address('{name}') failed: {self._logger.last_error}")
        self._shape = shape
        self._destroy_graphs()  # they hold the old addresses

    def _host_array(self, name: str, dtype, count: int) -> np.ndarray:
        """The first `count` items of the pinned host buffer `name`, as an array over it (no copy)."""
        dtype = np.dtype(dtype)
        return np.frombuffer((ctypes.c_ubyte * (count * dtype.itemsize)).from_address(self._host[name]), dtype)

    def _ensure(self, name: str, nbytes: int) -> None:
        if self._capacity.get(name, -1) >= nbytes:
            return
        self._free(name)
        size = max(nbytes, 1)
        self._dev[name] = cuda_call(self._rt.cudaMalloc, size)
        self._host[name] = cuda_call(self._rt.cudaMallocHost, size)
        self._capacity[name] = nbytes

    def _free(self, name: str) -> None:
        self._views.pop(name, None)
        if name in self._dev:
            cuda_call(self._rt.cudaFree, self._dev.pop(name))
            cuda_call(self._rt.cudaFreeHost, self._host.pop(name))
            del self._capacity[name]

    def _launch(self, stage: str, enqueue) -> None:
        """Queue `enqueue`'s GPU work on the stream: replayed as a CUDA graph, captured on first use, where graphs
        are on. The first run is plain (it flushes TensorRT's deferred updates). On a failed capture it falls back
        to plain runs and notes why in settings()."""
        if self._use_graph and stage in self._graphs:
            cuda_call(self._rt.cudaGraphLaunch, self._graphs[stage][1], self._stream)
            return
        enqueue()
        if not self._use_graph:
            return
        rt = self._rt
        self.sync()
        graph = None
        try:
            cuda_call(rt.cudaStreamBeginCapture, self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
            try:
                enqueue()
            finally:
                graph = cuda_call(rt.cudaStreamEndCapture, self._stream)
            self._graphs[stage] = graph, cuda_call(rt.cudaGraphInstantiate, graph, 0)
        except RuntimeError as exc:
            if graph is not None:
                cuda_call(rt.cudaGraphDestroy, graph)
            self._destroy_graphs()
            self._use_graph, self._graph_note = False, f"CUDA graph capture failed ({stage}): {exc}"

    def _destroy_graphs(self, *stages: str) -> None:
        """Drop the graphs of `stages` (all when none is named)."""
        for stage in stages or list(self._graphs):
            if stage in self._graphs:
                graph, executable = self._graphs.pop(stage)
                cuda_call(self._rt.cudaGraphExecDestroy, executable)
                cuda_call(self._rt.cudaGraphDestroy, graph)

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"execute_async_v3 failed: {self._logger.last_error}")

    def h2d(self, blob: np.ndarray) -> None:
        """Cast ``blob`` (current shape) into the pinned input buffer and copy it to the GPU, asynchronously."""
        if self._shape is None or tuple(blob.shape) != self._shape:
            raise ValueError(f"blob shape {blob.shape} differs from the shape set: {self._shape}")
        name = self.input_name
        np.copyto(self._views[name], blob, casting="same_kind")
        with self._timed("h2d"):
            self._copy(self._dev[name], self._host[name], self._views[name].nbytes, to_device=True)

    @contextmanager
    def _timed(self, copy: str):
        """Record the CUDA events of `copy` (h2d or d2h) around the copies queued inside the block."""
        start, end = self._copy_events[copy]
        cuda_call(self._rt.cudaEventRecord, start, self._stream)
        yield
        cuda_call(self._rt.cudaEventRecord, end, self._stream)
        self._timed_copies.add(copy)

    def _copy(self, dst: int, src: int, nbytes: int, to_device: bool) -> None:
        kind = self._rt.cudaMemcpyKind
        cuda_call(self._rt.cudaMemcpyAsync, dst, src, nbytes,
                  kind.cudaMemcpyHostToDevice if to_device else kind.cudaMemcpyDeviceToHost, self._stream)

    def execute(self) -> float:
        """Run the engine (or its CUDA graph) between two events; return the GPU time in ms."""
        if self._shape is None:
            raise RuntimeError("call set_shape() before execute()")
        rt = self._rt
        cuda_call(rt.cudaEventRecord, self._start, self._stream)
        self._launch("engine", self._enqueue)
        cuda_call(rt.cudaEventRecord, self._end, self._stream)
        cuda_call(rt.cudaEventSynchronize, self._end)
        return float(cuda_call(rt.cudaEventElapsedTime, self._start, self._end))

    def d2h(self) -> dict[str, np.ndarray]:
        """Copy every output to its pinned buffer, synchronize, return copies (floats as float32)."""
        with self._timed("d2h"):
            for name in self.output_names:
                self._copy(self._host[name], self._dev[name], self._views[name].nbytes, to_device=False)
        self.sync()
        out = {}
        for name in self.output_names:
            view = self._views[name]
            out[name] = view.astype(np.float32) if view.dtype.kind == "f" else view.copy()
        return out

    def sync(self) -> None:
        cuda_call(self._rt.cudaStreamSynchronize, self._stream)

    def copy_ms(self) -> dict[str, float]:
        """GPU time of the last run's host-to-device and device-to-host copies (after a sync)."""
        elapsed = self._rt.cudaEventElapsedTime
        return {copy: float(cuda_call(elapsed, *self._copy_events[copy])) for copy in self._timed_copies}

    def _loaded_kernels(self) -> Kernels:
        if self._kernels is None:
            self._kernels = Kernels.load(self._rt)
        return self._kernels

    def pin(self, images: list[np.ndarray]) -> bool:
        """Page-lock the memory of source images that will be uploaded many times (as a decoder writing into
        pinned buffers would), so their upload is one asynchronous copy. Unpinned on close()."""
        for image in images:
            address = image.ctypes.data
            if address not in self._pinned and image.flags.c_contiguous:
                cuda_call(self._rt.cudaHostRegister, address, image.nbytes, 0)
                self._pinned[address] = image.nbytes
        return True

    def letterbox(self, images: list[np.ndarray], hw: tuple[int, int]) -> list[Letterbox]:
        """Upload uint8 BGR images and letterbox them on the GPU into the input buffer, in its dtype (the CPU
        path's geometry, `processing.fit`). Asynchronous: sync() before reading anything it wrote."""
        batch, _, h, w = self._shape
        if len(images) != batch or (h, w) != tuple(hw):
            raise ValueError(f"{len(images)} images at {list(hw)} do not fill the input shape {list(self._shape)}")
        total = sum(image.nbytes for image in images)
        if self._capacity.get("source", -1) < total:
            self._ensure("source", total)
            self._destroy_graphs("letterbox")
        self._ensure("fits", batch * FIT_FIELDS * 4)
        fits = self._host_array("fits", np.int32, batch * FIT_FIELDS).reshape(batch, FIT_FIELDS)
        staging = self._host_array("source", np.uint8, total)
        boxes, offset = [], 0
        with self._timed("h2d"):
            for n, image in enumerate(images):
                image = np.ascontiguousarray(image)
                (new_w, new_h), (top, _, left, _), box = fit(*image.shape[:2], (h, w))
                fits[n] = offset, image.shape[1], image.shape[0], new_w, new_h, left, top, 0
                source = image.ctypes.data
                if source not in self._pinned:  # through the pinned staging buffer
                    staging[offset:offset + image.nbytes] = image.reshape(-1)
                    source = self._host["source"] + offset
                self._copy(self._dev["source"] + offset, source, image.nbytes, to_device=True)
                boxes.append(box)
                offset += image.nbytes

        def enqueue():
            self._copy(self._dev["fits"], self._host["fits"], batch * FIT_FIELDS * 4, to_device=True)
            self._loaded_kernels().letterbox(self._stream, self._dev["source"], self._dev["fits"],
                                             self._dev[self.input_name], batch, (h, w), self.input_dtype == np.float16)

        self._launch("letterbox", enqueue)
        return boxes

    def read_input(self) -> np.ndarray:
        """The input buffer as the GPU holds it (float32), after a sync."""
        name = self.input_name
        self._copy(self._host[name], self._dev[name], self._views[name].nbytes, to_device=False)
        self.sync()
        return self._views[name].astype(np.float32)

    def candidates(self, conf: float) -> list[np.ndarray | None]:
        """Per image, the rows [cx, cy, w, h, score, class, anchor, 0] of the one-to-many head output whose best
        class score is above `conf`, filtered on the GPU: only these cross to the host. None for an image with
        more than CANDIDATE_CAP of them (decode the whole output instead)."""
        name = self.output_names[0]
        batch, channels, anchors = self._views[name].shape
        self._ensure("counts", batch * 4)
        self._ensure("rows", batch * CANDIDATE_CAP * ROW * 4)

        def enqueue():
            cuda_call(self._rt.cudaMemsetAsync, self._dev["counts"], 0, batch * 4, self._stream)
            self._loaded_kernels().candidates(self._stream, self._dev[name], batch, channels, anchors, conf,
                                              self._dev["rows"], self._dev["counts"], CANDIDATE_CAP,
                                              self._dtypes[name] == np.float16)

        self._launch(f"candidates@{conf}", enqueue)
        with self._timed("d2h"):
            self._copy(self._host["counts"], self._dev["counts"], batch * 4, to_device=False)
            self._copy(self._host["rows"], self._dev["rows"], batch * CANDIDATE_CAP * ROW * 4, to_device=False)
        self.sync()
        counts = self._host_array("counts", np.int32, batch)
        rows = self._host_array("rows", np.float32, batch * CANDIDATE_CAP * ROW).reshape(batch, CANDIDATE_CAP, ROW)
        return [rows[n, :k].copy() if k <= CANDIDATE_CAP else None for n, k in enumerate(counts.tolist())]

    def throughput(self, shape: tuple[int, ...], streams: int, iters: int) -> float:
        """Images per second of the engine alone at `shape`, with `streams` execution contexts, each on its
        own stream, buffers and (on a dynamic engine) optimization profile, enqueued round-robin with no copies
        and no graph. Raises ValueError, before any context is made, where the engine lacks the profiles."""
        rt, engine, batch = self._rt, self._engine, shape[0]
        dynamic = -1 in tuple(engine.get_tensor_shape(self.input_name))
        profiles = lane_profiles(dynamic, engine.num_optimization_profiles, streams)
        lanes = []
        try:
            for profile in profiles:
                context = engine.create_execution_context() if lanes else self._context
                if context is None:
                    raise RuntimeError(f"cannot create another execution context: {self._logger.last_error}")
                stream, buffers = cuda_call(rt.cudaStreamCreate), []
                lanes.append((context, stream, buffers))
                if profile is not None and not context.set_optimization_profile_async(profile, int(stream)):
                    raise RuntimeError(f"cannot select optimization profile {profile}: {self._logger.last_error}")
                if not context.set_input_shape(self.input_name, shape):
                    raise ShapeError(f"the engine does not take {list(shape)}: {self._logger.last_error}")
                for name, dtype in self._dtypes.items():
                    buffers.append(cuda_call(rt.cudaMalloc, max(math.prod(context.get_tensor_shape(name)), 1)
                                             * dtype.itemsize))
                    context.set_tensor_address(name, buffers[-1])
            for round_ in range(iters + iters // 10):  # the first tenth warms up
                if round_ == iters // 10:
                    for _, stream, _ in lanes:
                        cuda_call(rt.cudaStreamSynchronize, stream)
                    start = time.perf_counter()
                for context, stream, _ in lanes:
                    if not context.execute_async_v3(int(stream)):
                        raise RuntimeError(f"execute_async_v3 failed: {self._logger.last_error}")
            for _, stream, _ in lanes:
                cuda_call(rt.cudaStreamSynchronize, stream)
            return iters * streams * batch / (time.perf_counter() - start)
        finally:
            for context, stream, buffers in lanes:
                cuda_call(rt.cudaStreamSynchronize, stream)
                cuda_call(rt.cudaStreamDestroy, stream)
                for buffer in buffers:
                    cuda_call(rt.cudaFree, buffer)
            self._shape = None  # the own context's addresses changed: the next set_shape binds them again
            self._destroy_graphs()

    def settings(self) -> dict:
        s = {
            "cuda_graph": self._use_graph,
            "io_dtypes": {n: d.name for n, d in self._dtypes.items()},
            "trt_version": self._trt.__version__,
            "pinned_host": True,
        }
        if self._graph_note:
            s["cuda_graph_note"] = self._graph_note
        return s

    def close(self) -> None:
        """Free graph, buffers, events, stream, context and engine (idempotent)."""
        if self._closed:
            return
        self._closed = True
        rt = self._rt
        self.sync()
        self._destroy_graphs()
        if self._kernels is not None:
            self._kernels.unload()
        for address in self._pinned:
            cuda_call(rt.cudaHostUnregister, address)
        self._pinned.clear()
        for name in list(self._dev):
            self._free(name)
        for event in (self._start, self._end, *(e for pair in self._copy_events.values() for e in pair)):
            cuda_call(rt.cudaEventDestroy, event)
        cuda_call(rt.cudaStreamDestroy, self._stream)
        self._context = None
        self._engine = None
        self._runtime = None
