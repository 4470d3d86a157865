"""INT8 calibration data, and the explicitly quantized (Q/DQ) ONNX made from the fp32 one on the CPU.

The Q/DQ ONNX comes from onnxruntime's `quantize_static`: QDQ format, symmetric int8 activations and weights
(zero point 0), per-channel weights. Inputs are quantized, not outputs (TensorRT fuses the activation that
follows, and places Q/DQ as pytorch-quantization does): those of every Conv, and, after TensorRT's Q/DQ placement
recommendations, those of the residual Adds and the Concats whose output goes only into quantized nodes, so int8
flows from one convolution into the next without an int8<->float reformat around them; an Add or Concat that feeds
float (the head's decode) stays float. Nodes matching a `keep_float` pattern (fnmatch on ONNX node names) are left
unquantized: the presets keep the Detect head's last convolutions (box and class logits), the DFL and RT-DETR's
decoder in float, where int8 costs the most mAP. With `concat_scales=shared` each quantized Concat's inputs and
output take one range, the union of theirs, so TensorRT concatenates int8 in place instead of requantizing every
input (what its layer profile shows with their own scales). With `add_inputs=skip` a residual Add whose other input
comes from a convolution (through its activation) keeps Q/DQ on its skip input alone, as TensorRT's placement
guidance draws residual blocks: TensorRT then fuses the Add into that convolution, where with both inputs quantized
it runs the Add as a layer of its own. Weights stay float behind a Quantize/Dequantize pair,
as pytorch-quantization exports them, and biases stay float (TensorRT 8.6 refuses an int32 bias behind a
DequantizeLinear). That is the form TensorRT 8.6, 10 and 11 build (explicit quantization), and
onnxruntime runs it too. NVIDIA ModelOpt's ONNX PTQ would do the same job, but
`nvidia-modelopt[onnx]` 0.47 pins onnx 1.21 and brings onnxruntime-gpu 1.24 beside our onnxruntime (both own the
`onnxruntime` package) and cupy for CUDA 12; onnxruntime's quantizer needs nothing we do not have.
Quantized ONNX are cached like exports: by the fp32 ONNX's bytes, the calibration images and shape, the
algorithm, the quantized op types, the keep_float patterns, the Concats' scales, the Adds' quantized inputs and the
onnxruntime version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
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
from runner.rewrite import readers

log = logging.getLogger(__name__)
QDQ = ("QuantizeLinear", "DequantizeLinear")
QUANTIZED_OPS = ("Conv", "Add", "Concat")  # the op types whose inputs get Q/DQ
FLOW_OPS = ("Add", "Concat")  # quantized only where int8 flows on: their output goes into quantized nodes alone
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "HardSwish", "HardSigmoid")  # a convolution's fused activations,
#   besides SiLU (Mul of the convolution's output and its Sigmoid)
METHODS = {"entropy2": "Entropy", "minmax": "MinMax", "percentile": "Percentile"}  # onnxruntime's CalibrationMethod
HISTOGRAM = {"num_bins": 2048, "num_quantized_bins": 128}  # entropy2, percentile: as TensorRT's entropy calibrator


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
    """The variant's calibration images (`precision.calibration_*`, never its validation images), at the opt shape.
    Raises ConfigError."""
    d, p = cfg.data, cfg.precision
    files = calibration_files(d.images, p.calibration_source, d.limit, p.calibration_images, Path(cfg.outputs))
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
                 keep_float: Sequence[str] = (), ops: Sequence[str] = QUANTIZED_OPS,
                 concat_scales: str = "own", add_inputs: str = "all") -> OnnxArtifact:
    """The Q/DQ int8 ONNX of the fp32 `reference`, calibrated with `method` (entropy2 | minmax | percentile), the
    inputs of the `ops` nodes quantized (`quantized_nodes`), nodes whose name matches a `keep_float` fnmatch pattern
    left in float, each quantized Concat's tensors at their own scales or one (`concat_scales`: own | shared,
    `share_concat_ranges`), each quantized residual Add's inputs all quantized or its skip input alone
    (`add_inputs`: all | skip, `convolution_inputs`). Cached by all of these; `quantization` records them and the
    nodes each touched."""
    keep_float, ops = sorted(keep_float), sorted(ops)
    folder = qdq_folder(reference, calibration, method, cache_dir, keep_float, ops, concat_scales, add_inputs)
    with cache.locked(folder.with_name(folder.name + ".lock")):
        return cached_onnx(folder) or _quantize(reference, calibration, method, folder, keep_float, ops,
                                                concat_scales, add_inputs)


def quantize_variant(cfg: RunConfig, reference: OnnxArtifact, keep_float: Sequence[str] | None = None,
                     calibration: CalibrationSet | None = None) -> OnnxArtifact:
    """The Q/DQ ONNX the variant `cfg` quantizes `reference` to: its precision settings, its calibration images,
    with `keep_float` in place of the config's pins where given."""
    p = cfg.precision
    return quantize_qdq(reference, calibration or calibration_set(cfg), p.calibrator.value, Path(cfg.cache_dir),
                        p.keep_float if keep_float is None else keep_float, p.qdq_ops, p.concat_scales.value,
                        p.add_inputs.value)


