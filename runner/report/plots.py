"""Pictures of a sweep: the compatibility grids as heatmaps (a facet per model) and the stage latencies as
stacked bars.

No pyplot: figures render with Agg and leave no global state.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from runner.report.frame import INACCURATE, WHY_MARKS
from runner.report.render import COLOURS, SEVERITY


def plot_matrix(model_grids: dict[str, pd.DataFrame], frame: pd.DataFrame, path: Path, title: str) -> None:
    """One heatmap per model, stacked: green O, orange △ (with the metric it missed, or the shapes not validated),
    red X (with its failing stage), blue R (reference), grey -."""
    failed = frame[frame["mark"].isin(WHY_MARKS)]
    why = [(miss or f"unvalidated: {shapes}") if shown == INACCURATE else stage for shown, stage, miss, shapes
           in zip(failed["mark"], failed["failed_stage"], failed["accuracy_miss"], failed["unvalidated_shapes"])]
    stage_of = dict(zip(zip(failed["model"], failed["build_label"], failed["onnx_label"]), why))
    heights = [len(g.index) + 1.2 for g in model_grids.values()]
    cols = max(len(g.columns) for g in model_grids.values())
    height = 0.8 + 0.7 * sum(heights)
    label_chars = max(len(str(label)) for g in model_grids.values() for label in g.index)
    fig = Figure(figsize=(max(5.5, 1.2 + 0.08 * label_chars + 1.3 * cols), height))  # row labels and title fit
    axes = fig.subplots(len(model_grids), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (model, grid) in zip(axes, model_grids.items()):
        _heatmap(ax, grid, lambda build, onnx, m=model: stage_of.get((m, build, onnx)))
        ax.set_title(model, loc="left", fontsize=10, fontweight="bold", pad=28)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # the title above the first model's name
    fig.savefig(path, dpi=120)


def _heatmap(ax, grid: pd.DataFrame, failed_stage) -> None:
    rows, cols = len(grid.index), len(grid.columns)
    ax.imshow(grid.map(SEVERITY.index).to_numpy(), cmap=ListedColormap([COLOURS[m] for m in SEVERITY]),
              vmin=0, vmax=len(SEVERITY) - 1, aspect="auto")
    for i, build in enumerate(grid.index):
        for j, onnx in enumerate(grid.columns):
            mark = grid.iat[i, j]
            text = f"{mark}\n{failed_stage(build, onnx) or '?'}" if mark in WHY_MARKS else mark
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


def plot_latency(frame: pd.DataFrame, path: Path) -> None:
    """Stacked p50 preprocess / infer / postprocess per benchmarked variant, with the e2e p50 -> p90 whisker."""
    bench = frame.dropna(subset=["infer_p50_ms"])
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
        ax.set_yticks(list(y), [f"{m} | {o} | {b}" + (" | CUDA graph" if graph == 1 else "") for m, o, b, graph
                                in zip(bench["model"], bench["onnx_label"], bench["build_label"], bench["cuda_graph"])])
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10, pad=24)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
