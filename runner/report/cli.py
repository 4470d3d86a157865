"""`runner table|baseline|check|pick|layers`: the compatibility table of one or more sweeps, their baseline,
regressions against one, the variants that meet a budget, and two variants' engines side by side, layer by layer.

Sweeps are read from MLflow (`--sweep ID|latest`, repeatable) or from sweep folders (`--results DIR`, or
its results.json, repeatable); both give the same frame (runner.report.frame). A sweep that was killed,
or still runs, is said to be incomplete ("3 of 4 variants"); its missing cells fail `check`.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from runner.arguments import OneLineParser, bounded, positive
from runner.cache import unwritable
from runner.report import gate, layers, pick, plots, render
from runner.report.frame import (ReportError, read_results_configs, results_frame, run_settings, runs_frame, settings,
                                 told_apart_results)
from runner.results import VariantResult
from runner.tags import SWEEP, VARIANT, query

USAGE_EXIT = 2
DEFAULT_URI = "sqlite:///outputs/mlflow.db"
REPORTS = Path("outputs/reports")
REPORT_FILES = ("table.md", "table.csv", "table.html", "table.png", "latency.png")
PROBE_S = 3  # an http(s) store that does not answer within this is down: MLflow's own client retries for minutes


class Store:
    """An MLflow tracking store, read only through here: any failure to reach it is a ReportError."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise ReportError(f"no MLflow store at {uri} (run a sweep first, or pass --tracking-uri)")
        self.uri = uri
        if uri.startswith(("http://", "https://")):
            self._probe()
        self.client = MlflowClient(uri)
        found = self._call(self.client.get_experiment_by_name, experiment)
        if found is None:
            raise ReportError(f"no experiment '{experiment}' in the MLflow store {uri}")
        self.experiment, self.experiment_id = experiment, found.experiment_id

    def _probe(self) -> None:
        """Refuse within PROBE_S a server where nothing answers; any reply will do (the store has its say)."""
        try:
            urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=PROBE_S).close()
        except urllib.error.HTTPError:
            pass
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            if not isinstance(reason, ssl.SSLError):  # TLS is MLflow's to settle (MLFLOW_TRACKING_INSECURE_TLS)
                raise self._unreadable(reason) from None

    def _call(self, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:
            raise self._unreadable(exc) from None

    def _unreadable(self, why) -> ReportError:
        from runner.track import store_problem

        return ReportError(f"--tracking-uri {self.uri}: cannot read the MLflow store: {store_problem(why)}; "
                           f"start the server, or pass the right --tracking-uri")

    def search(self, query: str, **kwargs) -> list:
        return self._call(self.client.search_runs, [self.experiment_id], query, **kwargs)

    def resolve(self, sweep: str) -> str:
        """The parent run id of `sweep`: an id, or `latest` (the most recently started sweep)."""
        if not sweep.isalnum():
            raise ReportError(f"bad sweep '{sweep}': give a sweep run id, or 'latest'")
        if sweep == "latest":
            runs = self.search(query(SWEEP), order_by=["attributes.start_time DESC"],
                               max_results=1)
            if not runs:
                raise ReportError(f"no sweep in experiment '{self.experiment}'")
            return runs[0].info.run_id
        if not self.search(query(SWEEP, sweep)):
            raise ReportError(f"no sweep run '{sweep}' in experiment '{self.experiment}'")
        return sweep

    def expected(self, sweep_id: str) -> int | None:
        """How many variants the sweep was launched with (its parent run's `variants` param)."""
        value = self._call(self.client.get_run, sweep_id).data.params.get("variants")
        return int(value) if value and value.isdigit() else None

    def variant_runs(self, sweep_id: str) -> list:
        runs = self.search(query(VARIANT, sweep_id), order_by=["attributes.start_time ASC"], max_results=10000)
        if not runs:
            raise ReportError(f"sweep {sweep_id} has no variant runs")
        return runs

    def result(self, run) -> VariantResult:
        """The result a variant run holds (its result.json artifact)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self._call(self.client.download_artifacts, run.info.run_id, "result.json", tmp)
            return VariantResult.from_dict(json.loads(Path(path).read_text()))

    def log_artifacts(self, run_id: str, paths: list[Path], folder: str) -> None:
        for path in paths:
            self._call(self.client.log_artifact, run_id, str(path), folder)


@dataclass
class Source:
    """The sweeps the arguments select: their frame, a name, the store (None for files), the parent run ids,
    and a line for each sweep that lacks variants."""
    frame: pd.DataFrame
    name: str
    store: Store | None = None
    parents: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    def warn(self) -> None:
        for line in self.incomplete:
            print(f"runner: warning: {line}", file=sys.stderr)


def _incomplete(name: str, found: int, expected: int | None) -> list[str]:
    if expected is None or found >= expected:
        return []
    return [f"sweep {name} is incomplete: {found} of {expected} variants (killed, or still running)"]


def _read_folder(path: Path) -> tuple[list, list, list[str]]:
    """The results of a sweep folder (or of its results.json), their configs (None where unknown), and its
    incompleteness."""
    from runner.sweep import Sweep, SweepError, job_records

    if not path.is_dir():
        return *read_results_configs(path), []
    try:
        records, sweep = job_records(path), Sweep.read(path)
    except SweepError as exc:
        raise ReportError(str(exc)) from None
    return [r.result for r in records], [r.config for r in records], _incomplete(str(path), len(records), sweep.total)


def _read_folders(paths: list[Path]) -> tuple[list, list, list[str]]:
    """`_read_folder` of each path, joined: the results, their configs and the incompleteness lines."""
    read = [_read_folder(path) for path in paths]
    return ([r for results, _, _ in read for r in results], [c for _, configs, _ in read for c in configs],
            [line for _, _, lines in read for line in lines])


def load(args) -> Source:
    if args.results:
        results, configs, incomplete = _read_folders(args.results)
        return Source(results_frame(results, configs), _paths_name(args.results), incomplete=incomplete)
    store = Store(args.tracking_uri, args.experiment)
    ids = _sweep_ids(store, args)
    runs = {sweep_id: store.variant_runs(sweep_id) for sweep_id in ids}
    incomplete = [line for i in ids for line in _incomplete(i, len(runs[i]), store.expected(i))]
    return Source(runs_frame([run for i in ids for run in runs[i]]), _ids_name(ids), store, ids, incomplete)


def _sweep_ids(store: Store, args) -> list[str]:
    """The parent run ids of the sweeps `--sweep` names (the latest where none), each once."""
    return list(dict.fromkeys(store.resolve(s) for s in (args.sweep or ["latest"])))


def _paths_name(paths: list[Path]) -> str:
    """The sweep folders' names (of a results.json, its folder's), joined by +."""
    return "+".join((p.name if p.is_dir() else p.parent.name) or p.stem for p in paths)


def _ids_name(ids: list[str]) -> str:
    return "+".join(i[:8] if len(ids) > 1 else i for i in ids)


def writable(path: Path, option: str, folder: bool = False) -> None:
    """Refuse, before any work, an output `path` (a file, or with `folder` a folder) that cannot be made."""
    problem = unwritable(path, folder)
    if problem:
        raise ReportError(f"{option} {path}: {problem}; give a path that can be written")


def read_baseline(path: Path) -> dict[str, dict]:
    """The cells of a baseline file; ReportError where it is unreadable, holds no cells, or a cell lacks what
    `check` compares (a gate that cannot fail is no gate)."""
    again = f"record it again with `runner baseline --out {path}`"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read baseline {path}: {exc}") from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, dict) or not cells:
        raise ReportError(f"baseline {path} holds no cells, so no check could fail; {again}")
    for key, cell in cells.items():
        if problem := gate.cell_problem(cell):
            raise ReportError(f"baseline {path}: cell '{key}' {problem}; {again}")
    return cells


def write_report(frame: pd.DataFrame, out: Path, title: str) -> list[Path]:
    """table.md/.csv/.html/.png and latency.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    grids, details = render.grids(frame), render.detail(frame)
    paths = [out / name for name in REPORT_FILES]
    paths[0].write_text(f"# {title}\n\n{render.grids_markdown(grids)}\n\n{render.LEGEND}\n\n## Details\n\n"
                        f"{render.to_markdown(render.formatted(details))}\n")
    details.to_csv(paths[1], index=False)
    paths[2].write_text(render.to_html(grids, frame, title))
    plots.plot_matrix(grids, frame, paths[3], title)
    plots.plot_latency(frame, paths[4])
    return paths


