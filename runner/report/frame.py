"""A sweep as a table, one row per variant, from typed results (a sweep's results.json) or from MLflow runs.

Both sources give the same columns: the cell's model, fields and labels, the outcome tags, and the metrics of
`VariantResult.metrics()` under short names. The cell is stored as tags (`cell.model`, `cell.onnx.tool`, ...)
and read back as a `Cell` value: labels are shown, never parsed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from runner.results import UNNAMED_MODEL, Cell, VariantResult

SWEEP_TAG = "runner.sweep_id"
OUTCOME = ("status", "failed_stage", "error", "backend", "validation", "validation_note", "accuracy_miss")
METRICS = {"build_s": "build.build_s", "engine_mb": "build.engine_mb", "infer_p50_ms": "bench.infer.p50",
           "e2e_p50_ms": "bench.e2e.p50", "rel_l2": "val.rel_l2", "det_f1": "val.det_f1", "map50": "val.map50",
           "map50_95": "val.map50_95", "val_passed": "val.passed", "preprocess_p50_ms": "bench.preprocess.p50",
           "postprocess_p50_ms": "bench.postprocess.p50", "e2e_p90_ms": "bench.e2e.p90",
           "cuda_graph": "bench.cuda_graph", "skipped_images": "data.skipped_images",
           "h2d_p50_ms": "bench.h2d.p50", "d2h_p50_ms": "bench.d2h.p50", "img_s": "bench.throughput.opt_batch",
           "map_drop": "val.map_drop", "ref_map50_95": "val.ref_map50_95"}
COLUMNS = ["cell", "model", "onnx_label", "build_label", *OUTCOME, "note", *METRICS, "gpu"]


class ReportError(Exception):
    """A problem the user can fix (no such sweep, unreadable file, unreachable store); one line, exit 2."""


def cell_tags(cell: Cell) -> dict[str, str]:
    """The cell as MLflow tags: cell.model, cell.onnx.tool, ..., cell.onnx.head, ..., cell.build.precision."""
    return {"cell.model": cell.model, **{f"cell.{part}.{key}": value for part in ("onnx", "build")
                                         for key, value in getattr(cell, part).to_dict().items()}}


def cell_from_tags(tags: dict) -> Cell:
    parts = {part: {key[len(f"cell.{part}."):]: value for key, value in tags.items()
                    if key.startswith(f"cell.{part}.")} for part in ("onnx", "build")}
    return Cell.from_dict({"model": tags.get("cell.model", UNNAMED_MODEL), **parts})


def outcome_tags(result: VariantResult) -> dict[str, str]:
    """Status, failing stage, first error line, backend, validation verdict (and what a pass did not measure, or
    the accuracy limits missed), as tags."""
    v = result.validate
    return {"status": result.status, "failed_stage": result.failed_stage or "", "error": result.error or "",
            "backend": result.backend, "validation": v.status if v else "",
            "validation_note": (v.reason or "") if v and v.status == "passed" else "",
            "accuracy_miss": ", ".join(v.failed_metrics) if v and v.status == "inaccurate" else ""}


def _row(cell: Cell, tags: dict, metrics: dict, gpu: str | None) -> dict:
    return {"cell": cell, "model": cell.model, "onnx_label": cell.onnx.label, "build_label": cell.build.label,
            **{k: tags.get(k) or "" for k in OUTCOME},
            "note": tags.get("error") or tags.get("validation_note") or "",  # the error, or what a pass left out
            **{col: metrics.get(name, math.nan) for col, name in METRICS.items()}, "gpu": gpu or ""}


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Variants in table order: by model, ONNX column, then build row."""
    keys = [c.sort_key() for c in frame["cell"]]
    return frame.iloc[sorted(range(len(frame)), key=keys.__getitem__)].reset_index(drop=True)


def results_frame(results: list[VariantResult]) -> pd.DataFrame:
    rows = [_row(r.cell, outcome_tags(r), r.metrics(), r.environment.get("gpu")) for r in results]
    return ordered(pd.DataFrame(rows, columns=COLUMNS))


def read_results(path: str | Path) -> list[VariantResult]:
    """The variant results of a sweep's results.json."""
    try:
        data = json.loads(Path(path).read_text())
        return [VariantResult.from_dict(r) for r in data]
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read results file {path}: {exc}") from None
    except (TypeError, KeyError, AttributeError) as exc:
        raise ReportError(f"{path} is not a list of variant results ({type(exc).__name__}: {exc})") from None


def runs_frame(runs) -> pd.DataFrame:
    """One row per MLflow variant run."""
    rows = [_row(cell_from_tags(r.data.tags), r.data.tags, r.data.metrics, r.data.params.get("env.gpu"))
            for r in runs]
    return ordered(pd.DataFrame(rows, columns=COLUMNS))