def qdq_folder(reference: OnnxArtifact, calibration: CalibrationSet, method: str, cache_dir: Path,
               keep_float: Sequence[str], ops: Sequence[str], concat_scales: str = "own",
               add_inputs: str = "all") -> Path:
    """The cache folder of a Q/DQ ONNX, named by what it depends on: the fp32 ONNX's bytes, the calibration images
    (`CalibrationSet.key`: their bytes, so their count and source), the algorithm, the ops, the keep_float
    patterns, the Concats' scales, the Adds' quantized inputs and onnxruntime's version."""
    digest = calibration_digest(reference.path, calibration, method, ops, keep_float,
                                **({"concat_scales": concat_scales} if concat_scales != "own" else {}),
                                **({"add_inputs": add_inputs} if add_inputs != "all" else {}))
    return Path(cache_dir).absolute() / "onnx" / f"{Path(reference.path).parent.name}-qdq-{method}-{digest[:16]}"


def calibration_digest(onnx_path: str, calibration: CalibrationSet, method: str, ops: Sequence[str],
                       keep_float: Sequence[str], **settings: str) -> str:
    """sha256 (hex) of what a calibrated artifact depends on: the ONNX's bytes, the images (`CalibrationSet.key`),
    the method, the ops, the pins (order and type do not count), onnxruntime's version and `settings`."""
    h = cache.file_sha256(onnx_path)
    h.update(json.dumps({"calibration": calibration.key, "method": method, "ops": sorted(ops),
                         "keep_float": sorted(keep_float), "onnxruntime": version("onnxruntime"),
                         **settings}).encode())
    return h.hexdigest()


