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
    """One heatmap per model, stacked: green O, orange △ (with the metric it missed, the shapes not validated, or the
    pins TensorRT ignored or not checked), red X (with its failing stage), blue R (reference), grey -."""
    failed = frame[frame["mark"].isin(WHY_MARKS)]
    why = [(miss or (shapes and f"unvalidated: {shapes}") or pins.split(":")[0]) if shown == INACCURATE else stage
           for shown, stage, miss, shapes, pins in zip(failed["mark"], failed["failed_stage"], failed["accuracy_miss"],
                                                       failed["unvalidated_shapes"], failed["pin_check"])]
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
    labels = [f"{m} | {o} | {b}" + (" | CUDA graph" if graph == 1 else "") for m, o, b, graph
              in zip(bench["model"], bench["onnx_label"], bench["build_label"], bench["cuda_graph"])]
    labels_in = 0.075 * max((len(label) for label in labels), default=0)  # the row labels, inches at 10 pt
    fig = Figure(figsize=(max(9, 5.5 + labels_in), 1.6 + 0.45 * max(len(bench), 1)))  # the bars keep 5.5 in
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
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10, pad=24)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_pareto(points: pd.DataFrame, path: Path, title: str, panels: list[tuple[str, str, str, float | None]],
                min_map: float | None) -> None:
    """mAP50-95 against each panel's figure, a panel being (front name, column, axis label, bound or None):
    qualifying points filled and ranked, the others hollow, the panel's Pareto front drawn, the budget dashed,
    every point labelled in a column beside the axes (a leader line to each, no label over another)."""
    height = max(4.5, 0.16 * len(points) + 1.5)
    labels_in = 0.6 + 0.055 * max((len(label) for label in points["label"]), default=0)  # the label column, inches
    fig = Figure(figsize=(7.7 + labels_in, 2 * height + 0.6))
    fig.subplots_adjust(left=0.08 * 11 / fig.get_figwidth(), right=1 - labels_in / fig.get_figwidth(),
                        top=1 - 0.9 / fig.get_figheight(), bottom=0.45 / fig.get_figheight(), hspace=0.9 / height)
    for ax, (front, column, label, bound) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        _pareto_panel(ax, points.dropna(subset=[column, "map50_95"]), front, column, bound, min_map)
        ax.set_xlabel(label)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)


def _pareto_panel(ax, points: pd.DataFrame, front: str, column: str, bound: float | None,
                  min_map: float | None) -> None:
    if points.empty:
        ax.text(0.5, 0.5, "no variant has this figure and an mAP50-95", ha="center", transform=ax.transAxes)
        return
    chosen = points["qualifies"]
    ax.scatter(points.loc[chosen, column], points.loc[chosen, "map50_95"], color=COLOURS["O"], zorder=3,
               label="qualifies")
    ax.scatter(points.loc[~chosen, column], points.loc[~chosen, "map50_95"], facecolors="none",
               edgecolors="#757575", zorder=3, label="does not qualify")
    on = points[points["front"].isin([front, "both"])].sort_values(column)
    ax.plot(on[column], on["map50_95"], color=COLOURS["R"], lw=1.2, zorder=2, label=f"Pareto front ({front})")
    for value, line in ((bound, ax.axvline), (min_map, ax.axhline)):
        if value is not None:
            line(value, color="#c62828", ls="--", lw=0.8, zorder=1)
    ax.margins(0.08)
    ax.set_ylabel("mAP50-95 (headline shape)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    _label_column(ax, points[column], points["map50_95"], points["label"], chosen)


def _label_column(ax, xs: pd.Series, ys: pd.Series, labels: pd.Series, chosen: pd.Series, size: float = 7) -> None:
    """Each label in a column right of the axes, at its point's height where there is room, spread apart where
    there is not, joined to its point by a thin line."""
    y0, y1 = ax.get_ylim()
    heights = (ys - y0) / (y1 - y0)
    gap = size * 1.4 / (ax.get_position().height * ax.figure.get_figheight() * 72)
    order = heights.sort_values(kind="stable").index
    for i, at in zip(order, _spread(list(heights[order]), gap)):
        ax.annotate(labels[i], (xs[i], ys[i]), xytext=(1.03, at), textcoords="axes fraction", va="center",
                    fontsize=size, color=COLOURS["O"] if chosen[i] else "#616161", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "#bdbdbd", "lw": 0.5, "shrinkA": 0, "shrinkB": 3})


def _spread(heights: list[float], gap: float) -> list[float]:
    """Sorted heights in [0, 1] moved apart to at least `gap`, as little as may be; evenly spaced where they do not
    fit."""
    if len(heights) * gap > 1:
        return [i / max(len(heights) - 1, 1) for i in range(len(heights))]
    spread = list(heights)
    for i in range(1, len(spread)):
        spread[i] = max(spread[i], spread[i - 1] + gap)
    spread[-1] = min(spread[-1], 1.0)
    for i in range(len(spread) - 2, -1, -1):
        spread[i] = min(spread[i], spread[i + 1] - gap)
    return spread
