"""The end of a sweep, read from its job folders: the terminal table, `summary.csv`, `results.json`, the parent
run closed with its counts. Whatever ran the jobs, this reads only the files they left.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from runner.parent import end_parent
from runner.report.frame import results_frame
from runner.report.render import summary
from runner.results import VariantResult
from runner.sweep import Sweep, job_records

LOST_EXIT = 1  # a variant has no result, or a result is not in MLflow


def summary_table(results: list[VariantResult], configs: list[dict] | None = None) -> pd.DataFrame:
    return summary(results_frame(results, configs))


def finish_sweep(sweep: Sweep) -> int:
    """Summarise a sweep from its job folders: terminal table, summary.csv, results.json, the parent run.
    Returns the exit code: 0 when every variant has a result, else LOST_EXIT."""
    records = job_records(sweep.folder)
    table = summary_table([r.result for r in records], [r.config for r in records])
    files = [sweep.folder / "summary.csv", sweep.folder / "results.json"]
    table.to_csv(files[0], index=False)
    files[1].write_text(json.dumps([{**r.result.to_dict(), "mlflow_run_id": r.mlflow_run_id, "config": r.config}
                                    for r in records], indent=1, default=str))
    tracked = bool(sweep.tracking and sweep.parent_run_id)
    problem = end_parent(sweep, [r.result for r in records], files) if tracked else None
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print("\n" + table.to_string(index=False) if len(table) else "no variant ran", flush=True)
    ok = sum(r.result.status == "ok" for r in records)
    parent = f"; sweep run {sweep.parent_run_id}" if sweep.parent_run_id else ""
    print(f"\nrunner: {ok}/{len(records)} variants ok{parent}; summary in {shown(sweep.folder)}", flush=True)
    unlogged = sum(not r.logged for r in records) if tracked else 0
    if problem or unlogged:
        print(f"runner: {unlogged} result(s) not yet in MLflow ({problem or 'see the jobs log'}); once the store is "
              f"back: runner sync --sweep {shown(sweep.folder)}", flush=True)
    if len(records) < sweep.total:
        print(f"runner: incomplete sweep: {len(records)} of {sweep.total} variants have a result; run the rest "
              f"with the same command and resume={shown(sweep.folder)}", flush=True)
        return LOST_EXIT
    return 0


def shown(path: Path) -> Path:
    """`path` relative to the working directory where it lies below it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
