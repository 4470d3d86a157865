"""TensorRT runtime on cuda-python: name-based tensor I/O, pinned host buffers, one stream, CUDA events."""
from __future__ import annotations

import ctypes
import json
import math

import numpy as np

from runner.backends import Runner
from runner.backends.tensorrt import compat
from runner.backends.tensorrt.compat import cuda_call


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


def engine_profile(engine, input_name: str) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shape of profile 0; a static engine's one shape three times."""
    static = tuple(engine.get_tensor_shape(input_name))
    if -1 in static:
        return tuple(tuple(d) for d in engine.get_tensor_profile_shape(input_name, 0))
    return static, static, static


class TrtRunner(Runner):
    """One engine, one execution context, one CUDA stream. Single input, any number of outputs.

    Reads plain plans and ultralytics .engine files (JSON header + plan)."""

    name = "tensorrt"

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
        self._graph = self._graph_exec = None
        self._stream = cuda_call(rt.cudaStreamCreate)
        self._start = cuda_call(rt.cudaEventCreate)
        self._end = cuda_call(rt.cudaEventCreate)
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
            nbytes = math.prod(tshape) * dtype.itemsize
            self._ensure(name, nbytes)
            self._views[name] = np.frombuffer(
                (ctypes.c_ubyte * nbytes).from_address(self._host[name]), dtype=dtype
            ).reshape(tshape)
            if not self._context.set_tensor_address(name, self._dev[name]):
                raise RuntimeError(f"set_tensor_address('{name}') failed: {self._logger.last_error}")
        self._shape = shape
        if self._use_graph and self._graph_exec is None:
            self._capture_graph()

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

    def _capture_graph(self) -> None:
        """Capture execute_async_v3 into a CUDA graph (after one plain run that flushes deferred updates).
        On failure, fall back to plain execution and note why in settings()."""
        rt = self._rt
        self._enqueue()
        self.sync()
        try:
            cuda_call(rt.cudaStreamBeginCapture, self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
            try:
                enqueued = self._context.execute_async_v3(int(self._stream))
            finally:
                self._graph = cuda_call(rt.cudaStreamEndCapture, self._stream)
            if not enqueued:
                raise RuntimeError(f"execute_async_v3 failed during capture: {self._logger.last_error}")
            self._graph_exec = cuda_call(rt.cudaGraphInstantiate, self._graph, 0)
        except RuntimeError as exc:
            self._destroy_graph()
            self._use_graph, self._graph_note = False, f"CUDA graph capture failed: {exc}"

    def _destroy_graph(self) -> None:
        if self._graph_exec is not None:
            cuda_call(self._rt.cudaGraphExecDestroy, self._graph_exec)
        if self._graph is not None:
            cuda_call(self._rt.cudaGraphDestroy, self._graph)
        self._graph = self._graph_exec = None

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"execute_async_v3 failed: {self._logger.last_error}")

    def h2d(self, blob: np.ndarray) -> None:
        """Cast ``blob`` (current shape) into the pinned input buffer and copy it to the GPU, asynchronously."""
        if self._shape is None or tuple(blob.shape) != self._shape:
            raise ValueError(f"blob shape {blob.shape} differs from the shape set: {self._shape}")
        name = self.input_name
        np.copyto(self._views[name], blob, casting="same_kind")
        cuda_call(
            self._rt.cudaMemcpyAsync, self._dev[name], self._host[name], self._views[name].nbytes,
            self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream,
        )

    def execute(self) -> float:
        """Run the engine (or its CUDA graph) between two events; return the GPU time in ms."""
        if self._shape is None:
            raise RuntimeError("call set_shape() before execute()")
        rt = self._rt
        cuda_call(rt.cudaEventRecord, self._start, self._stream)
        if self._graph_exec is not None:
            cuda_call(rt.cudaGraphLaunch, self._graph_exec, self._stream)
        else:
            self._enqueue()
        cuda_call(rt.cudaEventRecord, self._end, self._stream)
        cuda_call(rt.cudaEventSynchronize, self._end)
        return float(cuda_call(rt.cudaEventElapsedTime, self._start, self._end))

    def d2h(self) -> dict[str, np.ndarray]:
        """Copy every output to its pinned buffer, synchronize, return copies (floats as float32)."""
        for name in self.output_names:
            cuda_call(
                self._rt.cudaMemcpyAsync, self._host[name], self._dev[name], self._views[name].nbytes,
                self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream,
            )
        self.sync()
        out = {}
        for name in self.output_names:
            view = self._views[name]
            out[name] = view.astype(np.float32) if view.dtype.kind == "f" else view.copy()
        return out

    def sync(self) -> None:
        cuda_call(self._rt.cudaStreamSynchronize, self._stream)

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
        self._destroy_graph()
        for name in list(self._dev):
            self._free(name)
        cuda_call(rt.cudaEventDestroy, self._start)
        cuda_call(rt.cudaEventDestroy, self._end)
        cuda_call(rt.cudaStreamDestroy, self._stream)
        self._context = None
        self._engine = None
        self._runtime = None
