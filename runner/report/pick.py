"""`runner pick`: the variants of a sweep frame that meet a budget, ranked, and the Pareto front of accuracy
(headline mAP50-95) against latency (e2e p50 per image) and against throughput (end-to-end images/s).

Per-image figures are comparable only between rows timed at one shape on one GPU: rows timed at several shapes
are refused unless `--timed-at` keeps one, rows timed on several GPUs always. A variant qualifies only with every
figure its budget reads; a missing figure is a reason, never a pass. Images/s is end to end: the offline figure
where every timed row has one, else the single-stream one at the timed batch, never the two mixed.
"""
from __future__ import annotations

import base64
import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from runner.report.frame import MARKS, REFERENCE, ReportError
from runner.report.plots import plot_pareto

OK_MARKS = (MARKS["ok"], REFERENCE)  # `--status ok`: ran and passed validation, or is the reference
OFFLINE_E2E, SINGLE_E2E = "offline_e2e_img_s", "e2e_img_s"  # end-to-end images/s: offline (best batch), single stream
RATE = "images_per_s"  # the frame column pick adds: the end-to-end images/s it reads, from one of the two
FILES = ("pick.png", "pick.html", "pick.csv")


@dataclass(frozen=True)
class Limit:
    """A budget option, the frame column it bounds, its heading, and whether it is an upper bound."""
    option: str
    column: str
    heading: str
    upper: bool

    @property
    def dest(self) -> str:
        return self.option.removeprefix("--").replace("-", "_")

    def missed(self, value: float, bound: float) -> str:
        """Why `value` misses `bound`: "" where it meets it."""
        if pd.isna(value):
            return f"no {self.heading}"
        if value > bound if self.upper else value < bound:
            return f"{'over' if self.upper else 'under'} {self.option}"
        return ""


LIMITS = (Limit("--max-e2e-ms", "e2e_ms_per_img", "e2e p50/img ms", True),
          Limit("--max-infer-ms", "infer_ms_per_img", "infer p50/img ms", True),
          Limit("--max-map-drop", "map_drop", "mAP drop", True),
          Limit("--min-map", "map50_95", "mAP50-95", False),
          Limit("--min-images-per-s", RATE, "img/s", False))
RANKS = {"latency": ("e2e_ms_per_img", True), "throughput": (RATE, False), "map": ("map50_95", False)}
SHOWN = {"rank": "rank", "model": "model", "onnx_label": "onnx", "build_label": "build", "mark": "status",
         "map50_95": "mAP50-95", "map_drop": "mAP drop", "e2e_ms_per_img": "e2e p50/img ms",
         "infer_ms_per_img": "infer p50/img ms", RATE: "img/s", "front": "Pareto front"}
FORMATS = {"mAP50-95": "{:.3f}", "mAP drop": "{:.3f}", "e2e p50/img ms": "{:.2f}", "infer p50/img ms": "{:.2f}",
           "img/s": "{:.0f}"}


@dataclass
class Pick:
    """The frame of one comparable setting with `qualifies`, `reasons`, `rank` and `front`, and how it was read."""
    frame: pd.DataFrame
    timed_at: str
    gpu: str
    rate_source: str
    budget: dict[str, float]
    status: str
    by: str

    @property
    def chosen(self) -> pd.DataFrame:
        return self.frame[self.frame["qualifies"]].sort_values("rank")

    def count_line(self) -> str:
        """"3 of 24 qualify; 20 over --max-e2e-ms, 1 not ok (△)" (a variant may miss several limits)."""
        missed = Counter(reason for reasons in self.frame["reasons"] for reason in reasons)
        tail = ", ".join(f"{n} {reason}" for reason, n in missed.most_common())
        return f"{len(self.chosen)} of {len(self.frame)} qualify" + (f"; {tail}" if tail else "")

    def budget_text(self) -> str:
        return " ".join(f"{limit.option} {self.budget[limit.dest]:g}" for limit in LIMITS
                        if self.budget.get(limit.dest) is not None) or "no limit"


