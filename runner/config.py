"""Typed configuration: the structured-config schema behind `conf/`, and its checks.

Hydra composes `conf/`; OmegaConf merges it onto these dataclasses, which rejects wrong types.
`check()` adds the value and cross-field rules. Every error is a `ConfigError` whose message is one line
naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ASSETS = Path(__file__).resolve().parent / "assets"
MODELS = ("yolov5nu", "yolov8n", "yolov10n", "yolo11n", "yolo26n")  # the presets (conf/model/), oldest first
DETR_MODELS = ("rtdetr-n",)  # the RT-DETR presets (runner/assets/<name>.yaml)


def conf_dir() -> Path:
    """The Hydra config folder: inside the installed package (a wheel carries `conf/` as `runner/conf`),
    else the checkout's `conf/` beside the package."""
    package = Path(__file__).resolve().parent
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parent / "conf"


def asset(name: str) -> str:
    """`${asset:yolo11n.pt}` in a config: a file shipped in the package's assets (the presets' weights)."""
    return str(ASSETS / name)


def side(imgsz, index: int) -> int:
    """`${side:${model.imgsz},0}` in a config: H (0) or W (1) of `model.imgsz`, a square int or [H, W]."""
    return int(imgsz) if isinstance(imgsz, int) else int(imgsz[index])


OmegaConf.register_new_resolver("asset", asset, replace=True)  # in every process that resolves a config
OmegaConf.register_new_resolver("side", side, replace=True)
# Our launcher presets keep the plugins' names, so Hydra checks them against the plugins' schemas, and warns so
# wherever it composes: the launching process, and the launcher's workers (which import this module first).
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


AUTO = "auto"  # a setting resolved per variant once its backend is known (`backends.resolve_auto`)
API_BUILD_SETTINGS = ("half_input", "int8_input", "head_maps")  # backend settings of runner's TensorRT API build
#   (`Backend.takes`)


class ConfigError(ValueError):
    """A bad configuration, reported as one line before any work starts."""


class ExportTool(str, Enum):
    ultralytics = "ultralytics"  # model.export(format="onnx")
    torch = "torch"  # torch.onnx.export, TorchScript exporter
    dynamo = "dynamo"  # torch.onnx.export(dynamo=True), torch.export-based


class BuildTool(str, Enum):
    """How a TensorRT engine is made: the TensorRT API on the variant's ONNX, or ultralytics in one step."""
    tensorrt_api = "tensorrt_api"
    ultralytics = "ultralytics"  # model.export(format="engine") from the weights


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class ShapeMode(str, Enum):
    static = "static"
    dynamic = "dynamic"


class Fp16Mode(str, Enum):
    """How an fp16 TensorRT engine is made: BuilderFlag.FP16 on the fp32 ONNX, or a strongly typed fp16 ONNX."""
    auto = "auto"
    builder_flag = "builder_flag"
    strongly_typed = "strongly_typed"


class Int8Mode(str, Enum):
    """How an int8 model is made: TensorRT's implicit calibration (<= 10), or an explicitly quantized Q/DQ ONNX
    calibrated on the CPU with onnxruntime (8.6, 10, 11, and onnxruntime itself)."""
    auto = "auto"  # calibrator where TensorRT has it, else qdq
    calibrator = "calibrator"
    qdq = "qdq"


class Calibrator(str, Enum):
    """The calibration algorithm: TensorRT's IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator, or onnxruntime's
    CalibrationMethod.Entropy / MinMax / Percentile for a Q/DQ ONNX. TensorRT has no percentile calibrator: its
    implicit INT8 takes onnxruntime's percentile ranges as dynamic ranges instead."""
    entropy2 = "entropy2"
    minmax = "minmax"
    percentile = "percentile"


class AddInputs(str, Enum):
    """A Q/DQ ONNX's residual Adds: Q/DQ on both inputs, or on the skip input alone where the other comes from a
    convolution (its activation after it), which TensorRT then fuses the Add into."""
    all = "all"
    skip = "skip"


class ConcatScales(str, Enum):
    """A Q/DQ ONNX's Concats: each input and the output at its own calibrated scale, or all at one (their ranges'
    union), so TensorRT concatenates int8 in place rather than requantizing each input."""
    own = "own"
    shared = "shared"