def tensor_ranges(onnx_path: str, calibration: CalibrationSet, method: str, cache_dir: Path,
                  keep_float: Sequence[str] = (), concat_scales: str = "own", ops: Sequence[str] = QUANTIZED_OPS,
                  conv_outputs: bool = False) -> tuple[dict[str, float], Path, bool]:
    """For TensorRT's implicit INT8 from ranges calibrated here (`ITensor.set_dynamic_range`): per tensor, its
    symmetric range (the larger magnitude of its calibrated bounds), for the inputs of the nodes a Q/DQ ONNX would
    quantize (`quantized_nodes`) and the activated output of each of its convolutions, so the head's decode gets
    none and stays float. TensorRT fuses a convolution with its activation, and on 8.6 a fused layer with a range
    at its input and none at its output has no implementation: a pinned layer reads its int8 producer in fp16.
    Calibrated with `method` on onnxruntime (`calibrate`), Concats at one range where `concat_scales` is shared.
    Cached by the ONNX's bytes, the images, the method, the pins, the Concats' scales, the ops and onnxruntime's
    version. With `conv_outputs`, each convolution's own output too, so a convolution pinned in int8 has a range
    where TensorRT does not fuse its activation. Returns (ranges, cache file, whether it was cached)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    digest = calibration_digest(onnx_path, calibration, method, ops, keep_float, concat_scales=concat_scales,
                                tensors="inputs+activations" + ("+convs" if conv_outputs else ""))
    path = Path(cache_dir).absolute() / "ranges" / f"{Path(onnx_path).parent.name}-{method}-{digest[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with cache.locked(path.with_suffix(".calibrating")):  # one calibration; read_recorded holds `<name>.lock`
        try:
            if (saved := cache.read_recorded(path)) is not None:
                return json.loads(saved), path, True
        except cache.Stale as stale:
            log.warning("build: ranges %s; calibrating again", stale)
        log.info("build: calibrating int8 ranges (%s) on onnxruntime, %d images at %s...", method,
                 len(calibration.files), list(calibration.shape))
        model = onnx.load(onnx_path, load_external_data=False)
        quantized = set(quantized_nodes(model, ops, keep_float))
        chosen = [n for n in model.graph.node if n.name in quantized]
        with tempfile.TemporaryDirectory() as tmp:
            data = calibrate(onnx_path, model.graph.input[0].name, calibration, method, ops, Path(tmp))
            if concat_scales == "shared":
                share_concat_ranges(model, {n.name for n in chosen if n.op_type == "Concat"}, data)
            data = load_tensors_data(data)
        convs = [n for n in chosen if n.op_type == "Conv"]
        tensors = {t for n in chosen for t in n.input} | activated(model, convs)
        tensors |= {n.output[0] for n in convs} if conv_outputs else set()
        ranges = {t: float(np.abs(np.asarray(data[t].range_value, np.float64)).max())
                  for t in sorted(tensors) if t in data}
        cache.write_recorded(path, json.dumps(ranges, indent=1).encode())
        return ranges, path, False


def activated(model: onnx.ModelProto, convs: Sequence[onnx.NodeProto]) -> set[str]:
    """The tensors the convolutions' activations make (SiLU's Mul, or one of `ACTIVATIONS`); a convolution's own
    output where it has none."""
    read = readers(model)

    def made(conv: onnx.NodeProto) -> str:
        after = read[conv.output[0]]
        return next((n.output[0] for n in after if n.op_type == "Mul"),
                    next((n.output[0] for n in after if n.op_type in ACTIVATIONS), conv.output[0]))

    return {made(conv) for conv in convs}


def kept_float(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """The names of the graph's nodes that match any fnmatch pattern (case-sensitive): the nodes kept in float."""
    return [n.name for n in model.graph.node if any(fnmatchcase(n.name, p) for p in patterns)]


def quantized_nodes(model: onnx.ModelProto, ops: Sequence[str], keep_float: Sequence[str]) -> list[str]:
    """The nodes whose inputs get Q/DQ: those of `ops` not kept in float, less each Add or Concat (`FLOW_OPS`)
    whose output reaches a node that is not quantized, or the graph's output."""
    kept = set(kept_float(model, keep_float))
    chosen = {n.name: n for n in model.graph.node if n.op_type in ops and n.name not in kept}
    read, outputs = readers(model), {output.name for output in model.graph.output}  # the graph's outputs: float
    dropped = True
    while dropped:  # dropping one may strand the Add or Concat that feeds it
        stranded = [name for name, node in chosen.items() if node.op_type in FLOW_OPS
                    and any(t in outputs or any(r.name not in chosen for r in read[t]) for t in node.output)]
        for name in stranded:
            del chosen[name]
        dropped = bool(stranded)
    return [n.name for n in model.graph.node if n.name in chosen]


