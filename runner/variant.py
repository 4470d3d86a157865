"""One variant, top to bottom: export -> build -> validate -> bench, on the backend chosen by name.

Runs inside the variant's child process (see `isolate`) and returns a `VariantResult`. An expected verdict
(a `StageError`: the export tool, builder or runtime said no) fails the variant at its stage with the tool's
own words. Anything else is a bug: it fails the variant at the stage it hit, and its traceback is kept in
`error_detail`. Progress goes to `logging`.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from runner import backends, checkpoint, forensics, heads, prepost
from runner.backends.onnxruntime import REFERENCE_PROVIDER, open_reference
from runner.bench import bench
from runner.config import (ENGINE_BACKENDS, PIN_KEYS, QDQ_PLACEMENT, BackendName, BuildTool, ConfigError, Device,
                           Head, Mechanism, Precision, RunConfig, ShapeMode, shipped_precision)
from runner.data import Sample, Selection, class_names, load_samples, names_mismatch
from runner.environment import environment
from runner.export import ExportSpec, export_onnx
from runner.quantize import calibration_set, quantize_variant
from runner.results import (PEER_PIPELINE, BuildResult, BuildVariant, Cell, ExportResult, LayerProfile, OnnxVariant,
                            Resolved, StageError, VariantResult)
from runner.rewrite import NoHeadMaps, folded_onnx, head_maps_onnx
from runner.validate import headline_shape, shapes_to_check, validate

log = logging.getLogger(__name__)
INT8_PRESETS = {Mechanism.qdq: "int8_qdq", Mechanism.calibrator: "int8_calibrator"}  # each mechanism's defaults
FP16_ONNX = (Mechanism.fp16_onnx, Mechanism.strongly_typed)  # the precision mechanisms that build or run an fp16 ONNX


def cell_of(cfg: RunConfig, backend: str, mechanism: str | None) -> Cell:
    """The variant's compatibility cell: model, ONNX column x build row. With no mechanism known (the backend is not
    here to say), the ONNX is named by the variant's precision."""
    build_tool = cfg.build.tool.value if backend in ENGINE_BACKENDS else backend
    onnx_precision = (cfg.precision.name if mechanism is None else Precision.fp16 if mechanism in FP16_ONNX
                      else Mechanism.qdq if mechanism == Mechanism.qdq else Precision.fp32).value
    onnx = OnnxVariant(cfg.export.tool.value, (cfg.export.shape or cfg.shape.mode).value, onnx_precision,
                       cfg.export.head.value, **int8_settings(cfg, mechanism, Mechanism.qdq))
    build = BuildVariant(build_tool, cfg.shape.mode.value, cfg.precision.name.value, prepost_label(cfg, backend),
                         input_dtype=input_dtype(cfg, backend),
                         head_maps="head-maps" if cuts_head(cfg, backend) else "",
                         **int8_settings(cfg, mechanism, Mechanism.calibrator))  # calibrated in the build
    return Cell(onnx, build, cfg.model.label)


def input_dtype(cfg: RunConfig, backend: str) -> str:
    """The engine input's type where runner's build sets one: `fp16` or `int8`; "" for the ONNX's float32."""
    if backend not in ENGINE_BACKENDS:
        return ""
    return "int8" if cfg.backend.int8_input is True else "fp16" if cfg.backend.half_input is True else ""


def int8_settings(cfg: RunConfig, mechanism: str | None, where: Mechanism) -> dict[str, str]:
    """The calibrator, and the int8 settings that differ from the shipped preset of the mechanism (`INT8_PRESETS`),
    as `OnnxVariant`/`BuildVariant` fields: for the part the `where` mechanism makes; none for the other part."""
    if mechanism != where:
        return {}
    p, shipped = cfg.precision, shipped_precision(INT8_PRESETS[where])
    differs = {**{key: sorted(getattr(p, key)) != sorted(getattr(shipped, key)) and json.dumps(list(getattr(p, key)))
                  for key in ("keep_float", *PIN_KEYS)},  # pattern lists, as JSON
               "qdq_ops": where == Mechanism.qdq and sorted(p.qdq_ops) != sorted(shipped.qdq_ops)
               and "+".join(p.qdq_ops),
               "calibration_images": p.calibration_images != shipped.calibration_images and str(p.calibration_images),
               "calibration_source": p.calibration_source != shipped.calibration_source and p.calibration_source,
               **{key: getattr(p, key) != getattr(shipped, key) and getattr(p, key).value  # refused where the
                  for key in QDQ_PLACEMENT}}  # mechanism lacks them (`config.calibrator_refusal`)
    return {"calibrator": p.calibrator.value, **{key: value or "" for key, value in differs.items()}}


