"""Typed results: one dataclass per stage, gathered in `VariantResult`, and the one place metrics are named.

Results cross process boundaries (the variant's child process) and disk (result.json, MLflow artifacts)
as plain dicts through `to_dict` / `from_dict`. `VariantResult.metrics()` names every MLflow metric;
`runner table` and `runner check` read the same names back. A compatibility cell is a `Cell` value
(model, ONNX variant x build variant); its label, built from its parts, names the variant in files, runs and
baselines, and is never parsed back.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from runner.config import BackendName, BuildTool, ExportTool, Head, Mechanism, ShapeMode

EXPORT_TOOLS = {ExportTool.ultralytics.value: "ul", ExportTool.torch.value: "tc",  # each tool's word in a label
                ExportTool.dynamo.value: "dynamo"}
BUILD_TOOLS = {BuildTool.tensorrt_api.value: "trt", BuildTool.ultralytics.value: "ul-trt",
               BackendName.onnxruntime.value: "ort"}
SHAPES = {ShapeMode.static.value: "st", ShapeMode.dynamic.value: "dy"}
HEADS = {Head.end2end.value: "e2e", Head.nms.value: "nms"}  # one2many, the default, is not named
PEER_PIPELINE = "predict"  # backend=ultralytics: YOLO(engine).predict, the row runner's own rows are held against
NOT_IN_METRIC_KEY = re.compile(r"[^\w.\- ]")  # MLflow also takes `/` (a path) and `:` (not on Windows): left out
MAX_METRIC_KEY = 200  # MLflow takes 250; the rest is room for the `metric_name.` tag that keeps the real name


def first_line(text: str | None, width: int | None = None) -> str:
    """The first line of `text`, stripped ("" where there is none), cut to `width` characters with "…"."""
    line = text.strip().splitlines()[0] if text and text.strip() else ""
    return line if width is None or len(line) <= width else line[:width - 1] + "…"


class StageError(Exception):
    """An expected verdict of a stage: the export tool, the builder or the runtime said no.

    Its message becomes the variant's `error`. `partial` is the stage's own result so far, kept in the
    variant's result (a failed build keeps its log)."""

    def __init__(self, stage: str, message: str, partial=None):
        super().__init__(message)
        self.stage, self.message, self.partial = stage, message, partial


def _decode(tp, value):
    """`value` (plain JSON data) as an instance of the annotated type `tp`."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _decode(kinds[0], value) if len(kinds) == 1 else value
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp)
                     if f.name in value})
    if origin is list:
        return [_decode(args[0], v) for v in value]
    if origin is dict:
        return {k: _decode(args[1], v) for k, v in value.items()}
    return value


PIN_LISTS = {"fp16_layers": "fp16", "int8_layers": "int8",  # an implicit-INT8 calibration record's pinned layers,
             "int8_float_out_layers": "int8 with an fp16 output"}  # each with what it asks of them
QDQ_NODE = re.compile(r"(Dequantize|Quantize)Linear(_clone_\d+)?$")  # a Q/DQ node's name, or a TensorRT clone
INT8_FIELDS = ("keep_float", "qdq_ops", "calibration_images", "calibration_source", "concat_scales",
               "add_inputs", "pin_int8", "pin_int8_float_out")  # of _Variant


class Record:
    """`to_dict` / `from_dict` for the result dataclasses."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        return _decode(cls, data)


def metric_keys(names) -> dict[str, str]:
    """Each metric name's MLflow key: a character MLflow refuses (a class named `rectangle (big)`) becomes `_` and a
    long name is cut; where that gives a key already taken, it gets a `-2`, `-3`... suffix. Names MLflow takes as
    they are keep them."""
    keys: dict[str, str] = {}
    for name in sorted(names, key=lambda n: _metric_key(n) != n):
        key, n = _metric_key(name), 1
        while key in keys.values():
            n += 1
            key = f"{_metric_key(name)[:MAX_METRIC_KEY - 4]}-{n}"
        keys[name] = key
    return keys


def _metric_key(name: str) -> str:
    return NOT_IN_METRIC_KEY.sub("_", name)[:MAX_METRIC_KEY]


