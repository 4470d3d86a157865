"""TensorRT runtime on cuda-python: name-based tensor I/O, pinned host buffers, one stream, CUDA events.

`TrtRunner` only opens an engine, runs it on its input and closes it. What runs around it on the same stream lives
apart and borrows what it needs from the runner: the GPU letterbox and score filter in `prepost` (kernels in
`kernels`), the overlapped offline batches in `overlap`, the throughput lanes in `throughput`. With `cuda_graph`,
each stage's GPU work (letterbox, engine, filter) is a CUDA graph per input shape, captured on first use at it
(`CudaGraphs`); copies stay outside, between CUDA events.
"""
from __future__ import annotations

import ctypes
import json
import math
import time
from contextlib import contextmanager

import numpy as np

from runner import forensics
from runner.backends import Runner
from runner.backends.tensorrt import compat
from runner.backends.tensorrt.compat import cuda_call
from runner.config import BackendName
from runner.processing import INT8_MAX, decode_maps, quantize_input


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


def copy_async(rt, stream, dst: int, src: int, nbytes: int, to_device: bool) -> None:
    """Queue a copy between pinned host and device memory on `stream`."""
    kind = rt.cudaMemcpyKind
    cuda_call(rt.cudaMemcpyAsync, dst, src, nbytes,
              kind.cudaMemcpyHostToDevice if to_device else kind.cudaMemcpyDeviceToHost, stream)


class Buffers:
    """Pinned host buffers by name, each paired with a device buffer of the same size unless asked for alone (one
    that kernels read over the bus); they only grow."""

    def __init__(self, rt):
        self._rt = rt
        self.device: dict[str, int] = {}
        self.host: dict[str, int] = {}
        self._capacity: dict[str, int] = {}

    def ensure(self, name: str, nbytes: int, device: bool = True, zeroed: bool = False) -> bool:
        """At least `nbytes` under `name` (on the host only where not `device`; the device's set to zero where
        `zeroed`); True where it (re)allocated, which moves the buffer."""
        if self._capacity.get(name, -1) >= nbytes:
            return False
        self.free(name)
        size = max(nbytes, 1)
        if device:
            self.device[name] = cuda_call(self._rt.cudaMalloc, size)
            if zeroed:
                cuda_call(self._rt.cudaMemset, self.device[name], 0, size)
        self.host[name] = cuda_call(self._rt.cudaMallocHost, size)
        self._capacity[name] = nbytes
        return True

    def host_array(self, name: str, dtype, count: int) -> np.ndarray:
        """The first `count` items of the pinned host buffer `name`, as an array over it (no copy)."""
        dtype = np.dtype(dtype)
        return np.frombuffer((ctypes.c_ubyte * (count * dtype.itemsize)).from_address(self.host[name]), dtype)

    def free(self, name: str) -> None:
        if name in self.device:
            cuda_call(self._rt.cudaFree, self.device.pop(name))
        if name in self.host:
            cuda_call(self._rt.cudaFreeHost, self.host.pop(name))
            del self._capacity[name]

    def close(self) -> None:
        for name in list(self.host):
            self.free(name)


