"""Exact ONNX rewrites for the TensorRT API build, each a config switch. They change the ONNX under test, never the
onnxruntime reference, so validate checks each rewrite against the original graph on every variant it runs.

`fold_split_concat`: a Concat that takes every output of a Split on its own axis, in order and side by side,
takes the Split's input instead (yolov8's and yolo11's C2f/C3k2 blocks: `torch.cat(x.chunk(2, 1) + ...)`). The
tensor is the same; TensorRT then has the convolution write it into the Concat's buffer, where it copied both
halves there. The Split stays for its other readers.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import onnx

from runner import cache
from runner.export import cached_onnx, store_onnx
from runner.results import OnnxArtifact

log = logging.getLogger(__name__)
FOLD_VERSION = 1  # in the cache key: a change to what fold_split_concat rewrites


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


def folded_onnx(artifact: OnnxArtifact, cache_dir: Path) -> tuple[OnnxArtifact, int]:
    """(`artifact` with its Split->Concat copies folded, how many), cached by its bytes; an ONNX with nothing to
    fold is `artifact` itself."""
    h = cache.file_sha256(artifact.path)
    h.update(json.dumps({"fold_split_concat": FOLD_VERSION}).encode())
    folder = Path(cache_dir).absolute() / "onnx" / f"{Path(artifact.path).parent.name}-fold-{h.hexdigest()[:16]}"
    with cache.locked(folder.with_name(folder.name + ".lock")):
        if found := cached_onnx(folder):
            return found, found.folded_splits
        start, model = time.perf_counter(), onnx.load(artifact.path)
        count = fold_split_concat(model)
        if not count:
            return artifact, 0
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        path = folder / "model.onnx"
        onnx.save(model, str(path))
        result = OnnxArtifact(**{**artifact.to_dict(), "path": str(path), "size_bytes": path.stat().st_size,
                                 "export_s": time.perf_counter() - start, "cached": False, "folded_splits": count})
        store_onnx(folder, result)
    log.info("export: %d Split->Concat copies folded", count)
    return result, count
