"""onnxruntime: the reference runtime (CPU provider, no TF32) and a backend for the model under test."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np

from runner.backends import Backend, Runner
from runner.config import BackendName, BuildTool, Device, Int8Mode, Mechanism, Precision, RunConfig, pins_refusal
from runner.results import BuildResult, ExportResult, StageError

if TYPE_CHECKING:
    from runner.quantize import CalibrationSet

REFERENCE_PROVIDER = "CPUExecutionProvider"
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options():
    """onnxruntime's session options as runner runs it: a variant sharing its host with others gets a share of the
    cores (runner.gpus); 0 is onnxruntime's own pick."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("RUNNER_CPU_THREADS", 0))
    return options


class OrtRunner(Runner):
    """One onnxruntime session. `execute` returns host milliseconds (no device timer on this backend)."""

    name = BackendName.onnxruntime.value

    def __init__(self, onnx_path: str, provider: str = REFERENCE_PROVIDER):
        self.onnx_path, self.requested_provider = onnx_path, provider
        self.session = None
        self._feed: np.ndarray | None = None
        self._outputs: list[np.ndarray] = []

    def open(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(self.onnx_path, session_options(), providers=[self.requested_provider])
        self.provider = self.session.get_providers()[0]
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.dtype(ORT_DTYPES.get(inp.type, np.float32))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def set_shape(self, shape: tuple[int, ...]) -> None:
        """Nothing to allocate: onnxruntime checks the shape itself at run time."""

    def h2d(self, blob: np.ndarray) -> None:
        self._feed = blob.astype(self.input_dtype, copy=False)

    def execute(self) -> float:
        start = time.perf_counter()
        self._outputs = self.session.run(self.output_names, {self.input_name: self._feed})
        return (time.perf_counter() - start) * 1e3

    def d2h(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(o, np.float32) for n, o in zip(self.output_names, self._outputs)}

    def settings(self) -> dict:
        return {"provider": self.provider, "timer": "perf_counter", "cuda_graph": False,
                "io_dtypes": {self.input_name: self.input_dtype.name}}

    def close(self) -> None:
        self.session = None


class OnnxruntimeBackend(Backend):
    """The variant's ONNX run by onnxruntime: fp16 means the fp16 ONNX, int8 the Q/DQ ONNX. "Building" is only
    naming the file; onnxruntime gives its verdict when the runner opens the session (still the build stage)."""

    name = BackendName.onnxruntime.value

    def unavailable(self) -> str | None:
        return None

    def precision_mechanism(self, cfg: RunConfig) -> str:
        if cfg.precision.name == Precision.int8:  # a calibrator variant is skipped here (`applies`), named as it is
            return (Mechanism.calibrator if cfg.precision.int8_mode == Int8Mode.calibrator else Mechanism.qdq).value
        return (Mechanism.fp16_onnx if cfg.precision.name == Precision.fp16 else Mechanism.none).value

    def applies(self, cfg: RunConfig) -> str | None:
        if cfg.precision.name == Precision.int8 and cfg.precision.int8_mode == Int8Mode.calibrator:
            return ("precision.int8_mode=calibrator is TensorRT's implicit calibration; backend=onnxruntime runs "
                    "the Q/DQ ONNX (precision=int8_qdq)")
        if why := pins_refusal(cfg.precision, implicit_int8=False):
            return why
        if Device.gpu in (cfg.preprocess.device, cfg.postprocess.device):
            return ("preprocess/postprocess=gpu run CUDA kernels around a TensorRT engine; backend=onnxruntime "
                    "pre/postprocesses on the host (use backend=tensorrt)")
        if cfg.build.tool != BuildTool.tensorrt_api:
            return (f"build={cfg.build.tool.value} makes a TensorRT engine; backend=onnxruntime runs the ONNX "
                    f"(use backend=tensorrt)")
        return None

    def build(self, cfg: RunConfig, export: ExportResult, calibration: CalibrationSet | None = None) -> BuildResult:
        shapes = [list(cfg.shape.min), list(cfg.shape.opt), list(cfg.shape.max)]
        return BuildResult(tool=BackendName.onnxruntime.value, artifact=export.tested.path, profile=shapes,
                           size_bytes=export.tested.size_bytes, precision_mechanism=self.precision_mechanism(cfg),
                           provider=cfg.backend.ort_provider)

    def runner(self, cfg: RunConfig, build: BuildResult) -> OrtRunner:
        return OrtRunner(build.artifact, build.provider or REFERENCE_PROVIDER)


def open_reference(onnx_path: str) -> OrtRunner:
    """The reference: onnxruntime on the CPU (no TF32), opened. Raises StageError if it refuses the ONNX."""
    runner = OrtRunner(onnx_path, REFERENCE_PROVIDER)
    try:
        runner.open()
    except Exception as exc:  # onnxruntime refusing the reference graph is this variant's verdict
        raise StageError("validate", f"onnxruntime reference: {exc}") from None
    return runner
