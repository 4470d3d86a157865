"""`runner table|baseline|check`: the compatibility table of a sweep, its baseline, and regressions against one.

A sweep is read from MLflow (`--sweep ID|latest`) or from a sweep's results.json (`--results FILE`); both
loaders give the same frame, one row per variant, with the metric names of `runner.track.variant_metrics`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure  # no pyplot: figures render with Agg, no global state

from runner.track import SWEEP_TAG, variant_metrics

USAGE_EXIT = 2
DEFAULT_URI = "sqlite:///outputs/mlflow.db"
REPORTS = Path("outputs/reports")
TAGS = ("onnx_label", "build_label", "status", "failed_stage", "error", "backend")
METRICS = {"build_s": "build.build_s", "infer_p50_ms": "bench.infer.p50", "e2e_p50_ms": "bench.e2e.p50",
           "rel_l2": "val.rel_l2", "det_f1": "val.det_f1", "map50_95": "val.map50_95", "val_passed": "val.passed",
           "preprocess_p50_ms": "bench.preprocess.p50", "postprocess_p50_ms": "bench.postprocess.p50",
           "e2e_p90_ms": "bench.e2e.p90", "cuda_graph": "bench.cuda_graph"}
MARKS = {"ok": "O", "failed": "X", "skipped": "-"}
SEVERITY = "-OX"  # a cell run twice (e.g. two profiles) shows its worst outcome
COLOURS = {"O": "#2e7d32", "X": "#c62828", "-": "#bdbdbd"}
RANK = {"ul": 0, "tc": 1, "st": 0, "dy": 1, "fp32": 0, "fp16": 1}
DETAIL = {"onnx_label": "onnx", "build_label": "build", "status": "status", "failed_stage": "failing stage",
          "error": "error", "build_s": "build s", "infer_p50_ms": "infer p50 ms", "rel_l2": "rel-L2",
          "det_f1": "detection F1", "map50_95": "mAP50-95"}
FORMATS = {"build s": "{:.1f}", "infer p50 ms": "{:.2f}", "rel-L2": "{:.2e}", "detection F1": "{:.3f}",
           "mAP50-95": "{:.3f}"}
REPORT_FILES = ("table.md", "table.csv", "table.html", "table.png", "latency.png")
MIN_BUILD_S = 1.0  # shorter baseline builds are cache hits: not compared


class ReportError(Exception):
    """A problem the user can fix (no such sweep, unreadable file); printed as one line, exit 2."""


# ---------------------------------------------------------------- loading


def _row(tags: dict, metrics: dict, gpu: str) -> dict:
    return {**{k: tags.get(k) or "" for k in TAGS},
            **{col: metrics.get(name, math.nan) for col, name in METRICS.items()}, "gpu": gpu or ""}


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*TAGS, *METRICS, "gpu"])


def results_frame(path: str | Path) -> pd.DataFrame:
    """One row per variant from a sweep's results.json (a list of variant result dicts)."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read results file {path}: {exc}") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "status" in r for r in results):
        raise ReportError(f"{path} is not a list of variant results")
    return _frame([_row(r, variant_metrics(r), r.get("environment", {}).get("gpu")) for r in results])


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(f"no MLflow store at {tracking_uri} (run a sweep first, or pass --tracking-uri)")
    return MlflowClient(tracking_uri)


