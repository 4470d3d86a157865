"""INT8 calibration data, and the explicitly quantized (Q/DQ) ONNX made from the fp32 one on the CPU.

The Q/DQ ONNX comes from onnxruntime's `quantize_static`: QDQ format, symmetric int8 activations and weights
(zero point 0), per-channel weights, Conv inputs quantized (not their outputs: TensorRT fuses the activation
that follows, and places Q/DQ as pytorch-quantization does); weights stay float behind a Quantize/Dequantize pair,
as pytorch-quantization exports them, and biases stay float (TensorRT 8.6 refuses an int32 bias behind a
DequantizeLinear). That is the form TensorRT 8.6, 10 and 11 build (explicit quantization), and
onnxruntime runs it too. NVIDIA ModelOpt's ONNX PTQ would do the same job, but
`nvidia-modelopt[onnx]` 0.47 pins onnx 1.21 and brings onnxruntime-gpu 1.24 beside our onnxruntime (both own the
`onnxruntime` package) and cupy for CUDA 12; onnxruntime's quantizer needs nothing we do not have.
Quantized ONNX are cached like exports: by the fp32 ONNX's bytes, the calibration images and shape, the
algorithm and the onnxruntime version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import onnx

from runner import cache
from runner.config import RunConfig
from runner.data import calibration_files
from runner.export import cached_onnx, checker_verdict, signature, store_onnx
from runner.processing import preprocess
from runner.results import OnnxArtifact, StageError

log = logging.getLogger(__name__)
QUANTIZED_OPS = ["Conv"]  # TensorRT fuses each with its activation; the head's decode stays in float
METHODS = {"entropy2": "Entropy", "minmax": "MinMax"}  # onnxruntime's CalibrationMethod by our calibrator names


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration images, fed as letterboxed batches of one shape (the profile's opt shape)."""
    files: tuple[Path, ...]
    shape: tuple[int, int, int, int]  # N, 3, H, W

    @property
    def batches_total(self) -> int:
        return -(-len(self.files) // self.shape[0])

    def batches(self) -> Iterator[np.ndarray]:
        """float32 NCHW batches; the last one is filled up with its final image."""
        n, hw = self.shape[0], tuple(self.shape[2:])
        for i in range(0, len(self.files), n):
            chunk = [cv2.imread(str(p)) for p in self.files[i:i + n]]
            yield preprocess(chunk + [chunk[-1]] * (n - len(chunk)), hw)[0]

    @cached_property
    def key(self) -> str:
        """sha256 over the images' bytes and the shape: what a calibration depends on besides the model. Hashed
        once per set: the engine cache key and the calibration cache path both ask for it."""
        h = hashlib.sha256(json.dumps(self.shape).encode())
        for path in self.files:
            cache.file_sha256(path, h)
        return h.hexdigest()


def calibration_set(cfg: RunConfig) -> CalibrationSet:
    """The variant's calibration images (`data.calibration*`, never its validation images), at the opt shape."""
    d = cfg.data
    files = calibration_files(d.images, d.calibration, d.limit, d.calibration_limit, Path(cfg.outputs))
    return CalibrationSet(tuple(files), tuple(int(v) for v in cfg.shape.opt))


def _reader(calibration: CalibrationSet, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = calibration.batches()

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    return Reader()


class _Without(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quantize_qdq(reference: OnnxArtifact, calibration: CalibrationSet, method: str, cache_dir: Path,
                 keep_float: Sequence[str] = (), ops: Sequence[str] = QUANTIZED_OPS) -> OnnxArtifact:
    """The Q/DQ int8 ONNX of the fp32 `reference`, calibrated with `method` (entropy2 | minmax), the inputs of `ops`
    quantized, nodes whose name matches a `keep_float` fnmatch pattern left in float. Cached by all of these."""
    keep_float, ops = sorted(keep_float), sorted(ops)
    h = cache.file_sha256(reference.path)
    h.update(json.dumps({"calibration": calibration.key, "method": method, "ops": ops, "keep_float": keep_float,
                         "onnxruntime": version("onnxruntime")}).encode())
    name = f"{Path(reference.path).parent.name}-qdq-{method}-{h.hexdigest()[:16]}"
    folder = Path(cache_dir).absolute() / "onnx" / name
    with cache.locked(folder.with_name(folder.name + ".lock")):
        return cached_onnx(folder) or _quantize(reference, calibration, method, folder, keep_float, ops)


def excluded_nodes(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """The names of the graph's nodes that match any fnmatch pattern (case-sensitive): the nodes kept in float."""
    return [n.name for n in model.graph.node if any(fnmatchcase(n.name, p) for p in patterns)]


def _quantize(reference: OnnxArtifact, calibration: CalibrationSet, method: str, folder: Path,
              keep_float: Sequence[str], ops: Sequence[str]) -> OnnxArtifact:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    log.info("export: quantizing to Q/DQ int8 (%s) on %d images at %s, %d batches...", method,
             len(calibration.files), list(calibration.shape), calibration.batches_total)
    start = time.perf_counter()
    quiet = _Without("pre-processing")  # onnxruntime's advice to run its optimizer first: not for TensorRT's graph
    logging.getLogger().addFilter(quiet)
    try:
        quantize_static(reference.path, path, _reader(calibration, reference.signature["inputs"][0]["name"]),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(ops), per_channel=True,
                        nodes_to_exclude=excluded_nodes(onnx.load(reference.path, load_external_data=False),
                                                        keep_float),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                       "AddQDQPairToWeight": True, "OpTypesToExcludeOutputQuantization": list(ops)})
    except Exception as exc:  # onnxruntime's verdict on this graph
        shutil.rmtree(folder, ignore_errors=True)
        raise StageError("export", f"onnxruntime quantize_static: {type(exc).__name__}: {exc}") from exc
    finally:
        logging.getLogger().removeFilter(quiet)
    model = onnx.load(str(path))
    if not model.metadata_props:  # ultralytics' metadata (class names, stride), as the fp32 ONNX has it
        model.metadata_props.extend(onnx.load(reference.path).metadata_props)
        onnx.save(model, str(path))
    qdq = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    artifact = OnnxArtifact(path=str(path), tool=reference.tool, dynamic=reference.dynamic, precision="int8",
                            signature=signature(model), checker=checker_verdict(model),
                            size_bytes=path.stat().st_size, export_s=time.perf_counter() - start, cached=False,
                            end2end=reference.end2end, names=reference.names)
    store_onnx(folder, artifact)
    log.info("export: Q/DQ ONNX in %.1f s, %d QuantizeLinear nodes, %.1f MB", artifact.export_s, qdq,
             artifact.size_bytes / 1e6)
    return artifact