def prepost_label(cfg: RunConfig, backend: str) -> str:
    """The build row's chain part: the peer's `predict`, and which ends run on the GPU (the peer skips those)."""
    ends = (("pre", cfg.preprocess.device), ("post", cfg.postprocess.device))
    parts = [PEER_PIPELINE] if backend == BackendName.ultralytics else []
    return " ".join(parts + [f"gpu-{end}" for end, device in ends if device == Device.gpu])


def new_result(cfg: RunConfig, backend: str, mechanism: str | None, status: str = "running",
               resolved: Resolved | None = None) -> VariantResult:
    """A result with no stage run yet: what a skipped variant, or a crash before any stage, reports. `cfg` as
    `resolved` on the backend (`backends.resolve_auto`), where it is known."""
    return VariantResult(cell=cell_of(cfg, backend, mechanism), backend=backend, profile=cfg.profile.name,
                         status=status, resolved=resolved)


class StageClock:
    """Wall time per stage into `result.timings`; tells the parent process which stage runs."""

    def __init__(self, result: VariantResult, stage_started):
        self.result, self.stage_started = result, stage_started
        self.stage, self.start = "start", time.perf_counter()

    def enter(self, stage: str) -> None:
        now = time.perf_counter()
        if self.stage != "start":
            self.result.timings[self.stage] = now - self.start
        self.stage, self.start = stage, now
        if stage != "done":
            self.stage_started(stage)


