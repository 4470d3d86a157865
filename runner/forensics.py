"""Engine forensics: the engine inspector's layers joined with each layer's time into one typed table
(`LayerProfile`), and what the `runner layers` report compares between two of them.

No TensorRT here: the inspector's JSON is read as a file (`BuildResult.layers_path`), the times come as
{layer name: mean ms} from the runner (`Runner.layer_times`), both keyed by TensorRT's layer names. TensorRT 8.6
writes raw control characters inside its strings (a \\x1e between the ONNX nodes of a fused layer's Metadata),
so the JSON is parsed non-strictly and names are shown with them as " + ". A layer's precision is its first
output's datatype, read from the inspector's `Format/Datatype` text ("Row major linear FP32", "Channel major FP16
format where channel % 8 == 0", "Thirty-two wide channel vectorized row major Int8 format"); a dynamic engine's
are only known from an inspector bound to a context at a shape (`Runner.layer_info`). A reformat is a layer of
type Reformat: TensorRT's own copies between formats or precisions ("Reformatting CopyNode for ..."); a
requantize (`LayerRow.requantize`) is what is left of Q/DQ nodes TensorRT did not fuse (8.6: type Scale). An
engine built without DETAILED profiling verbosity lists names only: its layers' type and precision are "unknown".
A precision pin is checked against the layer that holds its node (`ignored_pins`): TensorRT 8.6 drops one it
cannot keep in a fusion without an error.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from runner.results import PIN_LISTS, LayerProfile, LayerRow

UNKNOWN = "unknown"
REFORMAT = "Reformat"
DATATYPES = {"fp32": "fp32", "float": "fp32", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "fp8": "fp8",
             "int8": "int8", "int32": "int32", "int64": "int64", "uint8": "uint8", "bool": "bool"}
DATATYPE = re.compile(rf"\b({'|'.join(DATATYPES)})\b", re.IGNORECASE)
ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]\x1e\x1f]+)\]")
NAME_NODE = re.compile(r"[^\s,()+\x1e\x1f]*/[^\s,()+\x1e\x1f]+")  # a node inside a fused layer's name
CONTROL = re.compile(r"[\x00-\x1f]")
FLOATS = ("fp16", "fp32")
CSV_COLUMNS = ("name", "type", "precision", "input_precision", "tactic", "ms", "share", "reformat", "onnx_nodes")


def read_layers(path: str | Path) -> list:
    """The inspector's layers at `path`: dicts at DETAILED verbosity, names only otherwise."""
    return parse_layers(Path(path).read_text(), str(path))


def parse_layers(text: str, source: str) -> list:
    """The layers of the inspector's JSON `text` (from `source`, for the error)."""
    layers = json.loads(text, strict=False).get("Layers")
    if not isinstance(layers, list):
        raise ValueError(f"{source} has no 'Layers' list: not the engine inspector's JSON")
    return layers


def precision(tensor: dict) -> str:
    """fp32, fp16, int8, ... from a tensor's `Format/Datatype` text; "unknown" where it names none."""
    found = DATATYPE.search(tensor.get("Format/Datatype", ""))
    return DATATYPES[found.group(1).lower()] if found else UNKNOWN


def onnx_nodes(name: str, metadata: str, reformat: bool) -> list[str]:
    """The ONNX nodes a layer holds: its Metadata's `[ONNX Layer: ...]` entries (8.6 on), else the node names
    (they hold a `/`) inside its name, except in a reformat's, which names the layer it feeds."""
    return ONNX_LAYER.findall(metadata) or ([] if reformat else NAME_NODE.findall(name))


def row(layer: dict | str, ms: float | None) -> LayerRow:
    """One inspector layer (a dict, or a bare name) as a row with its time."""
    if isinstance(layer, str):
        layer = {"Name": layer}
    name, kind = layer["Name"], layer.get("LayerType", UNKNOWN)
    reformat = kind == REFORMAT or name.startswith("Reformatting CopyNode")
    ends = [precision(t[0]) if t else UNKNOWN for t in (layer.get("Outputs"), layer.get("Inputs"))]
    return LayerRow(name, kind, *ends, str(layer.get("TacticName") or layer.get("TacticValue") or ""), ms, reformat,
                    onnx_nodes(name, layer.get("Metadata", ""), reformat))