class CudaGraphs:
    """Each stage's GPU work on one stream as CUDA graphs, one per input shape: captured on first use at a shape and
    replayed while that shape repeats, so a dynamic engine replays graphs too. A graph holds the shape and the
    addresses it was captured with: it is only replayed at its shape (`at`), and moving a buffer drops it. The first
    run of every stage after each shape change is plain: it flushes TensorRT's deferred updates for that shape, which
    a replay would skip. The stages of one runner share one switch: a failed capture turns graphs off for all of
    them, and `note` says why."""

    def __init__(self, rt, stream, wanted: bool):
        self._rt, self._stream = rt, stream
        self.on, self.note = wanted, ""
        self._graphs: dict[tuple, tuple] = {}  # (stage, shape, variant) -> (graph, executable graph)
        self._shape: tuple[int, ...] | None = None
        self._ran: set[str] = set()  # the stages run since the shape was last set

    def at(self, shape: tuple[int, ...] | None, moved: bool) -> None:
        """The runner set its input `shape` (None: unbound); `moved`: it reallocated a buffer, which every graph
        held."""
        if moved:
            self.drop()
        self._shape, self._ran = shape, set()

    def launch(self, stage: str, enqueue, variant=None) -> None:
        """Queue `enqueue`'s GPU work: replayed as the stage's graph at the shape set (and `variant`, a value baked
        into it) where graphs are on; plain on the stage's first run at the shape, captured then where no graph is
        kept for it. On a failed capture it falls back to plain runs."""
        key = (stage, self._shape, variant)
        if self.on and stage in self._ran and key in self._graphs:
            cuda_call(self._rt.cudaGraphLaunch, self._graphs[key][1], self._stream)
            return
        enqueue()
        self._ran.add(stage)
        if self.on and key not in self._graphs:
            self._capture(key, enqueue)

    def _capture(self, key: tuple, enqueue) -> None:
        rt = self._rt
        cuda_call(rt.cudaStreamSynchronize, self._stream)
        graph = None
        try:
            cuda_call(rt.cudaStreamBeginCapture, self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
            try:
                enqueue()
            finally:
                graph = cuda_call(rt.cudaStreamEndCapture, self._stream)
            self._graphs[key] = graph, cuda_call(rt.cudaGraphInstantiate, graph, 0)
        except RuntimeError as exc:
            if graph is not None:
                cuda_call(rt.cudaGraphDestroy, graph)
            self.drop()
            self.on, self.note = False, f"CUDA graph capture failed ({key[0]} at {list(key[1] or ())}): {exc}"

    def __len__(self) -> int:
        """The graphs kept, over every stage and shape."""
        return len(self._graphs)

    def drop(self, *stages: str) -> None:
        """Destroy the graphs of `stages` at every shape (all graphs when none is named): they hold the addresses
        they were captured with."""
        for key in [k for k in self._graphs if not stages or k[0] in stages]:
            graph, executable = self._graphs.pop(key)
            cuda_call(self._rt.cudaGraphExecDestroy, executable)
            cuda_call(self._rt.cudaGraphDestroy, graph)


class TrtRunner(Runner):
    """One engine, one execution context, one CUDA stream. Single input, any number of outputs.

    Reads plain plans and ultralytics .engine files (JSON header + plan). What runs around the engine on its stream
    (`gpu_letterbox`, `gpu_score_filter`, `lanes`) takes `stream`, `graphs`, `timed` and `tensor` from it, and is
    closed with it. `head_maps`: an engine that ends at a Detect head's maps (`rewrite.cut_at_head_maps`'s record):
    its outputs on the host are their decode, under the original output's name. `input_range`: an int8 input's
    (the build's record), at which the host and the GPU letterbox quantize it."""

    name = BackendName.tensorrt.value
    queues = True

    def __init__(self, engine_path: str, cuda_graph: bool = False, head_maps: dict | None = None,
                 input_range: float | None = None):
        self.engine_path, self._want_graph, self.head_maps = engine_path, cuda_graph, head_maps
        self.input_range = input_range
        self._closed = True

    def open(self) -> None:
        import tensorrt as trt

        self._trt = trt
        self.rt = rt = compat.cudart()
        self.logger = compat.get_logger()
        plan, self.metadata = load_plan(self.engine_path)
        self._runtime = trt.Runtime(self.logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(f"cannot deserialize {self.engine_path}: {self.logger.last_error}")
        self._context = self.engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"cannot create an execution context: {self.logger.last_error}")
        eng = self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ValueError(f"TrtRunner supports engines with one input, this one has {inputs}")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n != self.input_name]
        self.dtypes = {n: compat.dtype_to_numpy(trt, eng.get_tensor_dtype(n)) for n in names}
        self.input_dtype = self.dtypes[self.input_name]
        if self.input_dtype == np.int8 and not self.input_range:
            raise ValueError(f"{self.engine_path} takes an int8 input; its range (the build's input_range) is needed "
                             f"to quantize it")
        self.input_levels = INT8_MAX / self.input_range if self.input_dtype == np.int8 else 1.0
        self.profile = engine_profile(eng, self.input_name)
        self.stream = cuda_call(rt.cudaStreamCreate)
        self.graphs = CudaGraphs(rt, self.stream, self._want_graph)
        self._buffers = Buffers(rt)
        self._views: dict[str, np.ndarray] = {}
        self._ends: list = []  # what runs around the engine on its stream, closed with it
        self._pinned: dict[int, int] = {}  # host-registered source images: address -> bytes
        self._timed_copies: set[str] = set()  # h2d, d2h: the copies whose events have been recorded
        self._start = cuda_call(rt.cudaEventCreate)
        self._end = cuda_call(rt.cudaEventCreate)
        self._copy_events = {copy: (cuda_call(rt.cudaEventCreate), cuda_call(rt.cudaEventCreate))
                             for copy in ("h2d", "d2h")}
        self._posted = cuda_call(rt.cudaEventCreate)  # the end of the last post's GPU work (`posted`)
        self.shape: tuple[int, ...] | None = None
        self.upload_queued_at = 0.0  # perf_counter() as the last upload's events started (`timed`)
        self._closed = False

    def set_shape(self, shape: tuple[int, ...]) -> None:
        """Set the input shape, size buffers (grow only) and bind every I/O tensor address."""
        shape = tuple(int(s) for s in shape)
        if shape == self.shape:
            return
        lo, opt, hi = self.profile
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise ShapeError(
                f"input shape {list(shape)} for '{self.input_name}' is outside the engine's optimization "
                f"profile 0: min={list(lo)} opt={list(opt)} max={list(hi)}"
            )
        if not self._context.set_input_shape(self.input_name, shape):
            raise ShapeError(f"TensorRT rejected input shape {list(shape)}: {self.logger.last_error}")
        buffers, moved = self._buffers, False
        for name, dtype in self.dtypes.items():
            tshape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in tshape):
                raise RuntimeError(f"shape of '{name}' unresolved after set_input_shape: {tshape}")
            moved |= buffers.ensure(name, math.prod(tshape) * dtype.itemsize)
            self._views[name] = buffers.host_array(name, dtype, math.prod(tshape)).reshape(tshape)
            if not self._context.set_tensor_address(name, buffers.device[name]):
                raise RuntimeError(f"set_tensor_address('{name}') failed: {self.logger.last_error}")
        self.shape = shape
        self.graphs.at(shape, moved)

    def tensor(self, name: str) -> tuple[int, tuple[int, ...], np.dtype]:
        """I/O tensor `name` at the shape set: (device address, shape, dtype)."""
        return self._buffers.device[name], self._views[name].shape, self.dtypes[name]

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"execute_async_v3 failed: {self.logger.last_error}")

    def h2d(self, blob: np.ndarray) -> None:
        """Cast ``blob`` (current shape) into the pinned input buffer and copy it to the GPU, asynchronously."""
        if self.shape is None or tuple(blob.shape) != self.shape:
            raise ValueError(f"blob shape {blob.shape} differs from the shape set: {self.shape}")
        name = self.input_name
        if self.input_dtype == np.int8:
            blob = quantize_input(blob, self.input_levels)
        np.copyto(self._views[name], blob, casting="same_kind")
        with self.timed("h2d"):
            self.copy(self._buffers.device[name], self._buffers.host[name], self._views[name].nbytes, to_device=True)

    @contextmanager
    def timed(self, copy: str):
        """Record the CUDA events of `copy` (h2d or d2h) around the copies queued inside the block; for h2d, the host
        clock as it starts (`upload_queued_at`)."""
        start, end = self._copy_events[copy]
        if copy == "h2d":  # a run starts: the copies of the one before are not its own
            self.upload_queued_at = time.perf_counter()
            self._timed_copies.clear()
        cuda_call(self.rt.cudaEventRecord, start, self.stream)
        yield
        cuda_call(self.rt.cudaEventRecord, end, self.stream)
        self._timed_copies.add(copy)

    def copy(self, dst: int, src: int, nbytes: int, to_device: bool) -> None:
        """Queue a copy between pinned host and device memory on the runner's stream."""
        copy_async(self.rt, self.stream, dst, src, nbytes, to_device)

    def execute(self) -> float:
        """Run the engine (or its CUDA graph) between two events; return the GPU time in ms."""
        self.launch()
        cuda_call(self.rt.cudaEventSynchronize, self._end)
        return self.infer_ms()

    def launch(self) -> None:
        """Queue one run of the engine between its two events, without waiting: `infer_ms` once it is done."""
        if self.shape is None:
            raise RuntimeError("call set_shape() before execute()")
        cuda_call(self.rt.cudaEventRecord, self._start, self.stream)
        self.enqueue()
        cuda_call(self.rt.cudaEventRecord, self._end, self.stream)

    def infer_ms(self) -> float:
        """GPU ms of the last engine run (`launch`), once it is done."""
        return float(cuda_call(self.rt.cudaEventElapsedTime, self._start, self._end))

    def around_engine_ms(self) -> tuple[float, float]:
        """GPU ms from the last upload's start (h2d) to the last engine run's start, and from its end to the end of
        the last post's work (`posted`): the GPU work of a pre and a post queued with the engine's run, once done."""
        elapsed, upload = self.rt.cudaEventElapsedTime, self._copy_events["h2d"][0]
        return float(cuda_call(elapsed, upload, self._start)), float(cuda_call(elapsed, self._end, self._posted))

    def posted(self) -> None:
        """Mark the end of the post's GPU work just queued (the copy back of the outputs, or the GPU NMS writing the
        detections to the host)."""
        cuda_call(self.rt.cudaEventRecord, self._posted, self.stream)

    def enqueue(self) -> None:
        """Queue one run of the engine (its CUDA graph at the shape set, where graphs are on) on the stream."""
        self.graphs.launch("engine", self._enqueue)

    def d2h(self) -> dict[str, np.ndarray]:
        """Copy every output to its pinned buffer, synchronize, return copies (floats as float32)."""
        self.queue_d2h()
        self.sync()
        return self.outputs()

    def queue_d2h(self) -> None:
        """Queue the copy of every output to its pinned buffer (`outputs` after a sync)."""
        with self.timed("d2h"):
            for name in self.output_names:
                self.copy(self._buffers.host[name], self._buffers.device[name], self._views[name].nbytes,
                          to_device=False)
        self.posted()

    def outputs(self) -> dict[str, np.ndarray]:
        """Copies of the outputs `queue_d2h` brought back (floats as float32), once the stream is synchronized; the
        head maps' decode (`processing.decode_maps`) where the engine ends at them."""
        out = {}
        for name in self.output_names:
            view = self._views[name]
            out[name] = view.astype(np.float32) if view.dtype.kind == "f" else view.copy()
        if self.head_maps:
            maps = self.head_maps
            return {maps["output"]: decode_maps([out[n] for n in maps["maps"]], maps["reg_max"], self.shape[2:])}
        return out

    def read(self, name: str) -> np.ndarray:
        """I/O tensor `name` as the GPU holds it, as float32 (an int8 input dequantized), after a sync (untimed)."""
        self.copy(self._buffers.host[name], self._buffers.device[name], self._views[name].nbytes, to_device=False)
        self.sync()
        values = self._views[name].astype(np.float32)
        if name == self.input_name and self.input_dtype == np.int8:
            values /= np.float32(self.input_levels)
        return values

    def sync(self) -> None:
        cuda_call(self.rt.cudaStreamSynchronize, self.stream)

    def copy_ms(self) -> dict[str, float]:
        """GPU time of the last run's host-to-device and device-to-host copies (after a sync)."""
        elapsed = self.rt.cudaEventElapsedTime
        return {copy: float(cuda_call(elapsed, *self._copy_events[copy])) for copy in self._timed_copies}

    def pin(self, images: list[np.ndarray]) -> bool:
        """Page-lock the memory of source images that will be uploaded many times (as a decoder writing into
        pinned buffers would), so their upload is one asynchronous copy. Unpinned on close()."""
        for image in images:
            address = image.ctypes.data
            if address not in self._pinned and image.flags.c_contiguous:
                cuda_call(self.rt.cudaHostRegister, address, image.nbytes, 0)
                self._pinned[address] = image.nbytes
        return True

    def pinned(self, image: np.ndarray) -> bool:
        """Whether `image`'s memory is page-locked (`pin`): it uploads straight from there."""
        return image.ctypes.data in self._pinned

    def gpu_letterbox(self):
        from runner.backends.tensorrt.prepost import GpuLetterbox

        self._ends.append(GpuLetterbox(self))
        return self._ends[-1]

    def gpu_score_filter(self):
        from runner.backends.tensorrt.prepost import GpuScoreFilter

        self._ends.append(GpuScoreFilter(self))
        return self._ends[-1]

    def overlapped(self, geometry, score_filter: bool):
        """None for head maps without the score filter: their host decode runs one batch at a time."""
        from runner.backends.tensorrt.overlap import Overlapped

        if self.head_maps and not score_filter:
            return None

        self._ends.append(Overlapped(self, geometry, score_filter))
        return self._ends[-1]

    def lanes(self, shape: tuple[int, ...], streams: int):
        from runner.backends.tensorrt.throughput import Lanes

        return Lanes(self, shape, streams)

    def layer_times(self, shape: tuple[int, ...], iters: int) -> dict[str, float]:
        """Each layer's mean time in ms at `shape` over `iters` plain runs, each synchronized, as TensorRT's IProfiler
        reports them (the first profiled run is left out: it warms the profiler up). A profiler cannot be taken off a
        context (8.6), so the runner goes on with a new context after: its CUDA graphs are captured again."""
        self.set_shape(shape)
        reported: dict[str, list[float]] = {}
        compat.attach_profiler(self._context, compat.layer_profiler(
            self._trt, lambda name, ms: reported.setdefault(name, []).append(ms)))
        try:
            for _ in range(iters + 1):
                self._enqueue()
                self.sync()
        finally:
            self._new_context()
        return {name: float(np.mean(times[1:] or times)) for name, times in reported.items()}

    def _new_context(self) -> None:
        """Replace the execution context, the old one released first (a dynamic engine's profile 0 serves one
        context); the next set_shape() binds the new one."""
        self.sync()
        self.shape = None
        self.graphs.at(None, moved=True)  # its graphs go first: they ran on the old context
        self._context = None
        self._context = self.engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"cannot create an execution context: {self.logger.last_error}")

    def layer_info(self, shape: tuple[int, ...]) -> list | None:
        """The inspector's layers with this context bound at `shape` after a run there: TensorRT 8.6 gives a dynamic
        engine's formats and precisions only for such a context ("N/A due to dynamic shapes" unbound; none for a
        fresh context that has not run). None where it has no inspector."""
        if not hasattr(self.engine, "create_engine_inspector"):
            return None
        self.set_shape(shape)
        self.execute()
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self._context
        text = inspector.get_engine_information(self._trt.LayerInformationFormat.JSON)
        return forensics.parse_layers(text, "the engine inspector")

    def lend_context(self):
        """The runner's own execution context, for a lane that binds it elsewhere (a dynamic engine's profile 0 is
        held by it): the next set_shape() binds it again."""
        self.shape = None
        self.graphs.at(None, moved=True)
        return self._context

    def settings(self) -> dict:
        s = {
            "cuda_graph": self.graphs.on,
            "io_dtypes": {n: d.name for n, d in self.dtypes.items()},
            "trt_version": self._trt.__version__,
            "pinned_host": True,
        }
        if self.graphs.note:
            s["cuda_graph_note"] = self.graphs.note
        if self.input_dtype == np.int8:
            s["input_range"] = self.input_range
        if self.head_maps:
            s["head_maps"] = (f"the engine ends at the head's {len(self.head_maps['maps'])} maps; the GPU score "
                              f"filter, or the host, decodes them")
        return s

    def close(self) -> None:
        """Free graphs, what runs around the engine, buffers, events, stream, context and engine (idempotent)."""
        if self._closed:
            return
        self._closed = True
        rt = self.rt
        self.sync()
        self.graphs.drop()
        for end in self._ends:
            end.close()
        for address in self._pinned:
            cuda_call(rt.cudaHostUnregister, address)
        self._pinned.clear()
        self._views.clear()
        self._buffers.close()
        for event in (self._start, self._end, self._posted, *(e for pair in self._copy_events.values() for e in pair)):
            cuda_call(rt.cudaEventDestroy, event)
        cuda_call(rt.cudaStreamDestroy, self.stream)
        self._context = None
        self.engine = None
        self._runtime = None