def calibrate(onnx_path: str, input_name: str, calibration: CalibrationSet, method: str, ops: Sequence[str],
              folder: Path) -> Path:
    """The activation ranges of the `ops` nodes' tensors over the calibration images (fed as `input_name`), as
    onnxruntime's calibration
    cache (`ranges.json` in `folder`). The histogram methods get TensorRT's entropy calibrator's resolution
    (`HISTOGRAM`): `quantize_static` alone gives Entropy 128 bins, as many as it quantizes to, so its one candidate
    threshold is the min-max range and entropy2 would be minmax under another name."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    ranges = folder / "ranges.json"
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(Path(onnx_path), list(ops), str(Path(tmp) / "augmented.onnx"),
                                       getattr(CalibrationMethod, METHODS[method]),
                                       extra_options={} if method == "minmax" else HISTOGRAM)
        calibrator.collect_data(_reader(calibration, input_name))
        save_tensors_data(calibrator.compute_data(), ranges)
    return ranges


def share_concat_ranges(model: onnx.ModelProto, concats: set[str], ranges: Path) -> int:
    """Give the inputs and the output of each Concat of `concats` one range, the union of theirs, in the calibration
    cache `ranges` (tensors that meet at two Concats join both groups). Without it TensorRT rescales every input
    to the output's scale before concatenating (a requantize layer each). Returns the tensors whose range widened."""
    from onnxruntime.quantization.calibrate import load_tensors_data, save_tensors_data

    data = load_tensors_data(ranges)
    group: dict[str, str] = {}

    def root(tensor: str) -> str:
        while group.setdefault(tensor, tensor) != tensor:
            tensor = group[tensor]
        return tensor

    for node in model.graph.node:
        if node.name in concats:
            members = [t for t in (*node.input, *node.output) if t in data]
            for tensor in members[1:]:
                group[root(tensor)] = root(members[0])
    own = {tensor: (float(np.min(data[tensor].range_value[0])), float(np.max(data[tensor].range_value[1])))
           for tensor in group}
    union: dict[str, tuple[float, float]] = {}
    for tensor, (low, high) in own.items():
        were = union.get(root(tensor), (np.inf, -np.inf))
        union[root(tensor)] = min(were[0], low), max(were[1], high)
    for tensor in group:
        data[tensor].lowest, data[tensor].highest = (np.asarray(v, np.float32) for v in union[root(tensor)])
    widened = sum(own[t] != union[root(t)] for t in group)
    save_tensors_data(data, ranges)
    return widened