def run_variant(cfg: RunConfig, backend_name: str, stage_started=lambda stage: None,
                publish=lambda result: None) -> VariantResult:
    """Run every stage of one variant, its `auto` settings resolved on the backend. `publish` receives the partial
    result after each stage."""
    backend = backends.get(backend_name)
    cfg, resolved = backends.resolve_auto(cfg, backend)
    result = new_result(cfg, backend_name, None, resolved=resolved)
    result.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result.environment = environment(cfg.export.opset)
    clock = StageClock(result, stage_started)
    try:
        clock.enter("export")
        mechanism = backend.precision_mechanism(cfg)
        result.cell = cell_of(cfg, backend_name, mechanism)
        result.export = export_stage(cfg, mechanism, backend_name, "head_maps" in resolved.auto)
        ends_at_maps = result.export.tested.head_maps is not None  # not where auto found no maps in the ONNX
        if cfg.backend.head_maps is not ends_at_maps:
            cfg = replace(cfg, backend=replace(cfg.backend, head_maps=ends_at_maps))
            resolved.head_maps, result.cell = ends_at_maps, cell_of(cfg, backend_name, mechanism)
        output_head(result.export)  # a head runner cannot decode goes no further
        publish(result)

        clock.enter("build")
        calibration = calibration_set(cfg) if mechanism == Mechanism.calibrator else None
        result.build = backend.build(cfg, result.export, calibration)
        cfg = input_as_built(cfg, resolved, result.build)
        result.cell = cell_of(cfg, backend_name, mechanism)
        runner = backend.runner(cfg, result.build)
        try:
            runner.open()
        except Exception as exc:  # the runtime refusing what was built is its verdict
            raise StageError("build", f"{backend.name}: {type(exc).__name__}: {exc}") from exc
        publish(result)
        with runner:  # closes it
            clock.enter("validate")
            samples, selection = validation_data(cfg, result.export)
            chain = prepost.chain(runner, cfg, output_head(result.export, result.build))
            validate_stage(cfg, runner, chain, result, samples, selection)
            publish(result)
            clock.enter("bench")
            result.bench = bench(runner, chain, [s.image for s in samples], timed_shape(cfg, result.build), cfg.bench,
                                 result.build.profile, result.build.layers_path)
            check_pins(result.build, result.bench.layers)
    except StageError as exc:
        if exc.partial is not None:
            setattr(result, exc.stage, exc.partial)
        result.fail(exc.stage, exc.message)
        log.error("%s: FAILED: %s", exc.stage, result.first_error_line())
    except Exception as exc:  # a bug, not a verdict: keep the traceback
        result.fail(clock.stage, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        log.exception("%s: unexpected error", clock.stage)
    clock.enter("done")
    if result.status == "running":
        result.status = "ok"
    return result


def input_as_built(cfg: RunConfig, resolved: Resolved, build: BuildResult) -> RunConfig:
    """`cfg` (and `resolved`) with the input the engine takes: an int8 input asked for is fp16 where the input had no
    int8 range (the layers reading it kept in float; the build says so)."""
    if cfg.backend.int8_input is not True or build.input_range is not None:
        return cfg
    resolved.int8_input, resolved.half_input = False, True
    return replace(cfg, backend=replace(cfg.backend, int8_input=False, half_input=True))


def check_pins(build: BuildResult, layers: LayerProfile | None) -> None:
    """The calibration's precision pins the engine's layers do not keep, into `build.pins_ignored`; where no layer
    profile with precisions can judge them, why, into `build.pins_unchecked`. Either is said."""
    if not build.pinned:
        return
    build.pins_ignored, build.pins_unchecked = forensics.pin_verdict(build.calibration, layers)
    if said := build.pin_check_text():
        log.warning("bench: %s", said)


def export_stage(cfg: RunConfig, mechanism: str, backend: str, head_maps_auto: bool = False) -> ExportResult:
    """The fp32 reference ONNX, and the ONNX under test: the fp16 one, or the Q/DQ int8 one calibrated on the CPU,
    where the mechanism needs it; its Split->Concat copies folded where `folds` says, cut at the head's maps (before
    any Q/DQ) where `cuts_head` does: where the ONNX has none, the whole head if `backend.head_maps` came from
    `head_maps_auto`, else StageError."""
    weights = cfg.model.weights
    dynamic = (cfg.export.shape or cfg.shape.mode) == ShapeMode.dynamic
    spec = ExportSpec(weights=weights, tool=cfg.export.tool.value, dynamic=dynamic, half=False,
                      imgsz=tuple(cfg.model.imgsz), opset=cfg.export.opset, simplify=cfg.export.simplify,
                      end2end=cfg.export.head == Head.end2end, nms=cfg.export.head == Head.nms,
                      batch=1 if dynamic else cfg.shape.opt[0])  # a static ONNX at the batch it is built for
    cache_dir = Path(cfg.cache_dir)
    reference = export_onnx(spec, cache_dir)
    tested = export_onnx(replace(spec, half=True), cache_dir) if mechanism in FP16_ONNX else reference
    tested, folded = folded_onnx(tested, cache_dir) if folds(cfg, backend) else (tested, None)
    if cuts_head(cfg, backend):
        try:
            tested = head_maps_onnx(tested, cache_dir)
        except NoHeadMaps as exc:
            if not head_maps_auto:
                raise StageError("export", f"backend.head_maps: {exc}") from None
            log.info("export: backend.head_maps=auto keeps the whole head: %s", exc)
    if mechanism == Mechanism.qdq:
        tested = quantize_variant(cfg, tested)  # Q/DQ placed on the folded graph
    return ExportResult(weights=weights, reference=reference, tested=tested, folded_splits=folded)


def folds(cfg: RunConfig, backend: str) -> bool:
    """Whether the ONNX under test gets its Split->Concat copies folded (`rewrite`): for TensorRT's API build, as
    `backend.fold_split_concat` says."""
    return cfg.backend.fold_split_concat and backend in ENGINE_BACKENDS and cfg.build.tool == BuildTool.tensorrt_api


def cuts_head(cfg: RunConfig, backend: str) -> bool:
    """Whether the engine ends at the head's maps (`rewrite`): runner's own TensorRT runner on the API build, as
    `backend.head_maps` says once resolved; the peer's predict needs the whole head."""
    return (cfg.backend.head_maps is True and backend == BackendName.tensorrt
            and cfg.build.tool == BuildTool.tensorrt_api)


def output_head(export: ExportResult, build: BuildResult | None = None) -> str:
    """The decode of the model under test (`heads.decode`): its head from the reference ONNX's metadata, its
    layout from the first output of the ONNX built (build=ultralytics makes its own) or tested. Raises StageError
    of the export stage before a build, else of validate."""
    signature = (build and build.onnx_signature) or (export.reference if export.tested.head_maps
                                                     else export.tested).signature
    metadata = heads.onnx_metadata(export.reference.path)
    if "head" not in metadata:  # a torch export cached before the exporter wrote its head: the checkpoint says it
        metadata["head"] = checkpoint.head_of(export.weights)
    try:
        return heads.decode(metadata, signature["outputs"][0], len(export.tested.names) or None)
    except heads.UnsupportedHead as exc:
        raise StageError("export" if build is None else "validate", str(exc)) from None


def timed_shape(cfg: RunConfig, build: BuildResult) -> list[int]:
    """The sweep's one timed shape (`RunConfig.timed_shape`), which the built profile must hold. Raises StageError."""
    shape, (lo, _, hi) = cfg.timed_shape, build.profile
    if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
        raise StageError("bench", f"the timed shape {shape} (bench.batch, model.imgsz) is outside the built profile "
                                  f"{lo}..{hi}")
    return shape


def validation_data(cfg: RunConfig, export: ExportResult) -> tuple[list[Sample], Selection]:
    """The images and labels validated on, each label's class id one of the model's. Raises StageError."""
    try:
        return load_samples(cfg.data.images, cfg.data.labels, cfg.data.limit, Path(cfg.outputs),
                            len(export.tested.names) or None)
    except ConfigError as exc:  # labels that do not fit the model: preflight checks the user's, not generated ones
        raise StageError("validate", str(exc)) from None


def data_notes(cfg: RunConfig, export: ExportResult, selection: Selection) -> list[str]:
    """What the data could not give a row: labels, and class names that match the model's."""
    mismatch = names_mismatch(export.tested.names, class_names(cfg.data.images, cfg.data.names))
    if mismatch:
        log.warning("data: %s", mismatch)
    return [note for note in (selection.note, mismatch) if note]


def validate_stage(cfg: RunConfig, runner, pipeline, result: VariantResult, samples: list[Sample],
                   selection: Selection) -> None:
    """Against the onnxruntime reference at every shape of the built profile. A shape that cannot run fails the
    variant at `validate`; a missed accuracy limit, at `accuracy`."""
    build, export = result.build, result.export
    is_reference = (build.tool == BackendName.onnxruntime and build.artifact == export.reference.path
                    and build.provider == REFERENCE_PROVIDER)
    reference = None if is_reference else open_reference(export.reference.path)
    try:
        shapes = shapes_to_check(build.profile, cfg.model.stride, cfg.validate.non_square, cfg.model.imgsz)
        thresholds = getattr(cfg.validate, cfg.precision.name.value)
        result.validate = validate(runner, pipeline, reference, samples, shapes, thresholds, cfg.validate,
                                   REFERENCE_PROVIDER, selection.skipped, export.tested.names,
                                   headline_shape(build.profile, cfg.model.imgsz), cfg.model.stride,
                                   data_notes(cfg, export, selection))
    finally:
        if reference is not None:
            reference.close()
    if result.validate.status == "inaccurate":  # built and ran: the table's accuracy state, naming the metric
        result.fail("accuracy", result.validate.reason)
    elif result.validate.status in ("failed", "unchecked"):
        result.fail("validate", result.validate.reason)
