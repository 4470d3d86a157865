"""The compatibility grids (one per model) and the detail table of a sweep frame, as DataFrames, Markdown and
HTML."""
from __future__ import annotations

import html

import pandas as pd

from runner.config import BackendName
from runner.report.frame import METRICS
from runner.report.order import build_key, model_key, onnx_key
from runner.results import first_line

SEVERITY = "-RO△X"  # a cell run twice (e.g. two profiles) shows its worst outcome
COLOURS = {"O": "#2e7d32", "X": "#c62828", "△": "#ef6c00", "R": "#1565c0", "-": "#bdbdbd"}
LEGEND = ("O built, ran and passed validation; △ built and ran, but missed an accuracy limit against the fp32 "
          "reference (the metric is named), was partly checked (the shapes not validated, or the precision pins not "
          "checked, are named), or TensorRT ignored some of its precision pins (named in the details); X failed (its "
          "stage is in the details); R ran, and the model under test is the reference itself, so its validation "
          "cannot fail; - skipped (the reason is in the details).")
DETAIL = {"model": "model", "onnx_label": "onnx", "build_label": "build", "auto": "auto", "status": "status",
          "validation": "validation", "failed_stage": "failing stage", "note": "error / note",
          "timed_shape": "timed at", **{m.column: m.heading for m in METRICS if m.name},
          "map_shape": "mAP at", "map_worst_shape": "worst mAP at"}
FORMATS = {m.heading: m.format for m in METRICS if m.name}
SUMMARY = {"model": "model", "onnx_label": "onnx", "build_label": "build", "status": "status", "failed_stage": "stage",
           "validation": "validation", **{c: c for c in ("rel_l2", "det_f1", "map50_95", "map50_95_worst",
                                                         "timed_shape", "infer_p50_ms", "e2e_p50_ms", "e2e_ms_per_img",
                                                         "e2e_img_s", "offline_e2e_img_s", "offline_engine_img_s",
                                                         "offline_batch", "cuda_graph", "auto")}, "note": "error / note"}
NOTE_CHARS = 120  # the error / note of the details table
SUMMARY_NOTE_CHARS = 70  # the error / note of the terminal summary, a line shared with sixteen other columns


def grids(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One compatibility grid per model, in table order."""
    return {model: matrix(frame[frame["model"] == model]) for model in sorted(set(frame["model"]), key=model_key)}


def matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """The compatibility grid of one model: rows = builds, columns = ONNX variants, cells O / △ / X / R / -."""
    grid = frame.pivot_table(index="build_label", columns="onnx_label", values="mark",
                             aggfunc=lambda m: max(m, key=SEVERITY.index))
    rows = {c.build.label: build_key(c.build) for c in frame["cell"]}
    cols = {c.onnx.label: onnx_key(c.onnx) for c in frame["cell"]}
    grid = grid.reindex(index=sorted(grid.index, key=rows.get), columns=sorted(grid.columns, key=cols.get))
    grid = grid.fillna("-")
    built_by = "trt" if set(frame["backend"]) == {BackendName.tensorrt.value} else "build"
    grid.index.name = f"{built_by} ↓ onnx →"  # the corner says what the rows and the columns are
    grid.columns.name = None
    return grid


def detail(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: outcome, validation verdict, failing stage, first error line (or what a passing
    validation did not measure), key metrics."""
    return _view(frame, DETAIL, NOTE_CHARS)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """The sweep's terminal summary and summary.csv: one short row per variant."""
    return _view(frame, SUMMARY, SUMMARY_NOTE_CHARS)


def _view(frame: pd.DataFrame, columns: dict[str, str], note_chars: int) -> pd.DataFrame:
    """`columns` of the frame under their names, the note cut to its first line of at most `note_chars`."""
    table = frame[list(columns)].rename(columns=columns)
    return table.assign(**{"error / note": table["error / note"].map(lambda text: first_line(text, note_chars))})


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """Numbers as text for reading; a missing value is blank."""
    return table.assign(**{col: table[col].map(lambda v, f=f: "" if pd.isna(v) else f.format(v))
                           for col, f in FORMATS.items() if col in table})


def to_markdown(table: pd.DataFrame) -> str:
    def line(cells) -> str:
        return "|" + "|".join(str(c).replace("|", "\\|") for c in cells) + "|"
    return "\n".join([line(table.columns), line(["---"] * len(table.columns)),
                      *(line(row) for row in table.itertuples(index=False))])


def grids_markdown(model_grids: dict[str, pd.DataFrame], level: str = "##") -> str:
    """A section per model, each with its grid."""
    return "\n\n".join(f"{level} {model}\n\n{to_markdown(grid.reset_index())}" for model, grid in model_grids.items())


def to_html(model_grids: dict[str, pd.DataFrame], frame: pd.DataFrame, title: str) -> str:
    def paint(value: str) -> str:
        colour = COLOURS.get(value)
        return f"background-color: {colour}; color: white; font-weight: bold" if value in "O△XR" and colour else ""
    grid_html = "".join(f"<h3>{html.escape(model)}</h3>" + grid.reset_index().style.hide(axis="index")
                        .format(escape="html").map(paint, subset=list(grid.columns)).to_html()
                        for model, grid in model_grids.items())
    detail_html = (formatted(detail(frame)).style.hide(axis="index").format(escape="html")
                   .apply(lambda _: frame["mark"].map(paint), subset=["status"]).to_html())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>{0}</title><style>"
            "body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}"
            "th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}} th{{background:#f3f3f3}}"
            "</style></head><body><h1>{0}</h1><h2>Compatibility</h2>{1}<p>{2}</p><h2>Details</h2>{3}"
            "</body></html>").format(html.escape(title), grid_html, LEGEND, detail_html)
