"""onnxruntime runner with the same shape as `TrtRunner`: set_shape / h2d / execute / d2h / infer."""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRunner:
    """One onnxruntime session. `execute` returns host milliseconds (no device timer on this backend)."""
    name = "onnxruntime"

    def __init__(self, onnx_path: str, provider: str = "CPUExecutionProvider"):
        self.session = ort.InferenceSession(onnx_path, providers=[provider])
        self.provider = self.session.get_providers()[0]
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.dtype(ORT_DTYPES.get(inp.type, np.float32))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._feed: np.ndarray | None = None
        self._outputs: list[np.ndarray] = []

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

    def sync(self) -> None:
        """onnxruntime on the CPU is synchronous."""

    def infer(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        self.h2d(blob)
        self.execute()
        return self.d2h()

    def settings(self) -> dict:
        return {"provider": self.provider, "timer": "perf_counter", "cuda_graph": False,
                "io_dtypes": {self.input_name: self.input_dtype.name}}

    def close(self) -> None:
        self.session = None