def comparable(frame: pd.DataFrame, timed_at: str | None) -> tuple[pd.DataFrame, str, str]:
    """The rows of one timed shape and GPU (untimed rows kept, to be counted out), the shape and the GPU;
    ReportError where the timed rows are of several and `timed_at` does not choose."""
    timed = frame[frame["timed_shape"] != ""]
    if timed_at:
        if timed_at not in set(timed["timed_shape"]):
            raise ReportError(f"no variant timed at {timed_at}; timed at: {_counts(timed['timed_shape'])}")
        frame = frame[frame["timed_shape"].isin([timed_at, ""])]
        timed = frame[frame["timed_shape"] != ""]
    shapes, gpus = sorted(set(timed["timed_shape"])), sorted(set(timed["gpu"]))
    if len(shapes) > 1:
        raise ReportError(f"variants timed at {len(shapes)} shapes ({_counts(timed['timed_shape'])}) are not "
                          f"comparable per image; pass --timed-at SHAPE to pick among one")
    if len(gpus) > 1:
        raise ReportError(f"variants timed on {len(gpus)} GPUs ({_counts(timed['gpu'])}) are not comparable; "
                          f"pick from the sweeps of one")
    return frame.reset_index(drop=True), (shapes or [""])[0], (gpus or [""])[0]


def _counts(values: pd.Series) -> str:
    return ", ".join(f"{value or 'none'}: {n}" for value, n in sorted(Counter(values).items()))