def _experiment_id(client, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no experiment '{experiment}' in the MLflow store")
    return found.experiment_id


def resolve_sweep(tracking_uri: str, experiment: str, sweep: str) -> str:
    """The parent run id of `sweep`: an id, or `latest` (the most recently started sweep)."""
    if not sweep.isalnum():
        raise ReportError(f"bad sweep '{sweep}': give a sweep run id, or 'latest'")
    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    if sweep == "latest":
        runs = client.search_runs([experiment_id], "tags.`runner.kind` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ReportError(f"no sweep in experiment '{experiment}'")
        return runs[0].info.run_id
    runs = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`runner.kind` = 'sweep'")
    if not runs:
        raise ReportError(f"no sweep run '{sweep}' in experiment '{experiment}'")
    return sweep


def runs_frame(tracking_uri: str, experiment: str, sweep_id: str) -> pd.DataFrame:
    """One row per variant (child run) of the sweep `sweep_id` (resolved by `resolve_sweep`) in MLflow."""
    client = _client(tracking_uri)
    runs = client.search_runs([_experiment_id(client, experiment)],
                              f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`runner.kind` = 'variant'",
                              order_by=["attributes.start_time ASC"], max_results=10000)
    if not runs:
        raise ReportError(f"sweep {sweep_id} has no variant runs")
    return _frame([_row(r.data.tags, r.data.metrics, r.data.params.get("env.gpu")) for r in runs])


# ---------------------------------------------------------------- tables


def onnx_key(label: str) -> tuple:
    """Column order: ul before tc, then fp32 before fp16, then st before dy."""
    words = label.split()
    if len(words) != 3:
        return (9, 9, 9, label)
    tool, shape, precision = words
    return (RANK.get(tool, 9), RANK.get(precision, 9), RANK.get(shape, 9), label)


def build_key(label: str) -> tuple:
    """Row order: TensorRT before onnxruntime ("ort ..."), then st fp32, dy fp32, st fp16, dy fp16."""
    words = label.split()
    ort = bool(words) and words[0] == "ort"
    shape, precision = (words[-2:] if len(words) >= 2 else ("", ""))
    return (ort, RANK.get(precision, 9), RANK.get(shape, 9), label)


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Variants in table order: by ONNX column, then by build row."""
    keys = [(onnx_key(o), build_key(b)) for o, b in zip(frame["onnx_label"], frame["build_label"])]
    return frame.iloc[sorted(range(len(frame)), key=keys.__getitem__)].reset_index(drop=True)


def corner(frame: pd.DataFrame) -> str:
    return "onnx\\trt" if set(frame["backend"]) == {"tensorrt"} else "onnx\\build"


def matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """The O/X/- compatibility matrix: rows = builds, columns = ONNX variants."""
    marks = frame.assign(mark=frame["status"].map(MARKS).fillna("-"))
    grid = marks.pivot_table(index="build_label", columns="onnx_label", values="mark",
                             aggfunc=lambda m: max(m, key=SEVERITY.index))
    grid = grid.reindex(index=sorted(grid.index, key=build_key), columns=sorted(grid.columns, key=onnx_key))
    grid = grid.fillna("-")
    grid.index.name, grid.columns.name = corner(frame), None
    return grid


def first_line(text: str, width: int = 120) -> str:
    line = text.strip().splitlines()[0] if text and text.strip() else ""
    return line if len(line) <= width else line[:width - 1] + "…"


def detail(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: outcome, failing stage, first error line and the key metrics."""
    table = ordered(frame)[list(DETAIL)].rename(columns=DETAIL)
    table["error"] = table["error"].map(first_line)
    return table


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """Numbers as text for reading; a missing value is blank."""
    return table.assign(**{col: table[col].map(lambda v, f=f: "" if pd.isna(v) else f.format(v))
                           for col, f in FORMATS.items() if col in table})


def to_markdown(table: pd.DataFrame) -> str:
    def line(cells) -> str:
        return "|" + "|".join(str(c).replace("|", "\\|") for c in cells) + "|"
    return "\n".join([line(table.columns), line(["---"] * len(table.columns)),
                      *(line(row) for row in table.itertuples(index=False))])


def to_html(grid: pd.DataFrame, details: pd.DataFrame, title: str) -> str:
    def paint(mark: str) -> str:
        colour = COLOURS.get(mark)
        return f"background-color: {colour}; color: white; font-weight: bold" if mark in "OX" and colour else ""
    grid_html = (grid.reset_index().style.hide(axis="index").format(escape="html")
                 .map(paint, subset=list(grid.columns)).to_html())
    detail_html = (formatted(details).style.hide(axis="index").format(escape="html")
                   .map(lambda s: paint(MARKS.get(s, "")), subset=["status"]).to_html())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>{0}</title><style>"
            "body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:2em}}"
            "th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}} th{{background:#f3f3f3}}"
            "</style></head><body><h1>{0}</h1><h2>Compatibility</h2>{1}<h2>Details</h2>{2}</body></html>"
            ).format(title, grid_html, detail_html)


# ---------------------------------------------------------------- pictures


def plot_matrix(grid: pd.DataFrame, frame: pd.DataFrame, path: Path, title: str) -> None:
    """Heatmap of the O/X matrix: green O, red X (with its failing stage), grey -."""
    failed = frame[frame["status"] == "failed"]
    stage_of = dict(zip(zip(failed["build_label"], failed["onnx_label"]), failed["failed_stage"]))
    rows, cols = len(grid.index), len(grid.columns)
    fig = Figure(figsize=(1.5 + 1.3 * cols, 1.5 + 0.7 * rows))
    ax = fig.subplots()
    ax.imshow(grid.map(SEVERITY.index).to_numpy(), cmap=ListedColormap([COLOURS[m] for m in SEVERITY]),
              vmin=0, vmax=2, aspect="auto")
    for i, build in enumerate(grid.index):
        for j, onnx in enumerate(grid.columns):
            mark = grid.iat[i, j]
            text = f"X\n{stage_of.get((build, onnx)) or '?'}" if mark == "X" else mark
            ax.text(j, i, text, ha="center", va="center", fontsize=10, fontweight="bold",
                    color="black" if mark == "-" else "white")
    ax.set_xticks(range(cols), grid.columns)
    ax.set_yticks(range(rows), grid.index)
    ax.xaxis.tick_top()
    ax.set_xlabel("ONNX variant")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("build")
    ax.set_xticks([x - 0.5 for x in range(1, cols)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, rows)], minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, pad=12, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_latency(frame: pd.DataFrame, path: Path) -> None:
    """Stacked p50 preprocess / infer / postprocess per benchmarked variant, with the e2e p50 -> p90 whisker."""
    bench = ordered(frame).dropna(subset=["infer_p50_ms"])
    backends = ", ".join(sorted(set(frame["backend"]) - {""})) or "unknown backend"
    gpus = sorted(set(frame["gpu"]) - {"", "none"})
    title = f"p50 latency per variant: {backends}" + (f" on {', '.join(gpus)}" if gpus else "")
    fig = Figure(figsize=(9, 1.6 + 0.45 * max(len(bench), 1)))
    ax = fig.subplots()
    if bench.empty:
        ax.text(0.5, 0.5, "no variant reached the bench stage", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        y = range(len(bench))
        left = pd.Series(0.0, index=bench.index)
        for column, stage, colour in (("preprocess_p50_ms", "preprocess", "#90caf9"),
                                      ("infer_p50_ms", "infer", "#1565c0"),
                                      ("postprocess_p50_ms", "postprocess", "#ffb74d")):
            width = bench[column].fillna(0.0)
            ax.barh(y, width, left=left, color=colour, label=f"{stage} p50")
            left += width
        spread = (bench["e2e_p90_ms"] - bench["e2e_p50_ms"]).clip(lower=0).fillna(0.0)
        ax.errorbar(bench["e2e_p50_ms"], y, xerr=[[0.0] * len(bench), spread], fmt="|", color="black",
                    markersize=14, capsize=4, label="end to end p50 → p90")
        ax.set_yticks(list(y), [f"{o} | {b}" + (" | CUDA graph" if graph == 1 else "")
                                for o, b, graph in zip(bench["onnx_label"], bench["build_label"], bench["cuda_graph"])])
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10, pad=24)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(frame: pd.DataFrame, out: Path, title: str) -> list[Path]:
    """table.md/.csv/.html/.png and latency.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    grid, details = matrix(frame), detail(frame)
    paths = [out / name for name in REPORT_FILES]
    paths[0].write_text(f"# {title}\n\n{to_markdown(grid.reset_index())}\n\n"
                        f"{to_markdown(formatted(details))}\n")
    details.to_csv(paths[1], index=False)
    paths[2].write_text(to_html(grid, details, title))
    plot_matrix(grid, frame, paths[3], title)
    plot_latency(frame, paths[4])
    return paths


# ---------------------------------------------------------------- baseline and check


def _number(value) -> float | None:
    return None if pd.isna(value) else float(value)


def cells(frame: pd.DataFrame) -> dict[str, dict]:
    """What `check` compares, per cell "<onnx_label> | <build_label>"."""
    return {f"{r.onnx_label} | {r.build_label}": {
        "status": r.status, "failed_stage": r.failed_stage,
        "val_passed": None if pd.isna(r.val_passed) else bool(r.val_passed),
        "map50_95": _number(r.map50_95), "infer_p50_ms": _number(r.infer_p50_ms),
        "e2e_p50_ms": _number(r.e2e_p50_ms), "build_s": _number(r.build_s)}
        for r in ordered(frame).itertuples(index=False)}


def _mark(cell: dict) -> str:
    mark = MARKS.get(cell["status"], "-")
    return f"X ({cell['failed_stage']})" if mark == "X" and cell.get("failed_stage") else mark


def compare(baseline: dict[str, dict], current: dict[str, dict], latency_ratio: float, map_drop: float,
            build_ratio: float, timing: bool = True) -> pd.DataFrame:
    """One row per compared (cell, metric): baseline, current and verdict (REGRESSION | ok | new)."""
    rows = []

    def add(cell, metric, before, after, regressed, verdict="ok"):
        rows.append({"cell": cell, "metric": metric, "baseline": before, "current": after,
                     "verdict": "REGRESSION" if regressed else verdict})

    def ratio(cell, metric, before, after, limit, unit):
        if before is not None and after is not None:
            add(cell, metric, f"{before:.2f}{unit}", f"{after:.2f}{unit} (x{after / before:.2f})",
                after > before * limit)

    for cell, old in baseline.items():
        new = current.get(cell)
        if new is None:
            add(cell, "cell", _mark(old), "missing", True)
            continue
        add(cell, "status", _mark(old), _mark(new), old["status"] == "ok" and new["status"] != "ok")
        if old.get("val_passed") is not None and new["val_passed"] is not None:
            add(cell, "validation", "pass" if old["val_passed"] else "fail", "pass" if new["val_passed"] else "fail",
                old["val_passed"] and not new["val_passed"])
        if old.get("map50_95") is not None and new["map50_95"] is not None:
            add(cell, "mAP50-95", f"{old['map50_95']:.3f}", f"{new['map50_95']:.3f}",
                old["map50_95"] - new["map50_95"] > map_drop)
        if timing:
            ratio(cell, "infer p50", old.get("infer_p50_ms"), new["infer_p50_ms"], latency_ratio, " ms")
            ratio(cell, "e2e p50", old.get("e2e_p50_ms"), new["e2e_p50_ms"], latency_ratio, " ms")
            if (old.get("build_s") or 0.0) >= MIN_BUILD_S:
                ratio(cell, "build time", old["build_s"], new["build_s"], build_ratio, " s")
    for cell in current.keys() - baseline.keys():
        add(cell, "cell", "absent", _mark(current[cell]), False, "new")
    diff = pd.DataFrame(rows, columns=["cell", "metric", "baseline", "current", "verdict"])
    return diff.sort_values("verdict", key=lambda v: v != "REGRESSION", kind="stable").reset_index(drop=True)


def check_markdown(diff: pd.DataFrame, grid: pd.DataFrame, sweep: str, baseline_file: Path, limits: str) -> str:
    """The check as a CI job summary: verdict, regressions, the current matrix, and every comparison."""
    regressions = diff[diff["verdict"] == "REGRESSION"]
    head = (f"## runner check: FAILED, {len(regressions)} regression(s) in {regressions['cell'].nunique()} cell(s)"
            if len(regressions) else "## runner check: passed, no regression")
    parts = [head, f"Sweep `{sweep}` against baseline `{baseline_file}`. Limits: {limits}."]
    if len(regressions):
        parts += ["### Regressions", to_markdown(regressions)]
    parts += ["### Compatibility", to_markdown(grid.reset_index()),
              f"<details><summary>All {len(diff)} comparisons</summary>\n\n{to_markdown(diff)}\n\n</details>"]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- command line


def _load(args) -> tuple[pd.DataFrame, str, str | None]:
    """(frame, name of the source, parent run id or None) for the sweep the arguments select."""
    if args.results:
        return results_frame(args.results), args.results.stem, None
    sweep_id = resolve_sweep(args.tracking_uri, args.experiment, args.sweep)
    return runs_frame(args.tracking_uri, args.experiment, sweep_id), sweep_id, sweep_id


def cmd_table(args) -> int:
    frame, name, parent = _load(args)
    out = args.out or REPORTS / name
    paths = write_report(frame, out, f"Compatibility of sweep {name}")
    if parent:
        client = _client(args.tracking_uri)
        for path in paths:
            client.log_artifact(parent, str(path), "report")
    print(to_markdown(matrix(frame).reset_index()))
    print(f"\nrunner: report in {out}" + (f" (logged to run {parent}, artifacts report/)" if parent else ""))
    return 0


def cmd_baseline(args) -> int:
    frame, name, _ = _load(args)
    baseline = {"sweep": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cells": cells(frame)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"runner: baseline of {len(baseline['cells'])} cells from {name} -> {args.out}")
    return 0


def cmd_check(args) -> int:
    try:
        baseline = json.loads(args.baseline.read_text())["cells"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"cannot read baseline {args.baseline}: {exc}") from None
    frame, name, _ = _load(args)
    diff = compare(baseline, cells(frame), args.latency_ratio, args.map_drop, args.build_ratio, not args.no_timing)
    limits = (f"mAP50-95 drop <= {args.map_drop}, "
              + ("timing not checked" if args.no_timing else
                 f"latency <= x{args.latency_ratio}, build time <= x{args.build_ratio}"))
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(check_markdown(diff, matrix(frame), name, args.baseline, limits))
    regressions = diff[diff["verdict"] == "REGRESSION"]
    with pd.option_context("display.width", 200, "display.max_rows", None, "display.max_colwidth", 60):
        print(diff.to_string(index=False))
    print(f"\nrunner: {len(regressions)} regression(s) against {args.baseline} ({limits}); summary in {args.summary}")
    return 1 if len(regressions) else 0


def parser() -> argparse.ArgumentParser:
    source = argparse.ArgumentParser(add_help=False)
    which = source.add_mutually_exclusive_group()
    which.add_argument("--sweep", default="latest", help="sweep (parent run) id, or 'latest' (default)")
    which.add_argument("--results", type=Path, help="a sweep's results.json instead of MLflow")
    source.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow tracking URI (default {DEFAULT_URI})")
    source.add_argument("--experiment", default="runner", help="MLflow experiment (default runner)")

    top = argparse.ArgumentParser(prog="runner", description="Report on a sweep: table, baseline, check.")
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


if __name__ == "__main__":
    sys.exit(main())
