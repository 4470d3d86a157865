"""The peer, `backend=ultralytics`: ultralytics' own `YOLO(engine).predict` on the TensorRT engine the variant
builds (the same file the tensorrt backend runs, from either build tool) and the same in-memory frames.

Its bench row is ultralytics' speed dict per stage plus the wall time of one `predict` call (`prepost.PeerChain`), so
every sweep can hold runner's chain against it in the same run. Validation compares the engine's tensors
through ultralytics' AutoBackend, and the detections `predict` returns.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runner import checkpoint, heads
from runner.backends import Predictor
from runner.backends.tensorrt import TensorrtBackend
from runner.config import BackendName, Device, RunConfig
from runner.results import BuildResult


OUTSIDE_PROFILE = "outside the TensorRT optimization profile"  # ultralytics' refusal of an input shape


def engine_file(path: str) -> str:
    """The engine under a name ultralytics loads (it picks the runtime by suffix): a plan gets a `.engine` link."""
    plan = Path(path)
    if plan.suffix == ".engine":
        return path
    link = plan.with_suffix(".engine")
    try:
        link.symlink_to(plan.name)
    except FileExistsError:
        pass
    return str(link)


class UltralyticsRunner(Predictor):
    """`YOLO(engine)` (`RTDETR(engine)` for an RT-DETR): `predict` for the chain; its predictor's AutoBackend for
    tensors. Times with CUDA events."""

    name = BackendName.ultralytics.value

    def __init__(self, engine_path: str, imgsz: tuple[int, int], rtdetr: bool = False):
        self.engine_path, self.imgsz, self.rtdetr = engine_path, tuple(imgsz), rtdetr
        self.model = None

    def open(self) -> None:
        import torch
        from ultralytics import RTDETR, YOLO

        self._torch = torch  # RT-DETR's own predictor stretches the image and decodes its head
        self.model = RTDETR(engine_file(self.engine_path)) if self.rtdetr else YOLO(engine_file(self.engine_path),
                                                                                     task="detect")
        blank = np.full((*self.imgsz, 3), 114, np.uint8)
        self.model.predict(blank, imgsz=self.imgsz, device=0, verbose=False)  # sets up the predictor and its engine
        self.backend = self.model.predictor.model
        self.input_name = "images"
        self.input_dtype = np.dtype(np.float16 if self.backend.fp16 else np.float32)
        self.output_names = sorted(self.backend.output_names)
        self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._input = self._outputs = None

    def predict(self, frames: list[np.ndarray], hw: tuple[int, int], conf: float, iou: float, max_det: int):
        """ultralytics' Results for BGR `frames`, as its users call it. On a dynamic engine predict letterboxes
        each frame to its own stride-aligned rectangle; one the profile does not hold is refused, with what to do."""
        try:
            return self.model.predict(frames, imgsz=hw, conf=conf, iou=iou, max_det=max_det, device=0, verbose=False)
        except ValueError as exc:
            if OUTSIDE_PROFILE not in str(exc):
                raise
            raise ValueError(f"{exc}: predict letterboxes each frame to its own rectangle on a dynamic engine; give "
                             f"the profile those shapes (profile.min at the frames' short side) or compare on a "
                             f"static engine") from None

    def set_shape(self, shape: tuple[int, ...]) -> None:
        """AutoBackend sets the shape of a dynamic engine itself."""

    def h2d(self, blob: np.ndarray) -> None:
        self._input = self._torch.from_numpy(np.ascontiguousarray(blob)).to(self.backend.device)

    def execute(self) -> float:
        self._start.record()
        outputs = self.backend(self._input)
        self._end.record()
        self._end.synchronize()
        self._outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return float(self._start.elapsed_time(self._end))

    def d2h(self) -> dict[str, np.ndarray]:
        return {name: out.float().cpu().numpy() for name, out in zip(self.output_names, self._outputs)}

    def sync(self) -> None:
        self._torch.cuda.synchronize()

    def settings(self) -> dict:
        import ultralytics

        return {"runtime": f"ultralytics {ultralytics.__version__} predict",
                "cuda_graph": getattr(self.backend, "graph", None) is not None,
                "io_dtypes": {self.input_name: self.input_dtype.name}}

    def close(self) -> None:
        self.model = self.backend = None


class UltralyticsBackend(TensorrtBackend):
    """Builds what the tensorrt backend builds; runs it with ultralytics."""

    name = BackendName.ultralytics.value
    gpu_ends = False  # predict runs its own pre/postprocessing; runner's CUDA graphs do not apply

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason is None:
            import torch

            if not torch.cuda.is_available():
                reason = "ultralytics predict on a TensorRT engine needs torch with CUDA"
        return reason

    def takes(self, cfg: RunConfig, setting: str) -> bool:
        """The peer's engine, left to auto, is the one ultralytics makes itself: a float input and the whole head."""
        return False

    def applies(self, cfg: RunConfig) -> str | None:
        if Device.gpu in (cfg.preprocess.device, cfg.postprocess.device):
            return "backend=ultralytics runs predict's own pre/postprocessing; preprocess/postprocess=gpu do not apply"
        if cfg.backend.head_maps is True:
            return "backend.head_maps: predict decodes the whole head; it applies to backend=tensorrt"
        if cfg.backend.int8_input is True:
            return "backend.int8_input: predict feeds a float input; it applies to backend=tensorrt"
        if cfg.bench.cuda_graph is True:
            return "bench.cuda_graph: predict launches its own work; runner's CUDA graphs apply to backend=tensorrt"
        return super().applies(cfg)

    def runner(self, cfg: RunConfig, build: BuildResult) -> UltralyticsRunner:
        rtdetr = checkpoint.head_of(cfg.model.weights) == heads.RTDETR_HEAD  # what the engine was built from
        return UltralyticsRunner(build.artifact, tuple(build.profile[1][2:]), rtdetr)
