"""The regression gate: a sweep's cells as a baseline, and a current sweep checked against one.

A cell regresses when it goes O -> X or △, its validation goes passed -> inaccurate or failed, its mAP50-95 (at
the static variant's shape) or its worst shape's mAP50-95 drops by more than `map_drop`, its infer or end-to-end p50
grows by more than `latency_ratio`, or its build takes more than `build_ratio` as long, or it lacks a metric the
baseline has (`missing`: not measured, or not logged), or is another variant under the baseline's label (its int8
settings differ where the label shows only their count, `variant`). A cell the baseline lacks is `new`, listed apart. A
`reference` cell (the model under test is the reference) has no validation that could fail, so its validation is
listed but never compared.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from runner.report.frame import WHY_MARKS, ReportError, mark
from runner.report.render import grids_markdown, to_markdown
from runner.results import Cell

MIN_BUILD_S = 1.0  # shorter baseline builds are cache hits: not compared
COMPARABLE_VALIDATION = ("passed", "inaccurate", "failed")
MISSING = "missing"  # a cell, or a metric, the baseline has and the sweep lacks
NEW = "new"  # the verdict of a cell the baseline lacks
NUMBERS = ("map50_95", "map50_95_worst", "infer_p50_ms", "e2e_p50_ms", "build_s")  # a cell's measures, or null
MAPS = {"map50_95": "mAP50-95", "map50_95_worst": "mAP50-95 worst"}  # at the static variant's shape; at the worst one


def _number(value) -> float | None:
    return None if pd.isna(value) else float(value)


def cells(frame: pd.DataFrame) -> dict[str, dict]:
    """What `check` compares, per cell key "<model> | <onnx label> | <build label>". ReportError where variants share
    a key their configs do not tell apart (`frame.told_apart`): a check would compare one of them, unsaid."""
    keys = frame["cell"].map(lambda c: c.key)
    if keys.duplicated().any():
        twice = keys[keys.duplicated()].iloc[0]
        raise ReportError(f"cell '{twice}' holds {(keys == twice).sum()} variants whose recorded configs do not tell "
                          f"them apart (one variant in two sweeps, or a results.json without configs); give one "
                          f"sweep, or its sweep folder")
    return {r.cell.key: {"cell": r.cell.to_dict(), "status": r.status, "failed_stage": r.failed_stage,
                         "validation": r.validation, "unvalidated_shapes": r.unvalidated_shapes,
                         "pin_check": r.pin_check,
                         **{k: _number(getattr(r, k)) for k in NUMBERS}}
            for r in frame.itertuples(index=False)}


def cell_problem(cell) -> str | None:
    """What a baseline cell lacks for `compare` (its outcome, its cell, numbers where numbers go), or None."""
    if not isinstance(cell, dict) or not isinstance(cell.get("status"), str) or not isinstance(cell.get("cell"), dict):
        return "has no 'status' and 'cell'"
    wrong = [k for k in NUMBERS if cell.get(k) is not None and not isinstance(cell[k], (int, float))]
    return f"has {', '.join(wrong)} that is not a number" if wrong else None


def _mark(cell: dict) -> str:
    shown = mark(cell["status"], cell.get("validation") or "", cell.get("failed_stage") or "",
                 cell.get("unvalidated_shapes") or "", cell.get("pin_check") or "")
    return f"{shown} ({cell['failed_stage']})" if shown in WHY_MARKS and cell.get("failed_stage") else shown


def compare(baseline: dict[str, dict], current: dict[str, dict], latency_ratio: float, map_drop: float,
            build_ratio: float, timing: bool = True) -> pd.DataFrame:
    """One row per compared (cell, metric): baseline, current and verdict (REGRESSION | ok | new | not compared)."""
    rows = []

    def add(cell, metric, before, after, regressed, verdict="ok"):
        rows.append({"cell": cell, "metric": metric, "baseline": before, "current": after,
                     "verdict": "REGRESSION" if regressed else verdict})

    def ratio(cell, metric, before, after, limit, unit):
        if before is not None:
            add(cell, metric, f"{before:.2f}{unit}", MISSING if after is None else
                f"{after:.2f}{unit} (x{after / before:.2f})", after is None or after > before * limit)

    for cell, old in baseline.items():
        new = current.get(cell)
        if new is None:
            add(cell, "cell", _mark(old), MISSING, True)
            continue
        if Cell.from_dict(old["cell"]) != Cell.from_dict(new["cell"]):  # one label, other settings: not comparable
            add(cell, "variant", "the baseline's", "another, of other int8 settings", True)
            continue
        partly = any(not old.get(k) and bool(new.get(k)) for k in ("unvalidated_shapes", "pin_check"))  # O -> △
        add(cell, "status", _mark(old), _mark(new), old["status"] == "ok" and (new["status"] != "ok" or partly))
        before, after = old.get("validation") or "", new.get("validation") or ""
        if before in COMPARABLE_VALIDATION and after in COMPARABLE_VALIDATION:
            add(cell, "validation", before, after, before == "passed" and after != "passed")
        elif before or after:
            add(cell, "validation", before or "-", after or "-", False, "not compared (no validation that can fail)")
        for key, name in MAPS.items():
            if old.get(key) is not None:
                now = new[key]
                add(cell, name, f"{old[key]:.3f}", MISSING if now is None else f"{now:.3f}",
                    now is None or old[key] - now > map_drop)
        if timing:
            ratio(cell, "infer p50", old.get("infer_p50_ms"), new["infer_p50_ms"], latency_ratio, " ms")
            ratio(cell, "e2e p50", old.get("e2e_p50_ms"), new["e2e_p50_ms"], latency_ratio, " ms")
            if (old.get("build_s") or 0.0) >= MIN_BUILD_S:
                ratio(cell, "build time", old["build_s"], new["build_s"], build_ratio, " s")
    for cell in sorted(current.keys() - baseline.keys()):
        add(cell, "cell", "absent", _mark(current[cell]), False, NEW)
    diff = pd.DataFrame(rows, columns=["cell", "metric", "baseline", "current", "verdict"])
    return diff.sort_values("verdict", key=lambda v: v != "REGRESSION", kind="stable").reset_index(drop=True)


def check_markdown(diff: pd.DataFrame, grids: dict[str, pd.DataFrame], sweep: str, baseline_file: Path, limits: str,
                   incomplete: list[str] = ()) -> str:
    """The check as a CI job summary: verdict, regressions, new cells, the current grids, and every comparison."""
    regressions, new = diff[diff["verdict"] == "REGRESSION"], diff[diff["verdict"] == NEW]
    head = (f"## runner check: FAILED, {len(regressions)} regression(s) in {regressions['cell'].nunique()} cell(s)"
            if len(regressions) else "## runner check: FAILED, incomplete sweep" if incomplete
            else "## runner check: passed, no regression")
    parts = [head + (f"; {len(new)} new cell(s)" if len(new) else ""), *incomplete,
             f"Sweep `{sweep}` against baseline `{baseline_file}`. Limits: {limits}."]
    if len(regressions):
        parts += ["### Regressions", to_markdown(regressions)]
    if len(new):
        parts += ["### New cells (not in the baseline, so not checked)", to_markdown(new)]
    parts += ["### Compatibility", grids_markdown(grids, level="####"),
              f"<details><summary>All {len(diff)} comparisons</summary>\n\n{to_markdown(diff)}\n\n</details>"]
    return "\n\n".join(parts) + "\n"