def cmd_table(args) -> int:
    writable(args.out or REPORTS, "--out", folder=True)
    source = load(args)
    out = args.out or REPORTS / source.name
    paths = write_report(source.frame, out, f"Compatibility of {'sweeps' if '+' in source.name else 'sweep'} "
                                            f"{source.name}")
    for parent in source.parents:
        source.store.log_artifacts(parent, paths, "report")
    print(render.grids_markdown(render.grids(source.frame), level="#"))
    logged = f" (logged to run {', '.join(source.parents)}, artifacts report/)" if source.parents else ""
    print(f"\nrunner: report of {len(source.frame)} variants in {out}{logged}")
    source.warn()
    return 0


def cmd_baseline(args) -> int:
    writable(args.out, "--out")
    source = load(args)
    if source.incomplete:
        raise ReportError(f"{source.incomplete[0]}; a baseline needs every variant")
    baseline = {"sweep": source.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cells": gate.cells(source.frame)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"runner: baseline of {len(baseline['cells'])} cells from {source.name} -> {args.out}")
    return 0


def cmd_check(args) -> int:
    writable(args.summary, "--summary")
    baseline = read_baseline(args.baseline)
    source = load(args)
    current = gate.cells(source.frame)
    if not baseline.keys() & current.keys():
        raise ReportError(f"baseline {args.baseline} shares no cell with sweep {source.name}, so no check could "
                          f"fail; pass the sweep it was recorded from, or record it from this one with "
                          f"`runner baseline --out {args.baseline}`")
    diff = gate.compare(baseline, current, args.latency_ratio, args.map_drop, args.build_ratio, not args.no_timing)
    limits = (f"mAP50-95 drop <= {args.map_drop}, "
              + ("timing not checked" if args.no_timing else
                 f"latency <= x{args.latency_ratio}, build time <= x{args.build_ratio}"))
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(gate.check_markdown(diff, render.grids(source.frame), source.name, args.baseline, limits,
                                                source.incomplete))
    regressions, new = diff[diff["verdict"] == "REGRESSION"], diff[diff["verdict"] == gate.NEW]
    with pd.option_context("display.width", 200, "display.max_rows", None, "display.max_colwidth", 60):
        print(diff.to_string(index=False))
    print(f"\nrunner: {len(regressions)} regression(s) against {args.baseline} ({limits})"
          + (f"; {len(new)} new cell(s), not in the baseline" if len(new) else "") + f"; summary in {args.summary}")
    source.warn()
    return 1 if len(regressions) or source.incomplete else 0


def cmd_pick(args) -> int:
    writable(args.out or REPORTS, "--out", folder=True)
    source = load(args)
    choice = pick.pick(source.frame, {limit.dest: getattr(args, limit.dest) for limit in pick.LIMITS}, args.status,
                       args.by, args.timed_at)
    out = args.out or REPORTS / source.name / "pick"
    paths = pick.write(choice, out, f"Pick from {source.name}")
    for parent in source.parents:
        source.store.log_artifacts(parent, paths, "pick")
    print(f"runner: {pick.header(choice, source.name)}\n")
    with pd.option_context("display.width", 200, "display.max_rows", None):
        print(pick.table(choice.chosen).to_string(index=False) if len(choice.chosen) else "no variant qualifies")
    logged = f" (logged to run {', '.join(source.parents)}, artifacts pick/)" if source.parents else ""
    print(f"\nrunner: {choice.count_line()}; Pareto fronts in {out}{logged}")
    source.warn()
    return 0 if len(choice.chosen) else 1


def sweep_results(args) -> tuple[list, str, Store | None, list[str]]:
    """The variant results of the sweeps the arguments name, in sweep then job order, the variants of one cell told
    apart by their settings as the table shows them (`told_apart`): (results, name, store, parent runs)."""
    if args.results:
        results, configs, _ = _read_folders(args.results)
        return told_apart_results(results, [settings(c) for c in configs]), _paths_name(args.results), None, []
    store = Store(args.tracking_uri, args.experiment)
    ids = _sweep_ids(store, args)
    runs = [run for sweep_id in ids for run in store.variant_runs(sweep_id)]
    results = [store.result(run) for run in runs]
    return (told_apart_results(results, [run_settings(run.data.params) for run in runs]), _ids_name(ids), store,
            ids)


def cmd_layers(args) -> int:
    writable(args.out or REPORTS, "--out", folder=True)
    results, name, store, parents = sweep_results(args)
    chosen = [layers.select(results, selector, tag) for selector, tag in ((args.a, "A"), (args.b, "B"))]
    if chosen[0][0] == chosen[1][0]:
        raise ReportError(f"A and B both name variant #{chosen[0][0]} {chosen[0][1].cell.key}; give two variants")
    sides = [layers.side(tag, number, result) for tag, (number, result) in zip(layers.SIDES, chosen)]
    out = args.out or REPORTS / name / "layers"
    paths = layers.write(sides, out, f"Layers of sweep {name}: A against B", args.top)
    for parent in parents:
        store.log_artifacts(parent, paths, "layers")
    print(paths[0].read_text())
    logged = f" (logged to run {', '.join(parents)}, artifacts layers/)" if parents else ""
    print(f"runner: layers of #{chosen[0][0]} and #{chosen[1][0]} side by side in {out}{logged}")
    return 0


def shape(text: str) -> str:
    if not all(part.isdigit() for part in text.split("x")):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1x3x640x640")
    return text


def parser() -> argparse.ArgumentParser:
    source = OneLineParser(add_help=False)
    which = source.add_mutually_exclusive_group()
    which.add_argument("--sweep", action="append",
                       help="sweep (parent run) id, or 'latest' (the default); repeat to combine sweeps")
    which.add_argument("--results", type=Path, action="append",
                       help="a sweep folder (or its results.json) instead of MLflow; repeat to combine")
    source.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow tracking URI (default %(default)s)")
    source.add_argument("--experiment", default="runner", help="MLflow experiment (default %(default)s)")

    top = OneLineParser(prog="runner", description="Report on sweeps: table, baseline, check, pick, layers.")
    sub = top.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", parents=[source], help="compatibility table, detail table and plots")
    table.add_argument("--out", type=Path, help="output folder (default outputs/reports/<sweep>)")
    table.set_defaults(run=cmd_table)
    base = sub.add_parser("baseline", parents=[source], help="write the sweep's cells as a JSON baseline")
    base.add_argument("--out", type=Path, required=True, help="baseline JSON file to write")
    base.set_defaults(run=cmd_baseline)
    check = sub.add_parser("check", parents=[source], help="compare the sweep against a baseline; 1 on regression")
    check.add_argument("--baseline", type=Path, required=True, help="baseline JSON from `runner baseline`")
    check.add_argument("--latency-ratio", type=float, default=1.15,
                       help="max infer/e2e p50 growth (default %(default)s)")
    check.add_argument("--map-drop", type=float, default=0.02, help="max absolute mAP50-95 drop (default %(default)s)")
    check.add_argument("--build-ratio", type=float, default=2.0, help="max build time growth (default %(default)s)")
    check.add_argument("--no-timing", action="store_true", help="skip the latency and build time checks")
    check.add_argument("--summary", type=Path, default=REPORTS / "check.md", help="Markdown summary to write")
    check.set_defaults(run=cmd_check)
    choose = sub.add_parser("pick", parents=[source], help="rank the variants within a budget, draw the Pareto "
                                                           "fronts; 1 when none qualifies")
    for limit in pick.LIMITS:
        top_value = 1.0 if "map" in limit.dest else None
        choose.add_argument(limit.option, type=bounded(0.0, top_value), metavar="N",
                            help=f"{'most' if limit.upper else 'least'} {limit.heading} a variant may have")
    choose.add_argument("--status", choices=("ok", "any"), default="ok",
                        help="ok: only O and R variants qualify (the default); any: △ and X too, with their figures")
    choose.add_argument("--by", choices=tuple(pick.RANKS), default="latency", help="rank by (default %(default)s)")
    choose.add_argument("--timed-at", type=shape, metavar="SHAPE",
                        help="keep the variants timed at this shape (e.g. 1x3x640x640); needed where they differ")
    choose.add_argument("--out", type=Path, help="output folder (default outputs/reports/<sweep>/pick)")
    choose.set_defaults(run=cmd_pick)
    side = sub.add_parser("layers", parents=[source], help="two variants' engines side by side, layer by layer: "
                                                           "time by precision and layer type, reformats, slowest")
    side.add_argument("a", metavar="A", help="a variant: a piece of its cell (model | onnx | build), or its number")
    side.add_argument("b", metavar="B", help="the variant to set beside it, named the same way")
    side.add_argument("--top", type=positive(), default=10, metavar="N", help="slowest layers shown of each (default "
                                                                      "%(default)s)")
    side.add_argument("--out", type=Path, help="output folder (default outputs/reports/<sweep>/layers)")
    side.set_defaults(run=cmd_layers)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run `table`, `baseline`, `check`, `pick` or `layers` (argv starts with the subcommand); returns the exit
    code."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # as a sweep has it: a lost store fails in seconds
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse has printed its usage line
        return exc.code if isinstance(exc.code, int) else USAGE_EXIT
    try:
        return args.run(args)
    except ReportError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
