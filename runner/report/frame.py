"""A sweep as a table, one row per variant, from typed results (a sweep's results.json) or from MLflow runs.

Both sources give the same columns: the cell's model, fields and labels, what its `auto` settings became (`AUTO`:
the label names the GPU ends that ran, this says which came from `auto`), the outcome tags, the cell's mark
(O, △, X, R or -), the shapes the figures were measured at (`SHAPES`: a timing is per batch of the timed shape's
first dim; mAP50-95 is at the static variant's shape, its worst shape beside it), and the numbers of `METRICS`,
each under its one frame column. The cell is read back from its tags (`runner.tags`) as a `Cell` value: labels
are shown, never parsed. Variants of one cell whose configs differ are told apart on their build row by the settings
that differ (`told_apart`), so no row hides another.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from runner.report.order import cell_key
from runner.results import Cell, VariantResult
from runner.sweep import NOT_IDENTITY
from runner.tags import AUTO, OUTCOME, SHAPES, auto_tags, cell_from_tags, outcome_tags, shape_tags


@dataclass(frozen=True)
class Metric:
    """A number of the report: its name in `VariantResult.metrics()` (and MLflow), its frame column (and baseline
    key), and where the details table shows it, its heading (name and unit) and format."""
    key: str
    column: str
    name: str = ""  # "": not in the details table
    unit: str = ""
    format: str = ""

    @property
    def heading(self) -> str:
        return f"{self.name} {self.unit}".strip()


METRICS = (  # the details table's numbers first, in its order
    Metric("build.build_s", "build_s", "build", "s", "{:.1f}"),
    Metric("build.engine_mb", "engine_mb", "engine", "MB", "{:.1f}"),
    Metric("bench.preprocess.p50", "preprocess_p50_ms", "pre p50", "ms", "{:.2f}"),
    Metric("bench.infer.p50", "infer_p50_ms", "infer p50", "ms", "{:.2f}"),
    Metric("bench.postprocess.p50", "postprocess_p50_ms", "post p50", "ms", "{:.2f}"),
    Metric("bench.e2e.p50", "e2e_p50_ms", "e2e p50", "ms", "{:.2f}"),
    Metric("bench.per_image.infer_p50_ms", "infer_ms_per_img", "infer p50/img", "ms", "{:.2f}"),
    Metric("bench.per_image.e2e_p50_ms", "e2e_ms_per_img", "e2e p50/img", "ms", "{:.2f}"),
    Metric("bench.per_image.e2e_img_s", "e2e_img_s", "e2e img/s", "", "{:.1f}"),
    Metric("bench.throughput.opt_batch", "img_s", "img/s", "", "{:.0f}"),
    Metric("bench.offline.e2e_img_s", "offline_e2e_img_s", "offline e2e img/s", "", "{:.0f}"),
    Metric("bench.offline.engine_img_s", "offline_engine_img_s", "offline engine img/s", "", "{:.0f}"),
    Metric("bench.offline.best_batch", "offline_batch", "offline batch", "", "{:.0f}"),
    Metric("layers.total_ms", "layers_ms", "layers profiled", "ms", "{:.2f}"),
    Metric("layers.reformat_ms", "reformat_ms", "reformats", "ms", "{:.3f}"),
    Metric("layers.reformats", "reformats", "reformat layers", "", "{:.0f}"),
    Metric("val.rel_l2", "rel_l2", "rel-L2", "", "{:.2e}"),
    Metric("val.det_f1", "det_f1", "detection F1", "", "{:.3f}"),
    Metric("val.map50_95", "map50_95", "mAP50-95", "", "{:.3f}"),
    Metric("val.map50_95_worst", "map50_95_worst", "mAP50-95 worst", "", "{:.3f}"),
    Metric("val.map_drop", "map_drop", "mAP drop", "", "{:.3f}"),
    Metric("val.map50", "map50"),
    Metric("val.passed", "val_passed"),
    Metric("val.ref_map50_95", "ref_map50_95"),
    Metric("bench.e2e.p90", "e2e_p90_ms"),
    Metric("bench.h2d.p50", "h2d_p50_ms"),
    Metric("bench.d2h.p50", "d2h_p50_ms"),
    Metric("bench.cuda_graph", "cuda_graph"),
    Metric("data.skipped_images", "skipped_images"),
    Metric("bench.batch", "batch"),
)
MARKS = {"ok": "O", "failed": "X", "skipped": "-"}
INACCURATE = "△"  # built and ran, but missed an accuracy limit, some shapes of its profile were not validated, or
#   TensorRT ignored some of its precision pins or they were not checked
REFERENCE = "R"  # ran, and the model under test is the reference itself
WHY_MARKS = (MARKS["failed"], INACCURATE)  # the marks shown with why: the failing stage, or the metric missed
NOT_SETTINGS = (*NOT_IDENTITY, "outputs", "cache_dir")  # where a variant ran and was logged, not what it measured
RUN_PARAMS = ("env", "resolved")  # a variant run's params beside its config
COLUMNS = ["cell", "model", "onnx_label", "build_label", AUTO, *OUTCOME, "mark", "note", *SHAPES,
           *(m.column for m in METRICS), "gpu"]


class ReportError(Exception):
    """A problem the user can fix (no such sweep, unreadable file, unreachable store); one line, exit 2."""


def mark(status: str, validation: str, failed_stage: str, unvalidated: str = "", pin_check: str = "") -> str:
    """A cell's mark in the grids: O ran and passed, △ missed an accuracy limit, ran with `unvalidated` shapes
    (partly checked) or with a `pin_check` note (pins TensorRT ignored, or pins not checked), X failed, R is the
    reference, - skipped."""
    if status == "failed" and failed_stage == "accuracy" or status == "ok" and (unvalidated or pin_check):
        return INACCURATE
    return REFERENCE if status == "ok" and validation == "reference" else MARKS.get(status, "-")


def _row(cell, tags: dict, metrics: dict, gpu: str | None) -> dict:
    outcome = {k: tags.get(k) or "" for k in OUTCOME}
    return {"cell": cell, "model": cell.model, "onnx_label": cell.onnx.label, "build_label": cell.build.label,
            AUTO: tags.get(AUTO) or "", **outcome, "mark": mark(outcome["status"], outcome["validation"],
                                                                outcome["failed_stage"], outcome["unvalidated_shapes"],
                                                                outcome["pin_check"]),
            "note": tags.get("error") or tags.get("pin_check") or tags.get("validation_note") or "",
            **{k: tags.get(k) or "" for k in SHAPES},
            **{m.column: metrics.get(m.key, math.nan) for m in METRICS}, "gpu": gpu or ""}


def settings(config: dict | None) -> dict[str, str] | None:
    """A variant's config as MLflow's params hold it (`key.sub: text`), less where and how it ran and was logged
    (`NOT_SETTINGS`); None where its config is unknown."""
    if config is None:
        return None
    from runner.track import flatten  # imports MLflow: only where a config is given

    return {key: str(value) for key, value in flatten(config).items() if key.split(".")[0] not in NOT_SETTINGS}


def run_settings(params: dict[str, str]) -> dict[str, str]:
    """The config part of a variant run's params (`runner.track` adds `env.*` and `resolved.*` beside it)."""
    return {key: value for key, value in params.items()
            if key.split(".")[0] not in (*NOT_SETTINGS, *RUN_PARAMS)}