class Head(str, Enum):
    """Which detection head the ONNX exposes: one-to-many `(B, 4 + nc, anchors)` decoded with NMS, or the
    one-to-one, NMS-free head of yolov10 / yolo26 `(B, max_det, 6)`, decoded without NMS."""
    one2many = "one2many"
    end2end = "end2end"
    nms = "nms"  # ultralytics' export nms=True: the one-to-many head with NMS inside the graph, (B, max_det, 6)


class Mechanism(str, Enum):
    """How a backend makes the variant's precision, resolved where it runs (`resolved.precision_mechanism`)."""
    none = "none"  # fp32
    builder_flag = "builder_flag"  # fp16: BuilderFlag.FP16 on the fp32 ONNX
    strongly_typed = "strongly_typed"  # fp16: a strongly typed network of the fp16 ONNX
    fp16_onnx = "fp16_onnx"  # fp16: onnxruntime runs the fp16 ONNX
    calibrator = "calibrator"  # int8: TensorRT's implicit calibration, in the build
    qdq = "qdq"  # int8: a Q/DQ ONNX calibrated with onnxruntime
    ultralytics = "ultralytics"  # build=ultralytics picks its own, recorded at build


class BackendName(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    ultralytics = "ultralytics"  # the peer: YOLO(engine).predict on the TensorRT engine the variant builds


ENGINE_BACKENDS = (BackendName.tensorrt, BackendName.ultralytics)  # run a TensorRT engine: the row names its build tool


class Device(str, Enum):
    auto = "auto"  # resolved per variant once its backend is known (`backends.resolve_auto`)
    cpu = "cpu"
    gpu = "gpu"


@dataclass
class ModelConfig:
    weights: str = MISSING  # an ultralytics .pt, loaded exactly as given (the presets ship theirs)
    name: Optional[str] = None  # in every variant name and table; null: the weights file's name
    imgsz: Any = field(default_factory=lambda: [640, 640])  # [H, W] of export and static shapes; an int N: [N, N]
    stride: int = 32

    @property
    def label(self) -> str:
        return self.name or Path(self.weights).stem


@dataclass
class ExportConfig:
    tool: ExportTool = ExportTool.ultralytics
    shape: Optional[ShapeMode] = None  # ONNX shape mode; null follows `shape.mode`
    head: Head = Head.one2many  # end2end: the NMS-free one-to-one head (yolov10, yolo26); nms: NMS in the graph
    opset: int = 17
    simplify: bool = True


@dataclass
class BuildConfig:
    tool: BuildTool = BuildTool.tensorrt_api


@dataclass
class PrecisionConfig:
    name: Precision = Precision.fp32
    fp16_mode: Fp16Mode = Fp16Mode.auto
    int8_mode: Int8Mode = Int8Mode.auto
    calibrator: Calibrator = Calibrator.entropy2
    keep_float: List[str] = field(default_factory=list)  # int8: fnmatch patterns on ONNX node names kept in float
    pin_int8: List[str] = field(default_factory=list)  # TensorRT's implicit INT8: fnmatch patterns on layer names run
    #   in int8, precision constraints obeyed (those kept in float excepted); []: TensorRT picks each layer's precision
    pin_int8_float_out: List[str] = field(default_factory=list)  # TensorRT's implicit INT8: fnmatch patterns on layer
    #   names run in int8 from their int8 input with an fp16 output, kept in float or not (the Detect head's last
    #   convolutions, whose outputs one int8 scale would not bear)
    qdq_ops: List[str] = field(default_factory=lambda: ["Conv", "Add", "Concat"])  # Q/DQ: the op types quantized
    concat_scales: ConcatScales = ConcatScales.own  # Q/DQ: a Concat's inputs and output at their own scales, or one
    add_inputs: AddInputs = AddInputs.all  # Q/DQ: both inputs of a residual Add, or the skip input alone
    calibration_images: int = 32  # int8: how many calibration images
    calibration_source: Optional[str] = None  # int8: a folder of calibration images; null: the generated
    #   calibration split, or with data.images set, that folder's images past the ones validated on


@dataclass
class ShapeConfig:
    """The input shapes the backend is built for and checked at: min = opt = max when static."""
    mode: ShapeMode = ShapeMode.static
    min: List[int] = MISSING
    opt: List[int] = MISSING
    max: List[int] = MISSING


@dataclass
class ProfileConfig:
    name: str = "default"
    min: List[int] = MISSING
    opt: List[int] = MISSING
    max: List[int] = MISSING


@dataclass
class BackendConfig:
    """Every backend's settings; `conf/backend/<name>.yaml` names the backend and nothing else."""
    name: BackendName = BackendName.auto  # auto: TensorRT where it and a CUDA GPU are present, else onnxruntime
    builder_optimization_level: Optional[int] = None  # null: TensorRT's default (3); 0 builds fastest
    workspace_gib: float = 4.0
    tf32: bool = False  # TensorRT turns TF32 on for fp32 layers by default; fp32 here means IEEE fp32
    half_input: Any = AUTO  # true | false | auto: TensorRT fp16 and int8 Q/DQ engines of runner's own build: the input
    #   in fp16, as the GPU letterbox writes it. auto: on where it applies and the input is not int8
    #   (`backends.resolve_auto`)
    int8_input: Any = AUTO  # true | false | auto: TensorRT's implicit INT8 from onnxruntime's ranges: the input in
    #   int8, quantized at its calibrated range by the letterbox (GPU or host), so the engine's int8 stem reads it
    #   without converting it. auto: on where it applies
    fold_split_concat: bool = True  # TensorRT API build: a Concat of a Split's every output reads its input (exact;
    #   `rewrite`), so the engine writes the tensor in place instead of copying its halves
    head_maps: Any = AUTO  # true | false | auto: TensorRT API build of a one-to-many YOLO head: the engine ends at the
    #   head's per-level maps (`rewrite`), in fp16 where the precision is fp16 or int8; the GPU score filter, or the
    #   host, decodes them. The peer keeps the whole head. auto: on where it applies and the ONNX has the maps, else
    #   the whole head (said in the log)
    engine_cache: bool = True
    timing_cache: bool = True
    ort_provider: str = "CPUExecutionProvider"  # for backend=onnxruntime; the reference always runs on the CPU
    timeout_s: int = 1800  # per variant, in its child process
    gpus: Any = "auto"  # auto: every GPU of the host, one variant per GPU at a time; or a list of indices, e.g. [0,1]


@dataclass
class PreprocessConfig:
    """cpu: letterbox and normalise on the host, upload floats. gpu: upload the uint8 image, letterbox on the GPU
    into the engine's input (TensorRT). auto: gpu on TensorRT, else cpu."""
    device: Device = Device.auto


@dataclass
class PostprocessConfig:
    """cpu: copy every output back, decode on the host. gpu: filter by score, NMS and scale to the source image on
    the GPU, copy back only the detections (TensorRT). auto: gpu on TensorRT, else cpu."""
    device: Device = Device.auto


@dataclass
class DataConfig:
    name: str = "shapes"
    images: Optional[str] = None  # null: the generated held-out split of the default model
    labels: Optional[str] = None  # YOLO .txt labels; null: as ultralytics finds them (the last /images/ -> /labels/)
    limit: int = 16
    names: Optional[List[str]] = None  # the class names of data.images' labels, by id, checked against the model's;
    #   null: not checked (the generated data's are synthetic.CLASSES)


@dataclass
class Thresholds:
    """Limits of one precision against the fp32 onnxruntime reference on the same images. A miss is the table's
    accuracy state: the variant built and ran. rel-L2 and atol/rtol: the raw outputs; det F1: detections matched
    by IoU; max_map_drop: reference mAP50-95 minus the variant's."""
    atol: float = MISSING
    rtol: float = MISSING
    max_rel_l2: float = MISSING
    min_det_f1: float = MISSING
    max_map_drop: float = MISSING  # mAP50-95 of the reference minus the model under test's, on the same images


@dataclass
class ValidateConfig:
    conf: float = 0.25
    nms_iou: float = 0.7
    match_iou: float = 0.5  # class-aware IoU for matching detections against the reference
    max_det: int = 300
    non_square: bool = True  # dynamic: also check one non-square shape inside the profile
    fp32: Thresholds = field(default_factory=lambda: Thresholds(1e-3, 1e-3, 1e-5, 0.99, 0.005))
    fp16: Thresholds = field(default_factory=lambda: Thresholds(5e-2, 5e-2, 5e-3, 0.9, 0.01))
    # int8 moves raw outputs by design: it is judged on what it costs in detections and mAP
    int8: Thresholds = field(default_factory=lambda: Thresholds(0.5, 0.1, 0.25, 0.8, 0.02))


@dataclass
class BenchConfig:
    # the single-stream chain loop, as trtexec times (--warmUp 200 ms, --duration): warm-up runs for at least
    # `warmup` runs and `warmup_s` seconds, so clocks and caches settle; timed runs for at least `iters` and
    # `min_timed_s` seconds
    warmup: int = 20
    warmup_s: float = 0.2
    iters: int = 200
    min_timed_s: float = 1.0
    # offline scenario: images/s end to end and of the engine alone at each of these batches the profile holds
    # (else at its max batch), about `offline_images` images per batch; [] leaves it out
    offline_batches: List[int] = field(default_factory=lambda: [1, 8, 32])
    offline_images: int = 512
    offline_overlap: bool = True  # overlap the offline batches where the chain can (TensorRT, GPU letterbox)
    # server scenario: Poisson arrivals at this many images/s, one worker at batch 1, for about
    # server_queries / server_rate seconds; null leaves it out
    server_rate: Optional[float] = None
    server_queries: int = 200
    batch: int = 1  # every variant is timed at [batch, 3, *model.imgsz]: the static variant's shape
    layers_batch: Optional[int] = None  # each layer is profiled at this batch where the built profile holds it (e.g.
    #   the opt batch, where int8's gain should show); null: at the timed shape
    cuda_graph: Any = AUTO  # true | false | auto: on with TensorRT (a graph per shape), n/a elsewhere


@dataclass
class TrackingConfig:
    enabled: bool = True  # false: results only in the sweep folder (results.json, summary.csv)
    uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str = "runner"
    artifact_root: str = "outputs/mlartifacts"


@dataclass
class SweepConfig:
    """Given to each job by the launching process as overrides (see `sweep.Sweep.job_overrides`): a job on another
    host cannot read the sweep folder."""
    parent_run_id: Optional[str] = None  # the sweep's MLflow parent run
    total: int = 1  # variants in the sweep, for progress lines
    server_uri: Optional[str] = None  # the loopback server the jobs log through; None: tracking.uri


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resume: Optional[str] = None  # latest, or a sweep folder: keep its finished variants, run the rest
    outputs: str = "outputs"
    cache_dir: str = "${outputs}/cache"

    @property
    def timed_shape(self) -> list[int]:
        """The input shape every variant of a sweep is timed at: the static shape at the bench batch."""
        return [self.bench.batch, 3, *self.model.imgsz]


def register() -> None:
    """Register the schema so `conf/config.yaml` can name it first in its defaults list, and runner's sweeper
    (`runner.sweeper`) as `hydra/sweeper: runner`."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    ConfigStore.instance().store(group="hydra/sweeper", name="runner",
                                 node={"_target_": "hydra_plugins.runner_sweeper.CostOrderSweeper"})


def to_run_config(cfg: DictConfig) -> RunConfig:
    """A composed config (no `hydra` node: Hydra drops it from the job's config) as the typed, fully resolved
    dataclass tree, checked; raises ConfigError."""
    problem = unknown_key(cfg, RunConfig)
    if problem:
        raise ConfigError(problem)
    try:
        imgsz = _imgsz(cfg.model)  # before the shapes that interpolate it resolve
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc)) from None
    run.model.imgsz = imgsz
    check(run)
    return run


def _imgsz(model: DictConfig) -> list[int]:
    """`model.imgsz` as [H, W], positive multiples of the stride; an int N is [N, N], as ultralytics takes it.
    Raises ConfigError."""
    stride, value = model.stride, model.imgsz
    if stride <= 0:
        raise ConfigError(f"model.stride: must be a positive integer, got {stride}")
    hw = [value, value] if isinstance(value, int) else list(value) if isinstance(value, ListConfig) else value
    if not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and v > 0 and not v % stride for v in hw)):
        raise ConfigError(f"model.imgsz: expected [H, W] or one int for both, positive multiples of the stride "
                          f"{stride}, got {value}")
    return hw


@functools.cache
def shipped_precision(option: str) -> PrecisionConfig:
    """The precision preset `conf/precision/<option>.yaml` as shipped, on the schema's defaults."""
    preset = OmegaConf.load(conf_dir() / "precision" / f"{option}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrecisionConfig), preset))


def to_plain(run: RunConfig) -> dict:
    """The typed config as plain values (enums as their names): what a variant's record, params and identity hold."""
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True, enum_to_str=True)


def unknown_key(node: DictConfig, schema: type, prefix: str = "") -> str | None:
    """A one-line complaint about the first key of `node` that `schema` (a dataclass) does not have, or None.

    Hydra lets `+key=value` add keys even to a structured config, so a typo would run on defaults."""
    fields = {f.name for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            where = f"'{prefix.rstrip('.')}'" if prefix else "the config"
            return f"{prefix}{key}: not a key of {where}; {hint}allowed: {', '.join(sorted(fields))}"
        if dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            problem = unknown_key(node[key], hints[key], f"{prefix}{key}.")
            if problem:
                return problem
    return None


def omegaconf_message(exc: OmegaConfBaseException) -> str:
    """OmegaConf's complaint in one line, led by the key it names."""
    key = getattr(exc, "full_key", None)
    text = " ".join(str(getattr(exc, "msg", exc)).split("\n")[0].split())
    return f"{key}: {text}" if key else text


def _check_dims(key: str, dims: List[int]) -> None:
    if len(dims) != 4:
        raise ConfigError(f"{key}: expected 4 dims [N, 3, H, W], got {list(dims)}")
    if any(d <= 0 for d in dims):
        raise ConfigError(f"{key}: every dim must be a positive integer, got {list(dims)}")
    if dims[1] != 3:
        raise ConfigError(f"{key}: dim 1 is the channel count and must be 3, got {list(dims)}")


def _check_range(key: str, lo: List[int], mid: List[int], hi: List[int]) -> None:
    for name, dims in (("min", lo), ("opt", mid), ("max", hi)):
        _check_dims(f"{key}.{name}", dims)
    if any(a > b for a, b in zip(lo, mid)):
        raise ConfigError(f"{key}: min must be <= opt in every dim, got min={list(lo)} opt={list(mid)}")
    if any(a > b for a, b in zip(mid, hi)):
        raise ConfigError(f"{key}: opt must be <= max in every dim, got opt={list(mid)} max={list(hi)}")


def _check_fraction(key: str, value: float, low_open: bool = False) -> None:
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ConfigError(f"{key}: must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def _check_validate(v: ValidateConfig) -> None:
    for key in ("conf", "nms_iou", "match_iou"):
        _check_fraction(f"validate.{key}", getattr(v, key), low_open=True)
    if v.max_det <= 0:
        raise ConfigError(f"validate.max_det: must be a positive integer, got {v.max_det}")
    for precision in Precision:
        t: Thresholds = getattr(v, precision.value)
        for key in ("atol", "rtol", "max_rel_l2", "max_map_drop"):
            if getattr(t, key) < 0:
                raise ConfigError(f"validate.{precision.value}.{key}: must be >= 0, got {getattr(t, key)}")
        _check_fraction(f"validate.{precision.value}.min_det_f1", t.min_det_f1)


def _check_name(key: str, name: Optional[str]) -> None:
    """A name goes into variant, file and run names: one path component, never a way out of a folder."""
    if name is not None and (any(c in name for c in "/\\\0") or name in (".", "..")):
        raise ConfigError(f"{key}: a name, not a path: no '/' or '\\', not '.' or '..'; got {name!r}")


def _check_timed_shape(cfg: RunConfig) -> None:
    """Every variant is timed at the same shape, so each variant's shapes must hold it."""
    if cfg.bench.batch <= 0:
        raise ConfigError(f"bench.batch: must be a positive integer, got {cfg.bench.batch}")
    timed, lo, hi = cfg.timed_shape, list(cfg.shape.min), list(cfg.shape.max)
    if not all(a <= t <= b for a, t, b in zip(lo, timed, hi)):
        key = "model.imgsz" if lo[0] <= timed[0] <= hi[0] else "bench.batch"
        other = ("'shape.opt=[" + ",".join(map(str, timed)) + "]'" if cfg.shape.mode == ShapeMode.static
                 else "profile.min / profile.max")
        raise ConfigError(f"{key}: every variant is timed at [bench.batch, 3, *model.imgsz] = {timed}, outside "
                          f"shape={cfg.shape.mode.value} {lo}..{hi}; set {key} or {other}")


def _check_scenarios(b: BenchConfig) -> None:
    if not all(isinstance(n, int) and n > 0 for n in b.offline_batches):
        raise ConfigError(f"bench.offline_batches: a list of positive batch sizes such as [1,8,32] ([] for none), "
                          f"got {list(b.offline_batches)}")
    if b.layers_batch is not None and not (isinstance(b.layers_batch, int) and b.layers_batch > 0):
        raise ConfigError(f"bench.layers_batch: a positive batch size (null: the timed shape's), got {b.layers_batch}")
    for key in ("offline_images", "server_queries"):
        if getattr(b, key) <= 0:
            raise ConfigError(f"bench.{key}: must be a positive integer, got {getattr(b, key)}")
    if b.server_rate is not None and not b.server_rate > 0:
        raise ConfigError(f"bench.server_rate: images/s, a positive number (null: no server scenario), "
                          f"got {b.server_rate}")


QDQ_OPS = ("Conv", "Add", "Concat", "MatMul", "Gemm")  # the op types precision.qdq_ops may name
# the Q/DQ placement settings TensorRT's calibrator has none of: why a calibrated variant refuses all but the default
QDQ_PLACEMENT = {
    "concat_scales": ("TensorRT's calibrator sets its own scales; use precision=int8_qdq, or precision.calibrator="
                      "percentile, whose ranges can share them"),
    "add_inputs": ("TensorRT's calibrator places no Q/DQ; use precision=int8_qdq, whose Q/DQ ONNX can leave an Add's "
                   "convolution input in float"),
}
RANGES_CALIBRATORS = (Calibrator.percentile,)  # implicit INT8 from onnxruntime's ranges: Concats may share them


def calibrator_refusal(p: PrecisionConfig) -> str | None:
    """Why TensorRT's implicit INT8 cannot take `p`'s Q/DQ placement settings, in one line; None where it can (only
    onnxruntime's ranges share Concat ranges)."""
    for key, why in QDQ_PLACEMENT.items():
        ranges_share = key == "concat_scales" and p.calibrator in RANGES_CALIBRATORS
        if getattr(p, key) != getattr(PrecisionConfig, key) and not ranges_share:
            return (f"precision.{key}={getattr(p, key).value}: {why}; or "
                    f"precision.{key}={getattr(PrecisionConfig, key).value} with the calibrator")
    return None


PIN_KEYS = ("pin_int8", "pin_int8_float_out")  # of PrecisionConfig: layers pinned in int8 on TensorRT's implicit INT8


def pins_refusal(p: PrecisionConfig, implicit_int8: bool) -> str | None:
    """Why `p`'s int8 pins do not apply, in one line: no int8, or a Q/DQ ONNX (not `implicit_int8`), whose Q/DQ
    nodes place int8; None where they do, or there are none."""
    pinned = next((f"precision.{key}={list(getattr(p, key))}" for key in PIN_KEYS if getattr(p, key)), None)
    if pinned is None:
        return None
    if p.name != Precision.int8:
        return f"{pinned}: precision {p.name.value} has no int8 layer; the pins apply to precision=int8"
    if not implicit_int8:
        return (f"{pinned}: a Q/DQ ONNX runs int8 where its Q/DQ nodes are; the pins apply to TensorRT's implicit "
                f"INT8 (precision=int8_calibrator or int8, TensorRT <= 10)")
    return None


def _check_precision(p: PrecisionConfig) -> None:
    """The calibration and Q/DQ settings: what the mechanism has, well-formed."""
    if p.int8_mode == Int8Mode.calibrator and (why := calibrator_refusal(p)):
        raise ConfigError(why)
    if p.int8_mode == Int8Mode.qdq and (why := pins_refusal(p, implicit_int8=False)):
        raise ConfigError(why)
    unknown = [op for op in p.qdq_ops if op not in QDQ_OPS]
    if not p.qdq_ops or unknown:
        raise ConfigError(f"precision.qdq_ops: a list of op types from {', '.join(QDQ_OPS)}, got {list(p.qdq_ops)}")
    for key, example in (("keep_float", "'*/dfl/*'"), ("pin_int8", "'*/Conv'"),
                         ("pin_int8_float_out", "'*cv2.*.2/Conv'")):
        if not all(isinstance(k, str) and k for k in getattr(p, key)):
            raise ConfigError(f"precision.{key}: a list of fnmatch patterns on ONNX node names such as {example}, "
                              f"got {list(getattr(p, key))}")


def check(cfg: RunConfig) -> None:
    """Cross-field rules the schema cannot express. Raises ConfigError with a one-line message."""
    for key, name in (("model.name", cfg.model.name), ("data.name", cfg.data.name),
                      ("profile.name", cfg.profile.name)):
        _check_name(key, name)
    stride = cfg.model.stride
    _check_range("profile", cfg.profile.min, cfg.profile.opt, cfg.profile.max)
    _check_range("shape", cfg.shape.min, cfg.shape.opt, cfg.shape.max)
    if cfg.shape.mode == ShapeMode.static:
        if not (list(cfg.shape.min) == list(cfg.shape.opt) == list(cfg.shape.max)):
            raise ConfigError(f"shape: a static shape needs min = opt = max, got min={list(cfg.shape.min)} "
                              f"max={list(cfg.shape.max)}; use shape=dynamic for a range")
    if any(v % stride for v in cfg.shape.opt[2:]):  # the shape timed, and validated in every mode
        raise ConfigError(f"shape.opt: H and W must be multiples of the stride {stride}, got {list(cfg.shape.opt)}"
                          f"{'' if cfg.shape.mode == ShapeMode.static else ' (profile.opt)'}")
    _check_validate(cfg.validate)
    for key, value in (("data.limit", cfg.data.limit), ("precision.calibration_images",
                                                          cfg.precision.calibration_images),
                       ("bench.iters", cfg.bench.iters)):
        if value <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {value}")
    for key in ("warmup", "warmup_s", "min_timed_s"):
        value = getattr(cfg.bench, key)
        if not math.isfinite(value):  # inf would time for ever; nan compares false and would be ignored
            raise ConfigError(f"bench.{key}: must be finite, got {value}")
        if value < 0:
            raise ConfigError(f"bench.{key}: must be >= 0, got {value}")
    for key, value in (("bench.cuda_graph", cfg.bench.cuda_graph), ("backend.half_input", cfg.backend.half_input),
                       ("backend.int8_input", cfg.backend.int8_input), ("backend.head_maps", cfg.backend.head_maps)):
        if not (isinstance(value, bool) or value == AUTO):
            raise ConfigError(f"{key}: true, false or auto, got {value!r}")
    if cfg.backend.half_input is True and cfg.backend.int8_input is True:
        raise ConfigError("backend.half_input and backend.int8_input: the input has one type; set one of them false")
    _check_timed_shape(cfg)
    _check_scenarios(cfg.bench)
    _check_precision(cfg.precision)
    level = cfg.backend.builder_optimization_level
    if level is not None and not 0 <= level <= 5:
        raise ConfigError(f"backend.builder_optimization_level: must be 0..5 or null, got {level}")
    gpus = cfg.backend.gpus
    if gpus != "auto" and not (isinstance(gpus, list) and gpus and all(isinstance(g, int) and g >= 0 for g in gpus)):
        raise ConfigError(f"backend.gpus: 'auto' or a list of GPU indices such as [0,1], got {gpus}")
    if cfg.backend.timeout_s <= 0:
        raise ConfigError(f"backend.timeout_s: must be a positive integer, got {cfg.backend.timeout_s}")
