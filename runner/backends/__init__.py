"""Backends, chosen by name (`backend=`): what builds and runs the model under test.

Every backend gives the build stage (`build`) and a `Runner`. Runners have one shape, after Polygraphy's:
open -> (set_shape -> h2d -> execute -> d2h)* -> close, also as a context manager. `execute` returns
milliseconds: CUDA events on a GPU, the host clock on the CPU. What a runtime runs beside the model (GPU
letterbox and score filter, throughput lanes, per-layer times) it hands out through the `Runner` methods that
default to None; a `Predictor` also runs its own pre and post. The chains (`prepost`) and the bench never branch
on a name.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from runner.config import API_BUILD_SETTINGS, AUTO, BackendName, Device, RunConfig
from runner.results import BuildResult, ExportResult, Resolved

if TYPE_CHECKING:
    from runner.quantize import CalibrationSet


class Runner(ABC):
    """One loaded model with a single input. Subclasses set `name`, `input_name`, `input_dtype`, `output_names`.
    Where `queues`, a run's device work can be queued and waited for once: `launch`, `queue_d2h`, `outputs`,
    `infer_ms`, `around_engine_ms` and `upload_queued_at` (TensorRT's runner)."""

    name: str
    queues = False

    @abstractmethod
    def open(self) -> None:
        """Load the model (session, engine, context, buffers). Raises on a model the runtime refuses."""

    @abstractmethod
    def set_shape(self, shape: tuple[int, ...]) -> None:
        """Fix the input shape of the next runs."""

    @abstractmethod
    def h2d(self, blob: np.ndarray) -> None:
        """Hand the preprocessed input to the runtime (host to device where there is one)."""

    @abstractmethod
    def execute(self) -> float:
        """Run once on the input handed over; return the time it took in milliseconds."""

    @abstractmethod
    def d2h(self) -> dict[str, np.ndarray]:
        """The outputs of the last run on the host, floats as float32."""

    @abstractmethod
    def settings(self) -> dict:
        """How it runs (provider, CUDA graph, I/O dtypes, versions): recorded with every timing."""

    @abstractmethod
    def close(self) -> None:
        """Free everything `open` took. Idempotent."""

    def sync(self) -> None:
        """Wait for queued work (a no-op on synchronous runtimes)."""

    def pin(self, images: list[np.ndarray]) -> bool:
        """Page-lock source images that will be uploaded many times; False where nothing is uploaded from them."""
        return False

    def copy_ms(self) -> dict[str, float]:
        """Device time of the last run's copies, {"h2d": ms, "d2h": ms}; empty where there is no device."""
        return {}

    def gpu_letterbox(self):
        """The letterbox into this runner's input on its device (`preprocess=gpu`): `run(frames, hw, geometry)` ->
        fits, `read_input()`; closed with the runner. None where the runtime has none."""
        return None

    def gpu_score_filter(self):
        """The score filter and NMS of this runner's one-to-many head output on its device (`postprocess=gpu`):
        `run(conf, iou, max_det, fits)` -> per image its detections in source pixels, or None past the filter's cap;
        closed with the runner. None where the runtime has none."""
        return None

    def overlapped(self, geometry, score_filter: bool):
        """Offline batches through the GPU letterbox, the model and (`score_filter`) the score filter and NMS, each
        batch's upload overlapping the work on the one before: `run(batches, hw, conf, iou, max_det)` yields per batch
        (frames, fits, detections per image or the first output); closed with the runner. None where the runtime has
        none."""
        return None

    def lanes(self, shape: tuple[int, ...], streams: int):
        """`streams` concurrent lanes of the model alone at `shape` (`enqueue()` runs each once, `synchronize()`,
        a context manager), for `bench.images_per_second`; None where the runtime has no streams."""
        return None

    def layer_times(self, shape: tuple[int, ...], iters: int) -> dict[str, float] | None:
        """Each layer's mean time in ms at `shape` over `iters` runs, by the engine's layer names (`forensics`
        joins them with the engine inspector's layers); None where the runtime has no per-layer profiler."""
        return None

    def layer_info(self, shape: tuple[int, ...]) -> list | None:
        """The engine inspector's layers at `shape`, with the formats and precisions that shape gives; None where the
        runtime has no inspector (the build's JSON stands in)."""
        return None

    def infer(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        self.set_shape(tuple(blob.shape))
        self.h2d(blob)
        self.execute()
        return self.d2h()

    def __enter__(self) -> Runner:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Predictor(Runner):
    """A runner that also preprocesses and postprocesses, as its library's users call it (the peer's `predict`)."""

    @abstractmethod
    def predict(self, frames: list[np.ndarray], hw: tuple[int, int], conf: float, iou: float, max_det: int):
        """The library's own results for BGR `frames` at input size `hw`."""


class Backend(ABC):
    """A runtime for the model under test. `gpu_ends`: its runner has the GPU letterbox and score filter and replays
    CUDA graphs, so `auto` puts pre/post on the GPU and graphs on."""

    name: str
    gpu_ends: bool = False

    @abstractmethod
    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine, or None."""

    @abstractmethod
    def precision_mechanism(self, cfg: RunConfig) -> str:
        """How the variant's precision is reached: none | fp16_onnx | builder_flag | strongly_typed | calibrator | qdq
        | ultralytics."""

    @abstractmethod
    def applies(self, cfg: RunConfig) -> str | None:
        """Why this variant makes no sense on this backend (it is skipped with that reason), or None."""

    def takes(self, cfg: RunConfig, setting: str) -> bool:
        """Whether this backend's build takes `backend.<setting>` (`API_BUILD_SETTINGS`) for this variant: what
        `auto` becomes. None does here."""
        return False

    @abstractmethod
    def build(self, cfg: RunConfig, export: ExportResult, calibration: CalibrationSet | None = None) -> BuildResult:
        """Make the model under test runnable; `calibration`: the images of a build that calibrates (the
        `calibrator` precision mechanism). Raises StageError with the tool's own words."""

    @abstractmethod
    def runner(self, cfg: RunConfig, build: BuildResult) -> Runner:
        """A runner for what `build` made (not opened yet)."""


def _registry() -> dict[str, type[Backend]]:
    from runner.backends.onnxruntime import OnnxruntimeBackend
    from runner.backends.tensorrt import TensorrtBackend
    from runner.backends.ultralytics import UltralyticsBackend

    return {b.name: b for b in (OnnxruntimeBackend, TensorrtBackend, UltralyticsBackend)}


def names() -> list[str]:
    return sorted(_registry())


def get(name: str) -> Backend:
    backends = _registry()
    if name not in backends:
        raise KeyError(f"unknown backend '{name}'; known: {', '.join(sorted(backends))}")
    return backends[name]()


@lru_cache(maxsize=None)
def unavailable(name: str) -> str | None:
    """Why backend `name` cannot run on this machine, or None (asked once per process)."""
    return get(name).unavailable()


def resolve(cfg: RunConfig) -> tuple[Backend, str | None]:
    """(the backend the variant runs on, why it is skipped or None).

    `auto` is TensorRT where it runs here, else onnxruntime. A variant is skipped when its backend cannot
    run here, or when it makes no sense on that backend (say build=ultralytics on onnxruntime), its `auto`
    settings resolved (`resolve_auto`)."""
    requested = cfg.backend.name.value
    trt_missing = unavailable(BackendName.tensorrt.value)
    name = (BackendName.onnxruntime if trt_missing else BackendName.tensorrt).value if requested == BackendName.auto \
        else requested
    backend = get(name)
    reason = unavailable(name) or backend.applies(resolve_auto(cfg, backend)[0])
    if reason and requested == BackendName.auto and trt_missing:
        reason = f"{reason}; TensorRT unavailable here: {trt_missing}"
    return backend, reason


def resolve_auto(cfg: RunConfig, backend: Backend) -> tuple[RunConfig, Resolved]:
    """`cfg` with `preprocess`, `postprocess`, `bench.cuda_graph` and the build settings `API_BUILD_SETTINGS`
    resolved on `backend`, and the record of it.

    `auto` is the fastest path the backend has: GPU pre/post and CUDA graphs where it has GPU ends (TensorRT, which
    runs only on a CUDA GPU), else host pre/post; an fp16 input and an engine ending at the head's maps where its
    build takes them (`Backend.takes`). A backend without graphs has none, whatever was asked (None). Values given
    explicitly stay as they are."""
    device = Device.gpu if backend.gpu_ends else Device.cpu
    pre, post, graph = cfg.preprocess.device, cfg.postprocess.device, cfg.bench.cuda_graph
    given = {"preprocess": pre, "postprocess": post, "cuda_graph": graph,
             **{key: getattr(cfg.backend, key) for key in API_BUILD_SETTINGS}}
    settings = {key: backend.takes(cfg, key) if given[key] == AUTO else given[key] for key in API_BUILD_SETTINGS}
    resolved = Resolved(preprocess=(device if pre == Device.auto else pre).value,
                        postprocess=(device if post == Device.auto else post).value,
                        cuda_graph=(graph == AUTO or graph) if backend.gpu_ends else None,
                        auto=[key for key, value in given.items() if value == AUTO], **settings)
    return dataclasses.replace(
        cfg, preprocess=dataclasses.replace(cfg.preprocess, device=Device(resolved.preprocess)),
        postprocess=dataclasses.replace(cfg.postprocess, device=Device(resolved.postprocess)),
        bench=dataclasses.replace(cfg.bench, cuda_graph=bool(resolved.cuda_graph)),
        backend=dataclasses.replace(cfg.backend, **settings)), resolved


def auto_choice() -> str:
    """What `backend=auto` picks here, said once per sweep."""
    reason = unavailable(BackendName.tensorrt.value)
    if reason is None:
        return "runner: backend=auto -> tensorrt"
    return (f"runner: backend=auto -> onnxruntime (TensorRT unavailable: {reason}; each variant's ONNX is tested "
            f"with onnxruntime)")