def with_rate(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """`frame` with RATE, the end-to-end images/s, and the column it came from."""
    timed = frame["timed_shape"] != ""
    offline = frame.get(OFFLINE_E2E)
    source = OFFLINE_E2E if offline is not None and timed.any() and offline[timed].notna().all() else SINGLE_E2E
    return frame.assign(**{RATE: frame[source]}), source


def pick(frame: pd.DataFrame, budget: dict[str, float], status: str = "ok", by: str = "latency",
         timed_at: str | None = None) -> Pick:
    """The variants of `frame` that meet `budget` (a limit's dest -> bound, None where not set) with `status`
    ("ok": O or R only; "any": every mark), ranked `by` a key of RANKS, and each one's Pareto fronts."""
    frame, shape, gpu = comparable(frame, timed_at)
    frame, source = with_rate(frame)
    rank_column, ascending = RANKS[by]
    rank_limit = next(limit for limit in LIMITS if limit.column == rank_column)
    reasons = [_reasons(row, budget, status, rank_limit) for _, row in frame.iterrows()]
    frame = frame.assign(qualifies=[not r for r in reasons], reasons=reasons)
    candidates = frame["mark"].isin(OK_MARKS) if status == "ok" else pd.Series(True, index=frame.index)
    frame = frame.assign(front=fronts(frame, candidates))
    order = frame[frame["qualifies"]].sort_values([rank_column, "map50_95"], ascending=[ascending, False])
    frame = frame.assign(rank=pd.Series(range(1, len(order) + 1), index=order.index, dtype="Int64"))
    return Pick(frame, shape, gpu, source, budget, status, by)


def _reasons(row: pd.Series, budget: dict[str, float], status: str, rank_limit: Limit) -> list[str]:
    """Why `row` does not qualify: its mark where `status` refuses it, else each limit missed ([] where it
    qualifies)."""
    if status == "ok" and row["mark"] not in OK_MARKS:
        return [f"not ok ({row['mark']})"]
    missed = [limit.missed(row[limit.column], budget[limit.dest]) for limit in LIMITS
              if budget.get(limit.dest) is not None]
    if pd.isna(row[rank_limit.column]):
        missed.append(f"no {rank_limit.heading}")
    return list(dict.fromkeys(filter(None, missed)))


def pareto(x: pd.Series, y: pd.Series, low_x: bool) -> pd.Series:
    """True where no other point is at least as good on both and better on one: y higher is better, x lower
    is better where `low_x`, else higher."""
    sign = 1 if low_x else -1
    points = list(zip(sign * x, y))
    return pd.Series([not any(a <= px and b >= py and (a, b) != (px, py) for a, b in points) for px, py in points],
                     index=x.index, dtype=bool)


def fronts(frame: pd.DataFrame, candidates: pd.Series) -> pd.Series:
    """"latency", "throughput", "both" or "" per row: the fronts of mAP50-95 against e2e p50/img and against
    images/s, among the `candidates` that have the figures."""
    names = pd.Series("", index=frame.index)
    for name, column, low in (("latency", "e2e_ms_per_img", True), ("throughput", RATE, False)):
        pool = frame[candidates & frame[column].notna() & frame["map50_95"].notna()]
        on = pool.index[pareto(pool[column], pool["map50_95"], low)]
        names[on] = [f"{names[i]} + {name}".removeprefix(" + ") for i in on]
    return names.replace("latency + throughput", "both")


def table(chosen: pd.DataFrame) -> pd.DataFrame:
    """The ranked variants as shown: headings, numbers as text."""
    shown = chosen[list(SHOWN)].rename(columns=SHOWN)
    return shown.assign(**{col: shown[col].map(lambda v, f=f: "" if pd.isna(v) else f.format(v))
                           for col, f in FORMATS.items()})


def rate_text(choice: Pick) -> str:
    return ("offline, end to end at the best batch" if choice.rate_source == OFFLINE_E2E
            else "single stream, end to end at the timed batch")


def header(choice: Pick, name: str) -> str:
    timed = f"timed at {choice.timed_at or 'no shape'}" + (f" on {choice.gpu}" if choice.gpu else "")
    return (f"pick from {name}: {len(choice.frame)} variants {timed}; {choice.budget_text()}, --status "
            f"{choice.status}; ranked by {choice.by}; img/s is {rate_text(choice)}")


def to_html(choice: Pick, title: str, picture: Path) -> str:
    """The ranked table, the others with their reasons, and the picture inline."""
    others = choice.frame[~choice.frame["qualifies"]]
    rest = others[["model", "onnx_label", "build_label", "mark"]].assign(
        reasons=others["reasons"].map("; ".join)).rename(columns={"onnx_label": "onnx", "build_label": "build",
                                                                  "mark": "status", "reasons": "why not"})
    image = base64.b64encode(picture.read_bytes()).decode()
    limits = f"{choice.budget_text()}; img/s is {rate_text(choice)}"
    return ("<!doctype html><html><head><meta charset='utf-8'><title>{0}</title><style>"
            "body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}"
            "th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}} th{{background:#f3f3f3}}"
            "</style></head><body><h1>{0}</h1><p>{1}</p><p><b>{2}</b></p><h2>Qualifying, ranked</h2>{3}"
            "<h2>Not qualifying</h2>{4}<h2>Pareto fronts</h2><img src='data:image/png;base64,{5}' alt='{0}'>"
            "</body></html>").format(html.escape(title), html.escape(limits), html.escape(choice.count_line()),
                                     table(choice.chosen).to_html(index=False), rest.to_html(index=False), image)


def labels(frame: pd.DataFrame) -> pd.Series:
    """"#rank model | build" per row (the ONNX variant too where model and build repeat), "CUDA graph" where
    one replayed."""
    pair = frame["model"] + " | " + frame["build_label"]
    text = pair.where(~pair.duplicated(keep=False), frame["model"] + " | " + frame["onnx_label"] + " | "
                      + frame["build_label"])
    text = text + frame["cuda_graph"].map(lambda graph: " | CUDA graph" if graph == 1 else "")
    return frame["rank"].map(lambda rank: "" if pd.isna(rank) else f"#{int(rank)} ") + text  # a float where pandas maps


def write(choice: Pick, out: Path, title: str) -> list[Path]:
    """pick.png (the Pareto fronts), pick.html and pick.csv (every variant, with why it does not qualify) under
    `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in FILES]
    bounds = {limit.column: choice.budget.get(limit.dest) for limit in LIMITS}
    timed = f" (timed at {choice.timed_at})" if choice.timed_at else ""
    plot_pareto(choice.frame.assign(label=labels(choice.frame)), paths[0], f"{title}: {choice.count_line()}",
                [("latency", "e2e_ms_per_img", f"e2e p50 per image, ms{timed}", bounds["e2e_ms_per_img"]),
                 ("throughput", RATE, f"images/s, {rate_text(choice)}{timed}", bounds[RATE])],
                bounds["map50_95"])
    paths[1].write_text(to_html(choice, title, paths[0]))
    rows = choice.frame.assign(reasons=choice.frame["reasons"].map("; ".join))
    rows[["rank", "model", "onnx_label", "build_label", "mark", "timed_shape", "map50_95", "map_drop",
          "e2e_ms_per_img", "infer_ms_per_img", RATE, "front", "qualifies", "reasons"]].to_csv(paths[2], index=False)
    return paths
