"""The process environment: the defaults every runner process sets, and the provenance of a run
(interpreter, package versions, CPU, GPU, driver and TensorRT)."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

from runner.backends.tensorrt import compat

PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "ultralytics", "tensorrt", "cuda-python",
            "mlflow", "numpy", "opencv-python")


def quiet_defaults() -> None:
    """Environment defaults of every runner process: offline, quiet, and an MLflow that fails in seconds."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the summary names the runs
    # MLflow's telemetry thread, failing to reach its endpoint, deletes an environment variable while a request
    # reads the environment for proxies: that request fails with KeyError('_MLFLOW_TELEMETRY_SESSION_ID')
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def gpu() -> dict:
    """GPU name and driver version, or the reason there is none."""
    ok, reason = compat.cuda_gpu_available()
    if not ok:
        return {"gpu": "none", "gpu_reason": reason}
    rt = compat.cudart()
    api = compat.cuda_call(rt.cudaDriverGetVersion)
    found = {"gpu": compat.gpu_name(), "cuda_driver_api": f"{api // 1000}.{api % 1000 // 10}"}
    try:
        import pynvml  # nvidia-ml-py, an ultralytics dependency

        pynvml.nvmlInit()
        found["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:  # NVML missing or refusing: say so rather than guess
        found["driver"] = f"unknown ({type(exc).__name__})"
    return found


def environment(opset: int) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu(), "opset": opset}
    for name in PACKAGES:
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            continue
    ok, reason = compat.trt_available()
    env["tensorrt"] = compat.trt_version() if ok else f"absent: {reason}"
    env.update(gpu())
    return env