def join(layers: list, times: dict[str, float], shape: list[int], runs: int) -> LayerProfile:
    """The inspector's `layers`, in engine order, with the profiled `times` ({layer name: mean ms}); a profiled
    name the inspector lacks becomes a row of unknown type at the end, and is counted as unmatched."""
    left = dict(times)
    rows = [row(layer, left.pop(layer if isinstance(layer, str) else layer["Name"], None)) for layer in layers]
    rows += [row(name, ms) for name, ms in left.items()]
    return LayerProfile(shape=list(shape), runs=runs, rows=rows, unmatched=len(left))


def shown(name: str) -> str:
    """A layer name without TensorRT 8.6's control characters."""
    return CONTROL.sub(" + ", name)


def table(profile: LayerProfile) -> pd.DataFrame:
    """The rows as a frame, with each layer's share of the total; `CSV_COLUMNS`."""
    total = profile.total_ms or float("nan")
    frame = pd.DataFrame([r.to_dict() for r in profile.rows], columns=[c for c in CSV_COLUMNS if c != "share"])
    return frame.assign(name=frame["name"].map(shown), share=frame["ms"] / total,
                        onnx_nodes=frame["onnx_nodes"].map(" ".join))[list(CSV_COLUMNS)]


def write(profile: LayerProfile, folder: Path) -> list[Path]:
    """layers.csv (the table) and layers.json (the profile as the result holds it) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "layers.csv", folder / "layers.json"]
    table(profile).to_csv(paths[0], index=False)
    paths[1].write_text(json.dumps(profile.to_dict(), indent=1))
    return paths


def became(row_: LayerRow, other: LayerProfile) -> list[LayerRow]:
    """The layers of `other` that hold an ONNX node of `row_`: what that part of the model became there."""
    nodes = set(row_.onnx_nodes)
    return [r for r in other.rows if nodes & set(r.onnx_nodes)] if nodes else []


def slowest(profile: LayerProfile, n: int) -> list[LayerRow]:
    return sorted((r for r in profile.rows if r.ms is not None), key=lambda r: -r.ms)[:n]


def pin_verdict(calibration: dict, profile: LayerProfile | None) -> tuple[list[str], str | None]:
    """(the pins TensorRT ignored (`ignored_pins`), None), or ([], why none could be judged): no layer profile, or
    one without precisions."""
    if profile is None:
        return [], "no layer profile (see the bench's note)"
    if all(UNKNOWN in (r.precision, r.input_precision) for r in profile.rows):
        return [], "the engine inspector gave no layer precisions"
    return ignored_pins(calibration, profile), None


def ignored_pins(calibration: dict, profile: LayerProfile) -> list[str]:
    """The pinned layers of an implicit-INT8 build (`calibration`'s `PIN_LISTS`; a layer in two is asked what the
    later one says) that the engine layer holding their node does not run as asked: an fp16 pin that reads or writes
    int8, an int8 pin that does not read int8, a float-out pin that does not also write fp16. A node no layer holds
    (a Concat made into copies) or a layer of unknown precision is not judged. Each as `<node>: asked <what>, runs
    <input> -> <output>`."""
    asked = {node: key for key in PIN_LISTS for node in calibration.get(key) or ()}
    holder = {node: r for r in reversed(profile.rows) if not r.reformat for node in r.onnx_nodes}
    ignored = []
    for node, key in asked.items():
        r = holder.get(node)
        if r is None or UNKNOWN in (r.precision, r.input_precision):
            continue
        kept = {"fp16_layers": r.input_precision in FLOATS and r.precision in FLOATS,
                "int8_layers": r.input_precision == "int8",
                "int8_float_out_layers": r.input_precision == "int8" and r.precision == "fp16"}[key]
        if not kept:
            ignored.append(f"{node}: asked {PIN_LISTS[key]}, runs {r.input_precision} -> {r.precision}")
    return ignored