def told_apart(cells: list[Cell], configs: list[dict[str, str] | None]) -> list[Cell]:
    """Each cell, where others share its key but their configs differ, with the settings that differ named on its build
    row (`BuildVariant.setting`: `backend.builder_optimization_level=3`; a config group whose name differs, as
    `profile=batch`). Cells whose configs are unknown or the same keep their key."""
    groups: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault(cell.key, []).append(i)
    out = list(cells)
    for rows in groups.values():
        known = [configs[i] for i in rows]
        if len(rows) < 2 or None in known:
            continue
        differing = sorted(k for k in set().union(*known) if len({c.get(k, "") for c in known}) > 1)
        named = {k.rsplit(".", 1)[0] for k in differing if k.endswith(".name")}  # a group's name stands for it
        shown = [k for k in differing if k.rsplit(".", 1)[0] not in named or k.endswith(".name")]
        for i in rows:
            text = ", ".join(f"{k.removesuffix('.name')}={configs[i].get(k, '')}" for k in shown)
            out[i] = replace(cells[i], build=replace(cells[i].build, setting=text))
    return out


def told_apart_results(results: list[VariantResult], known: list[dict[str, str] | None]) -> list[VariantResult]:
    """`results` with their cells as `told_apart` names them by `known`, each one's settings."""
    cells = told_apart([r.cell for r in results], known)
    return [replace(r, cell=cell) for r, cell in zip(results, cells)]


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Variants in table order: by model, ONNX column, then build row."""
    keys = [cell_key(c) for c in frame["cell"]]
    return frame.iloc[sorted(range(len(frame)), key=keys.__getitem__)].reset_index(drop=True)


def results_frame(results: list[VariantResult], configs: list[dict | None] | None = None) -> pd.DataFrame:
    """One row per variant result; `configs`, each result's config where known, tell apart the variants of one
    cell (`told_apart`)."""
    known = [settings(c) for c in configs] if configs is not None else [None] * len(results)
    rows = [_row(r.cell, {**outcome_tags(r), **shape_tags(r), **auto_tags(r)}, r.metrics(), r.environment.get("gpu"))
            for r in told_apart_results(results, known)]
    return ordered(pd.DataFrame(rows, columns=COLUMNS))


def read_results(path: str | Path) -> list[VariantResult]:
    """The variant results of a sweep's results.json."""
    return read_results_configs(path)[0]


def read_results_configs(path: str | Path) -> tuple[list[VariantResult], list[dict | None]]:
    """The variant results of a sweep's results.json, and each one's config (None where the file has none)."""
    try:
        data = json.loads(Path(path).read_text())
        return [VariantResult.from_dict(r) for r in data], [r.get("config") for r in data]
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read results file {path}: {exc}") from None
    except (TypeError, KeyError, AttributeError) as exc:
        raise ReportError(f"{path} is not a list of variant results ({type(exc).__name__}: {exc})") from None


def runs_frame(runs) -> pd.DataFrame:
    """One row per MLflow variant run; the variants of one cell told apart by their config params (`told_apart`)."""
    cells = told_apart([_run_cell(r) for r in runs], [run_settings(r.data.params) for r in runs])
    rows = [_row(cell, r.data.tags, r.data.metrics, r.data.params.get("env.gpu")) for cell, r in zip(cells, runs)]
    return ordered(pd.DataFrame(rows, columns=COLUMNS))


def _run_cell(run):
    try:
        return cell_from_tags(run.data.tags)
    except (KeyError, TypeError) as exc:
        raise ReportError(f"run {run.info.run_id} lacks the cell tags of a variant run ({exc})") from None
