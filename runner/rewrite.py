"""ONNX rewrites for the TensorRT API build, each a config switch. They change the ONNX under test, never the
onnxruntime reference, so validate checks each rewrite against the original graph on every variant it runs.

`fold_split_concat` (exact): a Concat that takes every output of a Split on its own axis, in order and side by
side, takes the Split's input instead (yolov8's and yolo11's C2f/C3k2 blocks: `torch.cat(x.chunk(2, 1) + ...)`).
The tensor is the same; TensorRT then has the convolution write it into the Concat's buffer, where it copied both
halves there. The Split stays for its other readers.

`head_maps`: the graph ends at a YOLO Detect head's per-level maps, its last box and class convolutions, and drops
the decode after them (reshapes, DFL, anchors, sigmoid): `processing.decode_maps`, or the GPU score filter's
kernel, decodes them to the same `(B, 4 + nc, anchors)`, which validate compares with the reference's output.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path

import onnx
import onnx.utils

from runner import cache
from runner.export import cached_onnx, signature, store_onnx
from runner.results import OnnxArtifact

log = logging.getLogger(__name__)
FOLD_VERSION = 1  # in the cache key: a change to what fold_split_concat rewrites
HEAD_MAPS_VERSION = 1  # in the cache key: a change to where `cut_at_head_maps` cuts
LEVELS = 3  # the head maps' levels the GPU decode takes (P3-P5)
MAX_BINS = 16  # the DFL bins per side the GPU decode takes (yolov8, yolov5u, yolo11: 16)


class NoHeadMaps(ValueError):
    """An ONNX without a YOLO Detect head to cut at its maps; the message is one line."""


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def fold_split_concat(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place (see the module's docstring); return how many Split->Concat runs were folded.
    A Split none of whose outputs is read any more goes."""
    graph = model.graph
    splits = {node.output[0]: node for node in graph.node if node.op_type == "Split"}
    folded = 0
    for node in graph.node:
        if node.op_type != "Concat":
            continue
        inputs, kept, i = list(node.input), [], 0
        while i < len(inputs):
            split = splits.get(inputs[i])
            run = list(split.output) if split is not None else []
            if run and _axis(split) == _axis(node) and inputs[i:i + len(run)] == run:
                kept.append(split.input[0])
                i += len(run)
                folded += 1
            else:
                kept.append(inputs[i])
                i += 1
        if len(kept) != len(inputs):
            del node.input[:]
            node.input.extend(kept)
    read = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    for split in splits.values():
        if not read.intersection(split.output):
            graph.node.remove(split)
    return folded


def readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, by its name."""
    read = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            read[name].append(node)
    return read


def head_maps(model: onnx.ModelProto) -> list[str]:
    """The outputs of a YOLO Detect head's last convolutions, per level its box map then its class map, in the order
    the head concatenates the levels. They are found by the head's decode: one Concat of Reshaped convolution
    outputs read by a Sigmoid (the classes) and one other (the boxes, into the DFL). Raises NoHeadMaps."""
    graph = model.graph
    producer, read = {out: node for node in graph.node for out in node.output}, readers(model)

    def conv_outputs(concat: onnx.NodeProto) -> list[str] | None:
        outputs = []
        for name in concat.input:
            reshape = producer.get(name)
            conv = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
            if conv is None or conv.op_type != "Conv":
                return None
            outputs.append(conv.output[0])
        return outputs

    branches = [(node, maps) for node in graph.node if node.op_type == "Concat" and (maps := conv_outputs(node))]
    sigmoid = {node.name for node, _ in branches if any(r.op_type == "Sigmoid" for r in read[node.output[0]])}
    classes = [maps for node, maps in branches if node.name in sigmoid]
    boxes = [maps for node, maps in branches if node.name not in sigmoid]
    if len(classes) != 1 or len(boxes) != 1 or {len(classes[0]), len(boxes[0])} != {LEVELS} or len(graph.output) != 1:
        raise NoHeadMaps(f"no YOLO Detect head maps to cut at (found {len(boxes)} box and {len(classes)} class "
                         f"branches of {[len(b) for b in boxes + classes]} levels, {len(graph.output)} outputs; "
                         f"it takes {LEVELS} levels); backend.head_maps applies to one-to-many YOLO "
                         f"heads (yolov8, yolov5u, yolo11)")
    return [name for level in zip(boxes[0], classes[0]) for name in level]


def cut_at_head_maps(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """`model` cut at its head maps (`head_maps`), with its metadata, and the record the decode needs: the
    original output, the maps in order, the class count and the DFL's bins per side. Raises NoHeadMaps."""
    maps = head_maps(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    init = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in init]
    cut = onnx.utils.Extractor(inferred).extract_model(inputs, maps)
    cut.metadata_props.extend(model.metadata_props)
    channels = [out.type.tensor_type.shape.dim[1].dim_value for out in cut.graph.output]
    classes, box = channels[1], channels[0]
    if box % 4 or any(c != box for c in channels[::2]) or any(c != classes for c in channels[1::2]):
        raise NoHeadMaps(f"head maps of {channels} channels are not box maps of 4 x bins and class maps per level")
    if box // 4 > MAX_BINS:
        raise NoHeadMaps(f"the head's DFL has {box // 4} bins per side; the GPU decode takes at most {MAX_BINS}")
    output = model.graph.output[0]
    shape = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    if len(shape) != 3 or shape[1] != 4 + classes:
        raise NoHeadMaps(f"the output {output.name} {shape} is not the one-to-many (B, 4 + nc = {4 + classes}, "
                         f"anchors) that its head maps decode to; backend.head_maps applies to one-to-many YOLO heads")
    record = {"output": output.name, "maps": maps, "classes": classes, "reg_max": box // 4}
    return cut, record


def _rewritten(artifact: OnnxArtifact, cache_dir: Path, tag: str, key: dict, rewrite) -> OnnxArtifact | None:
    """`artifact` rewritten by `rewrite(model)` -> (model, artifact fields) or None where there is nothing to
    rewrite, cached by its bytes and `key` in a folder named with `tag`."""
    h = cache.file_sha256(artifact.path)
    h.update(json.dumps(key).encode())
    folder = Path(cache_dir).absolute() / "onnx" / f"{Path(artifact.path).parent.name}-{tag}-{h.hexdigest()[:16]}"
    with cache.locked(folder.with_name(folder.name + ".lock")):
        if found := cached_onnx(folder):
            return found
        start = time.perf_counter()
        done = rewrite(onnx.load(artifact.path))
        if done is None:
            return None
        model, fields = done
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        path = folder / "model.onnx"
        onnx.save(model, str(path))
        result = OnnxArtifact(**{**artifact.to_dict(), "path": str(path), "size_bytes": path.stat().st_size,
                                 "export_s": time.perf_counter() - start, "cached": False,
                                 "signature": signature(model), **fields})
        store_onnx(folder, result)
        return result


def folded_onnx(artifact: OnnxArtifact, cache_dir: Path) -> tuple[OnnxArtifact, int]:
    """(`artifact` with its Split->Concat copies folded, how many), cached by its bytes; an ONNX with nothing to
    fold is `artifact` itself."""
    def fold(model: onnx.ModelProto):
        count = fold_split_concat(model)
        return (model, {"folded_splits": count}) if count else None

    result = _rewritten(artifact, cache_dir, "fold", {"fold_split_concat": FOLD_VERSION}, fold)
    if result is None:
        return artifact, 0
    if not result.cached:
        log.info("export: %d Split->Concat copies folded", result.folded_splits)
    return result, result.folded_splits


def head_maps_onnx(artifact: OnnxArtifact, cache_dir: Path) -> OnnxArtifact:
    """`artifact` cut at its head maps (`cut_at_head_maps`), cached by its bytes. Raises NoHeadMaps."""
    def cut(model: onnx.ModelProto):
        model, record = cut_at_head_maps(model)
        return model, {"head_maps": record}

    result = _rewritten(artifact, cache_dir, "maps", {"head_maps": HEAD_MAPS_VERSION}, cut)
    if not result.cached:
        log.info("export: cut at the head's %d maps; the decode runs after the engine", len(result.head_maps["maps"]))
    return result