def qdq_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """DequantizeLinear output -> the float tensor its QuantizeLinear reads."""
    quantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {n.output[0]: quantized[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in quantized}


def keep_in_float(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of the Q/DQ `model` in which the `names` nodes read float inputs; pairs nothing reads any more go."""
    return read_float(model, dict.fromkeys(names))


def read_float(model: onnx.ModelProto, inputs: dict[str, set[int] | None]) -> onnx.ModelProto:
    """A copy of the Q/DQ `model` in which each node named in `inputs` reads float at those input indices (None:
    at every input); pairs nothing reads any more go."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pairs = qdq_pairs(out)
    for node in out.graph.node:
        if node.name in inputs:
            for i, name in enumerate(node.input):
                if inputs[node.name] is None or i in inputs[node.name]:
                    node.input[i] = pairs.get(name, name)
    _prune(out.graph)
    return out


def convolution_inputs(model: onnx.ModelProto, adds: set[str]) -> dict[str, set[int]]:
    """For each Add of `adds` with two inputs of which exactly one is a convolution's output (after a fused
    activation: `ACTIVATIONS`, or SiLU), that input's index: the one TensorRT fuses the Add into."""
    made_by = {out: node for node in model.graph.node for out in node.output}

    def of_conv(tensor: str) -> bool:
        node = made_by.get(tensor)
        if node is not None and (node.op_type in ACTIVATIONS or node.op_type == "Mul"):
            inputs = [made_by.get(i) for i in (node.input if node.op_type == "Mul" else node.input[:1])]
            return any(i is not None and i.op_type == "Conv" for i in inputs)
        return node is not None and node.op_type == "Conv"

    found = {}
    for node in model.graph.node:
        if node.name in adds and len(node.input) == 2:
            convs = [i for i, tensor in enumerate(node.input) if of_conv(tensor)]
            if len(convs) == 1:
                found[node.name] = set(convs)
    return found


def _prune(graph: onnx.GraphProto) -> None:
    """Drop Q/DQ nodes whose outputs nothing reads, then initializers nothing reads."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in QDQ and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def _quantize(reference: OnnxArtifact, calibration: CalibrationSet, method: str, folder: Path,
              keep_float: Sequence[str], ops: Sequence[str], concat_scales: str, add_inputs: str) -> OnnxArtifact:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    fp32 = onnx.load(reference.path, load_external_data=False)
    quantized, kept = quantized_nodes(fp32, ops, keep_float), kept_float(fp32, keep_float)
    chosen = set(quantized)
    if keep_float and not kept:
        log.warning("export: no node matches precision.keep_float %s: nothing is kept in float", list(keep_float))
    log.info("export: quantizing to Q/DQ int8 (%s) on %d images at %s, %d batches: the inputs of %d nodes (%s), "
             "%d kept in float...", method, len(calibration.files), list(calibration.shape),
             calibration.batches_total, len(quantized), "/".join(ops), len(kept))
    start = time.perf_counter()
    quiet = _Without("pre-processing")  # onnxruntime's advice to run its optimizer first: not for TensorRT's graph
    logging.getLogger().addFilter(quiet)
    try:
        ranges = calibrate(reference.path, reference.signature["inputs"][0]["name"], calibration, method, ops, folder)
        concats = {n.name for n in fp32.graph.node if n.op_type == "Concat" and n.name in chosen}
        widened = share_concat_ranges(fp32, concats, ranges) if concat_scales == "shared" else 0
        quantize_static(reference.path, path, None, calibration_cache_path=ranges,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(ops), per_channel=True,
                        nodes_to_quantize=quantized, nodes_to_exclude=kept,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                       "AddQDQPairToWeight": True, "OpTypesToExcludeOutputQuantization": list(ops)})
    except Exception as exc:  # onnxruntime's verdict on this graph
        shutil.rmtree(folder, ignore_errors=True)
        raise StageError("export", f"onnxruntime quantize_static: {type(exc).__name__}: {exc}") from exc
    finally:
        logging.getLogger().removeFilter(quiet)
    # quantize_static feeds every reader of a quantized tensor from one Q/DQ pair: a kept node reads float only
    # once rewired past it, as does a residual Add's convolution input (add_inputs=skip)
    adds = {n.name for n in fp32.graph.node if n.op_type == "Add" and n.name in chosen}
    fused = convolution_inputs(fp32, adds) if add_inputs == "skip" else {}
    model = read_float(onnx.load(str(path)), {**fused, **dict.fromkeys(kept)})
    if not model.metadata_props:  # ultralytics' metadata (class names, stride), as the fp32 ONNX has it
        model.metadata_props.extend(onnx.load(reference.path).metadata_props)
    onnx.save(model, str(path))
    qdq = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    artifact = OnnxArtifact(path=str(path), tool=reference.tool, dynamic=reference.dynamic, precision="int8",
                            signature=signature(model), checker=checker_verdict(model),
                            size_bytes=path.stat().st_size, export_s=time.perf_counter() - start, cached=False,
                            end2end=reference.end2end, names=reference.names,
                            folded_splits=reference.folded_splits, head_maps=reference.head_maps,  # its outputs'
                            quantization={"calibrator": method, "images": len(calibration.files),
                                          "source": str(Path(calibration.files[0]).parent), "ops": list(ops),
                                          "keep_float": list(keep_float), "quantized_nodes": len(quantized),
                                          "concat_scales": concat_scales, "widened_ranges": widened,
                                          "add_inputs": add_inputs, "float_add_inputs": len(fused),
                                          "quantized": dict(Counter(n.op_type for n in fp32.graph.node
                                                                    if n.name in chosen)),
                                          "kept_float_nodes": kept})
    store_onnx(folder, artifact)
    log.info("export: Q/DQ ONNX in %.1f s, %d QuantizeLinear nodes, %.1f MB", artifact.export_s, qdq,
             artifact.size_bytes / 1e6)
    return artifact
