"""`runner layers`: two variants of a sweep side by side, layer by layer. Where each engine's time goes (in all, by
precision, by layer type), where its reformats sit (each one, between which precisions), its slowest layers, and
what each of those became in the other engine (its layers that hold the same ONNX nodes).

It reads the layer profiles the bench stage put in the variants' results (`BenchResult.layers`, TensorRT only). A
variant is named by a piece of its cell (`model | onnx | build`, any case) or by its number in the sweep's job
order, from 0; a piece that names several is refused. Times are means over the profiled runs, with TensorRT's
IProfiler attached, so their sum is a little above the engine's own time.
"""
from __future__ import annotations

import base64
import html
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from runner import forensics
from runner.report.frame import ReportError
from runner.report.render import to_markdown
from runner.results import LayerProfile, VariantResult

FILES = ("layers.md", "layers.html", "layers.png")
SIDES = ("A", "B")
REFORMAT_SEGMENT = "reformat, requantize"
LABEL_WIDTH = 56  # characters per line of a variant's label beside its bar
PRECISION_COLOURS = {"int8": "#2e7d32", "fp16": "#1565c0", "fp32": "#ef6c00", "int32": "#6a1b9a",
                     REFORMAT_SEGMENT: "#c62828"}


@dataclass
class Side:
    """A variant chosen for the report: its name on the page (A or B), its cell and its layer profile."""
    tag: str
    cell: str
    profile: LayerProfile


def select(results: list[VariantResult], selector: str, option: str) -> tuple[int, VariantResult]:
    """(job number, result) of the one variant `selector` names: its number, or a piece of its cell."""
    listing = "; ".join(f"#{i} {r.cell.key}" for i, r in enumerate(results))
    if selector.isdigit():
        if int(selector) >= len(results):
            raise ReportError(f"{option} {selector}: the sweep has variants #0..#{len(results) - 1}: {listing}")
        return int(selector), results[int(selector)]
    found = [(i, r) for i, r in enumerate(results) if selector.lower() in r.cell.key.lower()]
    if not found:
        raise ReportError(f"{option} '{selector}' names no variant; the sweep has: {listing}")
    if len(found) > 1:
        raise ReportError(f"{option} '{selector}' names {len(found)} variants: "
                          f"{'; '.join(f'#{i} {r.cell.key}' for i, r in found)}; give more of its cell, or its number")
    return found[0]


def side(tag: str, number: int, result: VariantResult) -> Side:
    """The chosen variant's profile; ReportError where it has none, saying why."""
    bench = result.bench
    if bench and bench.layers:
        return Side(tag, result.cell.key, bench.layers)
    why = (bench.settings.get("layers_note") if bench else None) or (
        f"it has no bench result (status {result.status})" if not bench else
        f"its backend ({result.backend}) has no per-layer profiler")
    raise ReportError(f"variant #{number} {result.cell.key} has no layer profile: {why}; pick a TensorRT variant "
                      f"that was benched")


def totals(sides: list[Side]) -> pd.DataFrame:
    """Per variant: shape, runs, total ms, layers, then ms (layers) by precision and the reformats."""
    precisions = list(dict.fromkeys(p for s in sides for p in s.profile.by("precision")))
    rows = []
    for s in sides:
        by = s.profile.by("precision")
        rows.append({"variant": s.tag, "shape": "x".join(map(str, s.profile.shape)), "runs": s.profile.runs,
                     "total ms": f"{s.profile.total_ms:.3f}", "layers": len(s.profile.rows),
                     **{f"{p} ms (layers)": f"{by[p][0]:.3f} ({by[p][1]})" if p in by else "" for p in precisions},
                     "reformats ms (layers)": f"{sum(r.ms or 0 for r in s.profile.reformats):.3f} "
                                              f"({len(s.profile.reformats)})"})
    return pd.DataFrame(rows)


def by_type(sides: list[Side]) -> pd.DataFrame:
    """ms (layers) of each layer type in each variant, the type with the most time in either first."""
    groups = [s.profile.by("type") for s in sides]
    types = sorted({t for g in groups for t in g}, key=lambda t: -max(g.get(t, (0, 0))[0] for g in groups))
    return pd.DataFrame([{"layer type": t, **{f"{s.tag} ms (layers)": f"{g[t][0]:.3f} ({g[t][1]})" if t in g else ""
                                              for s, g in zip(sides, groups)}} for t in types])


def reformats(s: Side) -> pd.DataFrame:
    """Each reformat of a variant in engine order: its name, ms, and the precisions it converts between."""
    return pd.DataFrame([{"layer": forensics.shown(r.name), "kind": "requantize" if r.requantize else "reformat",
                          "ms": _ms(r.ms), "from": r.input_precision, "to": r.precision} for r in s.profile.reformats],
                        columns=["layer", "kind", "ms", "from", "to"])


def slowest(s: Side, other: Side, top: int) -> pd.DataFrame:
    """The `top` slowest layers of `s`, each with its share, and what it became in `other`."""
    total = s.profile.total_ms or float("nan")
    return pd.DataFrame([{"#": n, "layer": forensics.shown(r.name), "type": r.type, "precision": r.precision,
                          "ms": _ms(r.ms), "share": f"{r.ms / total:.1%}",
                          f"in {other.tag}": "; ".join(f"{forensics.shown(b.name)} ({b.precision}, {_ms(b.ms)} ms)"
                                                      for b in forensics.became(r, other.profile)) or "-"}
                         for n, r in enumerate(forensics.slowest(s.profile, top), 1)])