@dataclass(frozen=True)
class _Variant(Record):
    """Where the variant calibrates, its int8 settings that make another ONNX or engine, each "" where it is the
    precision preset's: the patterns kept in float (JSON), the op types Q/DQ quantizes, its Concats' scales, its
    residual Adds' quantized inputs, the calibration images' count and folder, the patterns pinned in int8 (JSON)."""
    tool: str
    shape: str
    precision: str  # fp32 | fp16 | int8, or qdq for a Q/DQ ONNX
    calibrator: str = field(default="", kw_only=True)  # where the variant calibrates: entropy2 | minmax
    keep_float: str = field(default="", kw_only=True)  # e.g. '["*/dfl/*"]'; labelled `keep 1`, or `keep none`
    qdq_ops: str = field(default="", kw_only=True)  # e.g. `Conv+Add`; labelled `ops Conv+Add`
    calibration_images: str = field(default="", kw_only=True)  # e.g. `256`; labelled `cal 256`
    calibration_source: str = field(default="", kw_only=True)  # a folder; labelled `cal from <its name>`
    concat_scales: str = field(default="", kw_only=True)  # `shared`; labelled `concat shared`
    add_inputs: str = field(default="", kw_only=True)  # `skip`; labelled `add skip`
    pin_int8: str = field(default="", kw_only=True)  # e.g. '["*/Conv"]'; labelled `int8 pins 1`
    pin_int8_float_out: str = field(default="", kw_only=True)  # e.g. '["*cv2.*.2/Conv"]'; labelled `int8 float-out 1`
    TOOLS: ClassVar[dict[str, str]] = {}  # tool -> its word in a label

    @property
    def label(self) -> str:
        return " ".join(filter(None, (self.TOOLS.get(self.tool, self.tool), SHAPES[self.shape], self.precision,
                                      self.calibrator, *self._int8_words(), *self._label_tail())))

    def _int8_words(self) -> tuple[str, ...]:
        kept = len(json.loads(self.keep_float)) if self.keep_float else None
        source = f"from {Path(self.calibration_source).name}" if self.calibration_source else ""
        calibration = " ".join(filter(None, (self.calibration_images, source)))
        return ("" if kept is None else f"keep {kept or 'none'}", self.qdq_ops and f"ops {self.qdq_ops}",
                self.concat_scales and f"concat {self.concat_scales}", self.add_inputs and f"add {self.add_inputs}",
                calibration and f"cal {calibration}",
                self.pin_int8 and f"int8 pins {len(json.loads(self.pin_int8))}",
                self.pin_int8_float_out and f"int8 float-out {len(json.loads(self.pin_int8_float_out))}")

    def _label_tail(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class OnnxVariant(_Variant):
    """The compatibility table's column: which tool made the ONNX, its shape mode, weight precision and head
    (one2many; the NMS-free end2end, labelled `e2e`; or one2many with NMS in the graph, labelled `nms`)."""
    head: str = Head.one2many.value
    TOOLS: ClassVar[dict[str, str]] = EXPORT_TOOLS

    def _label_tail(self) -> tuple[str, ...]:
        return HEADS.get(self.head, ""),


@dataclass(frozen=True)
class BuildVariant(_Variant):
    """The compatibility table's row: what built the model under test, for which shapes and precision, the
    engine's input type where it is not float32 (`fp16-in`), and the pipeline around it where it is not the host
    one: `gpu-pre`, `gpu-post`, or the peer's `predict`; `head-maps` where the decode runs after the engine."""
    pipeline: str = ""
    setting: str = ""  # set by the report where variants of one cell differ: the settings that tell them apart
    input_dtype: str = field(default="", kw_only=True)  # `fp16` or `int8` (backend.half_input, int8_input); "": float32
    head_maps: str = field(default="", kw_only=True)  # `head-maps` with backend.head_maps: the engine ends at them
    TOOLS: ClassVar[dict[str, str]] = BUILD_TOOLS

    def _label_tail(self) -> tuple[str, ...]:
        return self.input_dtype and f"{self.input_dtype}-in", self.head_maps, self.pipeline, self.setting


@dataclass(frozen=True)
class Cell(Record):
    """A variant's place in the tables: its model's grid, ONNX column and build row."""
    onnx: OnnxVariant
    build: BuildVariant
    model: str

    @property
    def key(self) -> str:
        """The cell as text: summary rows, baseline keys."""
        return f"{self.model} | {self.onnx.label} | {self.build.label}"

    @property
    def name(self) -> str:
        """The variant's name: file and run names."""
        return f"{self.model}__{self.onnx.label}__{self.build.label}".replace(" ", "-")


@dataclass
class OnnxArtifact(Record):
    path: str
    tool: str
    dynamic: bool
    precision: str  # fp32 | fp16: the dtype of the weights inside the ONNX
    signature: dict
    checker: str  # "ok", or onnx.checker's complaint (the backend still gets the file and has its say)
    size_bytes: int
    export_s: float
    cached: bool
    end2end: bool = False  # the NMS-free one-to-one head
    names: list[str] = field(default_factory=list)  # class names by index, from its metadata; [] if it has none
    quantization: dict | None = None  # a Q/DQ ONNX: calibrator, images, source, ops, keep_float, nodes touched
    folded_splits: int | None = None  # `rewrite.folded_onnx`'s: the Split->Concat copies it folded
    head_maps: dict | None = None  # `rewrite.head_maps_onnx`'s: output, maps, classes, reg_max (the decode's)


@dataclass
class ExportResult(Record):
    weights: str  # the checkpoint exported
    reference: OnnxArtifact  # fp32, same tool and shape mode: what onnxruntime checks the variant against
    tested: OnnxArtifact  # what the backend builds or runs (the reference itself for fp32)
    folded_splits: int | None = None  # Split->Concat copies folded in the ONNX under test; None: not asked


@dataclass
class BuildResult(Record):
    """What made the model under test runnable: a TensorRT engine, or an onnxruntime session's ONNX."""
    tool: str  # tensorrt_api | ultralytics | onnxruntime
    artifact: str  # what the runner opens: an engine file, or an ONNX file
    profile: list[list[int]]  # min, opt, max input shape the built model accepts
    build_s: float = 0.0
    size_bytes: int = 0
    cache_hit: bool = False
    precision_mechanism: str = Mechanism.none.value
    optimization_level: int | None = None
    tf32: bool | None = None
    trt_version: str | None = None
    gpu: str | None = None
    provider: str | None = None  # onnxruntime's execution provider
    log_path: str | None = None
    layers_path: str | None = None
    num_layers: int | None = None
    metadata: dict | None = None  # the JSON header of an ultralytics .engine
    onnx_signature: dict | None = None  # build=ultralytics: the ONNX it made on the way
    calibration: dict | None = None  # implicit INT8: calibrator, images, shape, cache file and whether it was a hit
    head_maps: dict | None = None  # the engine ends at the head's maps: the ONNX's record (`rewrite.cut_at_head_maps`)
    input_range: float | None = None  # an int8 input: the symmetric range its values are quantized at
    pins_ignored: list[str] = field(default_factory=list)  # calibration's pins the engine does not keep (`forensics`)
    pins_unchecked: str | None = None  # why its pins were not checked against the engine's layers

    @property
    def pinned(self) -> set[str]:
        """The layers the calibration record pins (`PIN_LISTS`)."""
        return set().union(*((self.calibration or {}).get(key) or () for key in PIN_LISTS))

    def pin_check_text(self) -> str:
        """"TensorRT ignored 6 of 74 pins: <the first> and 5 more", or "74 precision pins not checked: <why>"; ""
        where every pin was kept, or none asked."""
        if self.pins_unchecked:
            return f"{len(self.pinned)} precision pins not checked: {self.pins_unchecked}"
        if not self.pins_ignored:
            return ""
        more = f" and {len(self.pins_ignored) - 1} more" if len(self.pins_ignored) > 1 else ""
        return f"TensorRT ignored {len(self.pins_ignored)} of {len(self.pinned)} pins: {self.pins_ignored[0]}{more}"


@dataclass
class TensorMetrics(Record):
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    allclose_rate: float


@dataclass
class DetectionMetrics(Record):
    """Detections of the model under test matched against the reference's (class-aware IoU)."""
    precision: float
    recall: float
    f1: float
    mean_iou: float
    score_delta: float
    n_test: int
    n_ref: int


@dataclass
class ShapeCheck(Record):
    shape: list[int]
    status: str  # passed | failed | skipped | reference
    reason: str | None = None  # why it was skipped, or the error that failed it
    tensors: dict[str, TensorMetrics] = field(default_factory=dict)
    detections: DetectionMetrics | None = None  # None: not measured (no reference detections)
    map50: float | None = None  # against the labels, where the data has them
    map50_95: float | None = None
    input_max_abs: float | None = None  # GPU letterbox against the CPU one, where the variant's pre is on the GPU
    ref_map50_95: float | None = None  # the reference's, on the same images at the same shape
    class_ap_delta: dict[str, float] = field(default_factory=dict)  # AP50-95 per class: model under test - reference
    failed_metrics: list[str] = field(default_factory=list)  # the accuracy limits missed: rel-L2, det F1, mAP50-95

    @property
    def rel_l2(self) -> float | None:
        return max((t.rel_l2 for t in self.tensors.values()), default=None)

    @property
    def map_drop(self) -> float | None:
        """Reference mAP50-95 minus the model under test's: what the precision cost (negative: it gained)."""
        if self.map50_95 is None or self.ref_map50_95 is None:
            return None
        return self.ref_map50_95 - self.map50_95


@dataclass
class ValidateResult(Record):
    """passed; inaccurate (every shape ran, one missed an accuracy limit: `failed_metrics`); failed (a shape
    could not run); `reference` when the model under test is the reference itself (nothing to compare, so it
    cannot fail); `unchecked` when no shape could be checked."""
    status: str
    shapes: dict[str, ShapeCheck]
    thresholds: dict
    reference_provider: str
    images: int
    skipped_images: list[str] = field(default_factory=list)
    reason: str | None = None  # why it failed or was unchecked, or what a pass did not measure
    head: str = Head.one2many.value  # the decode: one2many (with NMS) | end2end
    failed_metrics: list[str] = field(default_factory=list)
    headline_shape: list[int] | None = None  # where the headline mAP is measured: the static variant's shape

    def headline(self) -> tuple[str, ShapeCheck] | None:
        """(label, check) of the shape the headline mAP is measured at, where it was scored."""
        return next(((k, s) for k, s in self.shapes.items()
                     if s.shape == self.headline_shape and s.map50_95 is not None), None)

    def worst_map(self) -> tuple[str, ShapeCheck] | None:
        """(label, check) of the shape with the lowest mAP50-95, where any was scored."""
        scored = [(k, s) for k, s in self.shapes.items() if s.map50_95 is not None]
        return min(scored, key=lambda item: item[1].map50_95, default=None)

    @property
    def unvalidated(self) -> list[str]:
        """The shapes of the profile that were not validated (skipped), by label."""
        return [label for label, s in self.shapes.items() if s.status == "skipped"]

    def aggregate(self) -> dict[str, float]:
        """The worst value of each measure over the shapes where it was measured; mAP at the headline shape
        (`map50`, `map50_95`), its lowest over the shapes beside it (`map50_95_worst`)."""
        out = {}
        if tensors := [t for s in self.shapes.values() for t in s.tensors.values()]:
            out.update(rel_l2=max(t.rel_l2 for t in tensors), max_abs=max(t.max_abs for t in tensors),
                       cosine=min(t.cosine for t in tensors), allclose_rate=min(t.allclose_rate for t in tensors))
        if matched := [s.detections for s in self.shapes.values() if s.detections]:
            out.update(det_f1=min(d.f1 for d in matched), det_mean_iou=min(d.mean_iou for d in matched))
        if headline := self.headline():
            out.update(map50=headline[1].map50, map50_95=headline[1].map50_95)
        if lowest := self.worst_map():
            out["map50_95_worst"] = lowest[1].map50_95
        if compared := [s for s in self.shapes.values() if s.map_drop is not None]:
            worst = max(compared, key=lambda s: s.map_drop)
            out.update(ref_map50_95=worst.ref_map50_95, map_drop=worst.map_drop,
                       **{f"ap_delta.{c}": d for c, d in worst.class_ap_delta.items()})
        return out


@dataclass
class Stats(Record):
    mean: float
    p50: float
    p90: float
    p99: float
    std: float
    n: int


BENCH_STAGES = ("preprocess", "infer", "postprocess", "e2e")
OFFLINE_FIGURES = ("e2e_img_s", "engine_img_s", "e2e_ms_per_batch")  # per batch, in MLflow as bench.offline.b<N>.*


@dataclass
class OfflinePoint(Record):
    """The offline scenario at one batch: images/s end to end (frames in, detections out: the images of `runs`
    batches over their wall time; `e2e_ms_per_batch`, that time per batch) and of the engine alone on the same
    input. Whether the chain overlapped its batches is the bench settings' `offline`."""
    batch: int
    e2e_img_s: float
    engine_img_s: float
    e2e_ms_per_batch: float
    runs: int


@dataclass
class ServerResult(Record):
    """The server scenario: `queries` single images arriving as a Poisson process at `target_rate` images/s, served
    one at a time in arrival order. `latency`: arrival to detections out, queueing included; `offered_rate`: the
    queries over the time from the first arrival to the last (the draw's own rate); `achieved_rate`: over the time
    from the first arrival to the last answer (the offered rate where the worker keeps up, less where it cannot)."""
    target_rate: float
    offered_rate: float
    achieved_rate: float
    queries: int
    latency: Stats


@dataclass
class LayerRow(Record):
    """One layer of a built engine (`runner.forensics`): the engine inspector's name, type, precision (its first
    output's datatype; its first input's beside it) and tactic, the ONNX nodes it holds, and its mean time."""
    name: str
    type: str  # the inspector's LayerType: CaskConvolution, Reformat, ...; "unknown" without DETAILED verbosity
    precision: str  # fp32 | fp16 | int8 | int32 | ... | unknown
    input_precision: str
    tactic: str
    ms: float | None  # mean per run; None: the profiler reported no time for it
    reformat: bool  # a copy between formats or precisions that TensorRT inserted
    onnx_nodes: list[str] = field(default_factory=list)

    @property
    def requantize(self) -> bool:
        """A layer made of Quantize/Dequantize nodes only (TensorRT 8.6: type Scale): int8 rescaled to another
        scale, as where a Concat's inputs are quantized apart from its output."""
        return bool(self.onnx_nodes) and all(QDQ_NODE.search(node) for node in self.onnx_nodes)

    @property
    def converts(self) -> bool:
        """It only converts: a reformat, or a requantize."""
        return self.reformat or self.requantize


@dataclass
class LayerProfile(Record):
    """Where the engine's time goes: every layer at `shape` (the timed one, or `bench.layers_batch`'s), times averaged
    over `runs` profiled runs (TensorRT's IProfiler, after the timed loops). `unmatched`: layers profiled that the
    inspector did not list."""
    shape: list[int]
    runs: int
    rows: list[LayerRow]
    unmatched: int = 0

    @property
    def total_ms(self) -> float:
        """The sum of the layers' mean times: the engine's time as profiled, a little above its CUDA-event time."""
        return sum(r.ms or 0.0 for r in self.rows)

    def by(self, key: str) -> dict[str, tuple[float, int]]:
        """{value of `key` (precision, type): (ms, layers)}, the most time first."""
        groups: dict[str, tuple[float, int]] = {}
        for row in self.rows:
            ms, count = groups.get(getattr(row, key), (0.0, 0))
            groups[getattr(row, key)] = ms + (row.ms or 0.0), count + 1
        return dict(sorted(groups.items(), key=lambda item: -item[1][0]))

    @property
    def reformats(self) -> list[LayerRow]:
        """The layers that only convert: TensorRT's reformats, and the requantizations left of Q/DQ pairs."""
        return [r for r in self.rows if r.converts]

    def metrics(self) -> dict[str, float]:
        """The summary as MLflow metrics, under `layers.`: total, counts, reformats, and ms and layers by precision."""
        m = {"layers.total_ms": self.total_ms, "layers.count": len(self.rows),
             "layers.reformats": len(self.reformats), "layers.reformat_ms": sum(r.ms or 0.0 for r in self.reformats),
             "layers.unprofiled": sum(r.ms is None for r in self.rows), "layers.unmatched": self.unmatched}
        for precision, (ms, count) in self.by("precision").items():
            m.update({f"layers.{precision}.ms": ms, f"layers.{precision}.count": count})
        return m


@dataclass
class BenchResult(Record):
    preprocess: Stats
    infer: Stats
    postprocess: Stats
    e2e: Stats
    compute: Stats  # back-to-back execute() calls: the engine alone
    settings: dict
    h2d: Stats | None = None  # the copies inside preprocess / postprocess, CUDA events (a device only)
    d2h: Stats | None = None
    throughput: dict[str, float] = field(default_factory=dict)  # images/s of the engine: opt_batch, batch1_2streams
    offline: list[OfflinePoint] = field(default_factory=list)  # the offline scenario, by batch
    offline_skipped: dict[str, str] = field(default_factory=dict)  # batch -> why it has no offline point
    server: ServerResult | None = None
    layers: LayerProfile | None = None  # each layer's time, precision and tactic (TensorRT only)

    def offline_best(self) -> OfflinePoint | None:
        """The offline point with the most images/s end to end, where there is one."""
        return max(self.offline, key=lambda p: p.e2e_img_s, default=None)

    @property
    def infer_over_compute(self) -> float:
        return self.infer.p50 / self.compute.p50

    @property
    def shape(self) -> list[int]:
        """The input shape timed, [batch, 3, H, W]: every stage's figure is per batch of `shape[0]` images."""
        return list(self.settings["shape"])

    def per_image(self) -> dict[str, float]:
        """Per-image figures beside the per-batch ones: infer and end-to-end p50 ms per image, end-to-end images/s."""
        batch = self.shape[0]
        return {"infer_p50_ms": self.infer.p50 / batch, "e2e_p50_ms": self.e2e.p50 / batch,
                "e2e_img_s": batch * 1000 / self.e2e.p50}


@dataclass
class Resolved(Record):
    """How the variant pre/postprocesses, whether it replays CUDA graphs, takes an fp16 input and ends at the head's
    maps, as resolved on its backend, and which of these the config left to `auto` (`backends.resolve_auto`)."""
    preprocess: str  # cpu | gpu
    postprocess: str
    cuda_graph: bool | None  # None: the backend has no CUDA graph
    auto: list[str] = field(default_factory=list)  # of preprocess, postprocess, cuda_graph, and API_BUILD_SETTINGS
    half_input: bool = False
    int8_input: bool = False
    head_maps: bool = False

    def auto_text(self) -> str:
        """What `auto` became, as the tables show it: `pre gpu, post gpu, graph on, fp16 input, head maps`; "" where
        nothing was auto. A build setting that `auto` left off is not named."""
        graph = "n/a" if self.cuda_graph is None else "on" if self.cuda_graph else "off"
        words = {"preprocess": f"pre {self.preprocess}", "postprocess": f"post {self.postprocess}",
                 "cuda_graph": f"graph {graph}", "half_input": self.half_input and "fp16 input",
                 "int8_input": self.int8_input and "int8 input", "head_maps": self.head_maps and "head maps"}
        return ", ".join(words[key] for key in words if key in self.auto and words[key])


@dataclass
class VariantResult(Record):
    """Everything one variant did. `status`: running | ok | failed | skipped."""
    cell: Cell
    backend: str
    profile: str
    status: str = "running"
    failed_stage: str | None = None
    error: str | None = None
    error_detail: str | None = None  # the traceback of an unexpected error (a bug, not a verdict)
    started_at: str | None = None
    environment: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    export: ExportResult | None = None
    build: BuildResult | None = None
    validate: ValidateResult | None = None
    bench: BenchResult | None = None
    resolved: Resolved | None = None  # pre/post devices and CUDA graph on the variant's backend

    @property
    def name(self) -> str:
        return self.cell.name

    def fail(self, stage: str, error: str, detail: str | None = None) -> None:
        """Mark the variant failed at `stage`, unless an earlier stage already failed it; a later stage's error is
        kept in `error_detail`, after the first one's."""
        if self.status != "failed":
            self.status, self.failed_stage, self.error, self.error_detail = "failed", stage, error, detail
            return
        later = f"then {stage}: {error}" + (f"\n{detail}" if detail else "")
        self.error_detail = f"{self.error_detail}\n\n{later}" if self.error_detail else later

    def first_error_line(self) -> str:
        return first_line(self.error)

    def metrics(self) -> dict[str, float]:
        """The numeric outcome as MLflow metrics (stable names, read back by `runner table|check`), under keys
        MLflow takes (`metric_keys`)."""
        named = self._named_metrics()
        keys = metric_keys(named)
        return {keys[name]: value for name, value in named.items()}

    def metric_names(self) -> dict[str, str]:
        """The real name of each metric whose MLflow key differs from it: key -> name."""
        return {key: name for name, key in metric_keys(self._named_metrics()).items() if key != name}

    def _named_metrics(self) -> dict[str, float]:
        m: dict[str, float | None] = {f"time.{stage}_s": s for stage, s in self.timings.items()}
        if self.export:
            m.update({"export.onnx_mb": self.export.tested.size_bytes / 1e6,
                      "export.export_s": self.export.tested.export_s})
        if self.build and self.build.artifact:  # a failed build keeps its log, but has no numbers
            b = self.build
            m.update({"build.build_s": b.build_s, "build.cache_hit": float(b.cache_hit),
                      "build.num_layers": b.num_layers})
            if b.tool != BackendName.onnxruntime:
                m["build.engine_mb"] = b.size_bytes / 1e6
        if self.validate:
            v = self.validate
            if v.status in ("passed", "inaccurate", "failed"):
                m["val.passed"] = float(v.status == "passed")
            m.update({f"val.{k}": x for k, x in v.aggregate().items()})
            m.update({"data.images": v.images, "data.skipped_images": len(v.skipped_images)})
            for label, s in v.shapes.items():
                m.update({f"val.{label}.rel_l2": s.rel_l2, f"val.{label}.map50": s.map50,
                          f"val.{label}.map50_95": s.map50_95, f"val.{label}.map_drop": s.map_drop})
                if s.detections:
                    m.update({f"val.{label}.det_{k}": getattr(s.detections, k) for k in ("precision", "recall", "f1")})
        if self.bench:
            for stage in (*BENCH_STAGES, "compute"):
                stats = getattr(self.bench, stage).to_dict()
                m.update({f"bench.{stage}.{k}": v for k, v in stats.items() if k != "n"})
            for copy in ("h2d", "d2h"):
                if getattr(self.bench, copy) is not None:
                    m[f"bench.{copy}.p50"] = getattr(self.bench, copy).p50
            m.update({f"bench.throughput.{k}": v for k, v in self.bench.throughput.items()})
            m.update({f"bench.per_image.{k}": v for k, v in self.bench.per_image().items()})
            m.update(self._scenario_metrics())
            m["bench.batch"] = self.bench.shape[0]
            m["bench.infer_over_compute"] = self.bench.infer_over_compute
            m["bench.cuda_graph"] = float(bool(self.bench.settings.get("cuda_graph")))  # as run, not as asked
            if self.bench.layers:
                m.update(self.bench.layers.metrics())
        return {k: float(v) for k, v in m.items() if v is not None}

    def _scenario_metrics(self) -> dict[str, float]:
        """The offline scenario at its best batch and at every batch, and the server scenario."""
        m, bench = {}, self.bench
        if best := bench.offline_best():
            m.update({"bench.offline.e2e_img_s": best.e2e_img_s, "bench.offline.engine_img_s": best.engine_img_s,
                      "bench.offline.best_batch": best.batch})
        for point in bench.offline:
            m.update({f"bench.offline.b{point.batch}.{k}": getattr(point, k) for k in OFFLINE_FIGURES})
        if server := bench.server:
            m.update({"bench.server.p50": server.latency.p50, "bench.server.p99": server.latency.p99,
                      "bench.server.offered_rate": server.offered_rate, "bench.server.achieved_rate":
                      server.achieved_rate})
        return m
