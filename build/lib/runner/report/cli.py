"""`runner table|baseline|check`: the compatibility table of one or more sweeps, their baseline, and
regressions against one.

Sweeps are read from MLflow (`--sweep ID|latest`, repeatable) or from sweep folders' results.json
(`--results FILE`, repeatable); both give the same frame (runner.report.frame).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from runner.report import gate, plots, render
from runner.report.frame import SWEEP_TAG, ReportError, read_results, results_frame, runs_frame

USAGE_EXIT = 2
DEFAULT_URI = "sqlite:///outputs/mlflow.db"
REPORTS = Path("outputs/reports")
REPORT_FILES = ("table.md", "table.csv", "table.html", "table.png", "latency.png")


class Store:
    """An MLflow tracking store, read only through here: any failure to reach it is a ReportError."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise ReportError(f"no MLflow store at {uri} (run a sweep first, or pass --tracking-uri)")
        self.uri, self.client = uri, MlflowClient(uri)
        found = self._call(self.client.get_experiment_by_name, experiment)
        if found is None:
            raise ReportError(f"no experiment '{experiment}' in the MLflow store {uri}")
        self.experiment, self.experiment_id = experiment, found.experiment_id

    def _call(self, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        from runner.track import store_problem

        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:
            raise ReportError(f"--tracking-uri {self.uri}: cannot read the MLflow store: {store_problem(exc)}; "
                              f"start the server, or pass the right --tracking-uri") from None

    def search(self, query: str, **kwargs) -> list:
        return self._call(self.client.search_runs, [self.experiment_id], query, **kwargs)

    def resolve(self, sweep: str) -> str:
        """The parent run id of `sweep`: an id, or `latest` (the most recently started sweep)."""
        if not sweep.isalnum():
            raise ReportError(f"bad sweep '{sweep}': give a sweep run id, or 'latest'")
        if sweep == "latest":
            runs = self.search("tags.`runner.kind` = 'sweep'", order_by=["attributes.start_time DESC"],
                               max_results=1)
            if not runs:
                raise ReportError(f"no sweep in experiment '{self.experiment}'")
            return runs[0].info.run_id
        if not self.search(f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`runner.kind` = 'sweep'"):
            raise ReportError(f"no sweep run '{sweep}' in experiment '{self.experiment}'")
        return sweep

    def variant_runs(self, sweep_id: str) -> list:
        runs = self.search(f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`runner.kind` = 'variant'",
                           order_by=["attributes.start_time ASC"], max_results=10000)
        if not runs:
            raise ReportError(f"sweep {sweep_id} has no variant runs")
        return runs

    def log_artifacts(self, run_id: str, paths: list[Path], folder: str) -> None:
        for path in paths:
            self._call(self.client.log_artifact, run_id, str(path), folder)


def load(args) -> tuple[pd.DataFrame, str, Store | None, list[str]]:
    """(frame, name of the source, the store or None, parent run ids) for the sweeps the arguments select."""
    if args.results:
        results = [r for path in args.results for r in read_results(path)]
        return results_frame(results), "+".join(p.parent.name or p.stem for p in args.results), None, []
    store = Store(args.tracking_uri, args.experiment)
    ids = list(dict.fromkeys(store.resolve(s) for s in (args.sweep or ["latest"])))
    frame = runs_frame([run for sweep_id in ids for run in store.variant_runs(sweep_id)])
    return frame, "+".join(i[:8] if len(ids) > 1 else i for i in ids), store, ids


def write_report(frame: pd.DataFrame, out: Path, title: str) -> list[Path]:
    """table.md/.csv/.html/.png and latency.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    grid, details = render.matrix(frame), render.detail(frame)
    paths = [out / name for name in REPORT_FILES]
    paths[0].write_text(f"# {title}\n\n{render.to_markdown(grid.reset_index())}\n\n{render.LEGEND}\n\n"
                        f"{render.to_markdown(render.formatted(details))}\n")
    details.to_csv(paths[1], index=False)
    paths[2].write_text(render.to_html(grid, details, title))
    plots.plot_matrix(grid, frame, paths[3], title)
    plots.plot_latency(frame, paths[4])
    return paths


def cmd_table(args) -> int:
    frame, name, store, parents = load(args)
    out = args.out or REPORTS / name
    paths = write_report(frame, out, f"Compatibility of {'sweeps' if '+' in name else 'sweep'} {name}")
    for parent in parents:
        store.log_artifacts(parent, paths, "report")
    print(render.to_markdown(render.matrix(frame).reset_index()))
    logged = f" (logged to run {', '.join(parents)}, artifacts report/)" if parents else ""
    print(f"\nrunner: report of {len(frame)} variants in {out}{logged}")
    return 0


def cmd_baseline(args) -> int:
    frame, name, _, _ = load(args)
    baseline = {"sweep": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cells": gate.cells(frame)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"runner: baseline of {len(baseline['cells'])} cells from {name} -> {args.out}")
    return 0


def cmd_check(args) -> int:
    try:
        baseline = json.loads(args.baseline.read_text())["cells"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"cannot read baseline {args.baseline}: {exc}") from None
    frame, name, _, _ = load(args)
    diff = gate.compare(baseline, gate.cells(frame), args.latency_ratio, args.map_drop, args.build_ratio,
                        not args.no_timing)
    limits = (f"mAP50-95 drop <= {args.map_drop}, "
              + ("timing not checked" if args.no_timing else
                 f"latency <= x{args.latency_ratio}, build time <= x{args.build_ratio}"))
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(gate.check_markdown(diff, render.matrix(frame), name, args.baseline, limits))
    regressions = diff[diff["verdict"] == "REGRESSION"]
    with pd.option_context("display.width", 200, "display.max_rows", None, "display.max_colwidth", 60):
        print(diff.to_string(index=False))
    print(f"\nrunner: {len(regressions)} regression(s) against {args.baseline} ({limits}); summary in {args.summary}")
    return 1 if len(regressions) else 0


def parser() -> argparse.ArgumentParser:
    source = argparse.ArgumentParser(add_help=False)
    which = source.add_mutually_exclusive_group()
    which.add_argument("--sweep", action="append",
                       help="sweep (parent run) id, or 'latest' (the default); repeat to combine sweeps")
    which.add_argument("--results", type=Path, action="append",
                       help="a sweep folder's results.json instead of MLflow; repeat to combine")
    source.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow tracking URI (default {DEFAULT_URI})")
    source.add_argument("--experiment", default="runner", help="MLflow experiment (default runner)")

    top = argparse.ArgumentParser(prog="runner", description="Report on sweeps: table, baseline, check.")
    sub = top.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", parents=[source], help="compatibility table, detail table and plots")
    table.add_argument("--out", type=Path, help="output folder (default outputs/reports/<sweep>)")
    table.set_defaults(run=cmd_table)
    base = sub.add_parser("baseline", parents=[source], help="write the sweep's cells as a JSON baseline")
    base.add_argument("--out", type=Path, required=True, help="baseline JSON file to write")
    base.set_defaults(run=cmd_baseline)
    check = sub.add_parser("check", parents=[source], help="compare the sweep against a baseline; 1 on regression")
    check.add_argument("--baseline", type=Path, required=True, help="baseline JSON from `runner baseline`")
    check.add_argument("--latency-ratio", type=float, default=1.15, help="max infer/e2e p50 growth (default 1.15)")
    check.add_argument("--map-drop", type=float, default=0.02, help="max absolute mAP50-95 drop (default 0.02)")
    check.add_argument("--build-ratio", type=float, default=2.0, help="max build time growth (default 2.0)")
    check.add_argument("--no-timing", action="store_true", help="skip the latency and build time checks")
    check.add_argument("--summary", type=Path, default=REPORTS / "check.md", help="Markdown summary to write")
    check.set_defaults(run=cmd_check)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run `table`, `baseline` or `check` (argv starts with the subcommand); returns the exit code."""
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse has printed its usage line
        return exc.code if isinstance(exc.code, int) else USAGE_EXIT
    try:
        return args.run(args)
    except ReportError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