def _ms(ms: float | None) -> str:
    return "" if ms is None else f"{ms:.4f}"


def sections(sides: list[Side], top: int) -> list[tuple[str, pd.DataFrame]]:
    a, b = sides
    return [("Where the time goes", totals(sides)), ("By layer type", by_type(sides)),
            *((f"Reformats of {s.tag}", reformats(s)) for s in sides),
            (f"The slowest layers of A (at most {top}), and what they became in B", slowest(a, b, top)),
            (f"The slowest layers of B (at most {top}), and what they became in A", slowest(b, a, top))]


def legend(sides: list[Side]) -> list[str]:
    return [f"{s.tag}: {s.cell}" for s in sides] + [
        "Times: mean ms per run at the timed shape, TensorRT's IProfiler attached (their sum is a little above the "
        "engine's own time). Precision: a layer's first output's datatype. A reformat converts between formats or "
        "precisions (TensorRT's copies); a requantize rescales int8 (Quantize/Dequantize nodes TensorRT did not fuse)."]


def markdown(sides: list[Side], top: int, title: str) -> str:
    body = "\n\n".join(f"## {heading}\n\n{to_markdown(frame) if len(frame) else 'none'}"
                       for heading, frame in sections(sides, top))
    return f"# {title}\n\n" + "\n".join(f"- {line}" for line in legend(sides)) + f"\n\n{body}\n"


def to_html(sides: list[Side], top: int, title: str, picture: Path) -> str:
    body = "".join(f"<h2>{html.escape(heading)}</h2>" + (frame.to_html(index=False) if len(frame) else "<p>none</p>")
                   for heading, frame in sections(sides, top))
    image = base64.b64encode(picture.read_bytes()).decode()
    return ("<!doctype html><html><head><meta charset='utf-8'><title>{0}</title><style>"
            "body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}"
            "th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}} th{{background:#f3f3f3}}"
            "</style></head><body><h1>{0}</h1><ul>{1}</ul><img src='data:image/png;base64,{2}' alt='{0}'>{3}"
            "</body></html>").format(html.escape(title), "".join(f"<li>{html.escape(x)}</li>" for x in legend(sides)),
                                     image, body)


def plot(sides: list[Side], path: Path, title: str) -> None:
    """Above: each variant's time as a bar, split by precision, its reformats apart. Below: time by layer type."""
    fig = Figure(figsize=(10, 7.5))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 2.2]})
    segments = [{p: ms for p, (ms, _) in _by_precision(s.profile).items()} for s in sides]
    names = list(dict.fromkeys(k for seg in segments for k in seg))
    for y, seg in enumerate(segments):
        left = 0.0
        for name in names:
            top.barh(y, seg.get(name, 0.0), left=left, color=PRECISION_COLOURS.get(name, "#9e9e9e"), edgecolor="white",
                     hatch="//" if name == REFORMAT_SEGMENT else None, label=name if y == 0 else None)
            left += seg.get(name, 0.0)
        top.text(left, y, f"  {left:.3f} ms", va="center", fontsize=9)
    labels = [textwrap.fill(f"{s.tag}: {s.cell}", LABEL_WIDTH, break_on_hyphens=False) for s in sides]
    top.set_yticks(range(len(sides)), labels, fontsize=8)
    top.invert_yaxis()
    top.set_xlabel("profiled ms per run, by precision (reformats apart)")
    top.set_xlim(0, max(s.profile.total_ms for s in sides) * 1.25)
    top.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(names), frameon=False)
    types = by_type(sides)["layer type"].tolist()[:12]
    height = 0.8 / len(sides)
    for k, s in enumerate(sides):
        by = s.profile.by("type")
        bottom.barh([i + k * height for i in range(len(types))], [by.get(t, (0, 0))[0] for t in types], height,
                    label=f"{s.tag}", color=("#455a64", "#ffa000")[k])
    bottom.set_yticks([i + height * (len(sides) - 1) / 2 for i in range(len(types))], types, fontsize=8)
    bottom.invert_yaxis()
    bottom.set_xlabel("profiled ms per run, by layer type")
    bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # nothing cut at the edges, whatever the labels' length


def _by_precision(profile: LayerProfile) -> dict[str, tuple[float, int]]:
    """ms (layers) by precision of the layers that only compute, and the reformats and requantizes as one more group."""
    kept = LayerProfile(profile.shape, profile.runs, [r for r in profile.rows if not r.converts])
    return {**kept.by("precision"), REFORMAT_SEGMENT: (sum(r.ms or 0 for r in profile.reformats),
                                                       len(profile.reformats))}


def write(sides: list[Side], out: Path, title: str, top: int) -> list[Path]:
    """layers.md, layers.html and layers.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in FILES]
    plot(sides, paths[2], title)
    paths[0].write_text(markdown(sides, top, title))
    paths[1].write_text(to_html(sides, top, title, paths[2]))
    return paths
