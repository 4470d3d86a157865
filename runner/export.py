"""Export stage: weights -> ONNX with ultralytics `model.export`, or `torch.onnx.export` with the TorchScript
exporter (`dynamo=False`) or the torch.export-based one (`dynamo=True`, torch's default since 2.9).

Both tools load exactly the weights file named, from a copy called `model.pt`, so no file name makes
ultralytics reach for a hub (it renames `yolov5n.pt` to `yolov5nu.pt` and downloads that). `end2end` exports
the NMS-free one-to-one head of yolov10 / yolo26. Every ONNX carries ultralytics' metadata (class names,
stride, end2end), is checked with `onnx.checker` and described by its signature. Exports run on the CPU and
are cached by a content key (weights bytes + export settings + tool versions), so a sweep exports each ONNX
once. A cached export whose model.onnx or artifact.json does not match what was recorded is said, removed and
made again.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import onnx

from runner import cache, checkpoint, heads
from runner.config import ExportTool
from runner.results import OnnxArtifact, StageError

log = logging.getLogger(__name__)
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


@dataclass(frozen=True)
class ExportSpec:
    weights: str
    tool: str  # ultralytics | torch | dynamo
    dynamic: bool
    half: bool
    imgsz: tuple[int, int]
    opset: int
    simplify: bool
    end2end: bool = False  # the one-to-one head, (B, max_det, 6), NMS-free
    nms: bool = False  # the one-to-many head with NMS in the graph (ultralytics' nms=True), (B, max_det, 6)
    batch: int = 1  # a static ONNX's batch (a dynamic one's is dynamic)

    def key(self) -> str:
        h = hashlib.sha256(Path(self.weights).read_bytes())
        fields = {**asdict(self), "weights": None, "versions": [version("ultralytics"), version("torch"),
                                                                version("onnx")]}
        h.update(json.dumps(fields, sort_keys=True).encode())
        return h.hexdigest()[:16]


def signature(model: onnx.ModelProto) -> dict:
    """Input/output names, shapes (symbolic dims as names) and dtypes of an ONNX graph."""
    def describe(values) -> list[dict]:
        return [{"name": v.name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": ONNX_DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))}
                for v in values]
    init = {i.name for i in model.graph.initializer}
    return {"inputs": describe([i for i in model.graph.input if i.name not in init]),
            "outputs": describe(model.graph.output), "opset": max(o.version for o in model.opset_import
                                                                  if o.domain in ("", "ai.onnx"))}


def weights_precision(model: onnx.ModelProto) -> str:
    """fp16 when most initializer bytes are float16."""
    sizes = {"fp16": 0, "fp32": 0}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT16:
            sizes["fp16"] += len(init.raw_data)
        elif init.data_type == onnx.TensorProto.FLOAT:
            sizes["fp32"] += len(init.raw_data)
    return "fp16" if sizes["fp16"] > sizes["fp32"] else "fp32"


def names_of(model: onnx.ModelProto) -> list[str]:
    """The class names, by index, that an ONNX carries in its metadata (`names`, as ultralytics writes it),
    or [] when it carries none."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        names = ast.literal_eval(meta.get("names", "{}"))
        return [str(names[i]) for i in range(len(names))]
    except (ValueError, SyntaxError, KeyError, TypeError):
        return []


def _local_copy(spec: ExportSpec, workdir: Path) -> Path:
    """The weights as `workdir/model.pt`: loaded from there, whatever the user's file is called, once that copy
    passed `checkpoint.verify`."""
    return checkpoint.verified_copy(spec.weights, workdir / "model.pt", "export")


def ultralytics_nms(end2end: bool, nms: bool) -> bool | None:
    """ultralytics' `nms=` export argument: True puts NMS in the graph, False keeps the one-to-one head."""
    return True if nms else False if end2end else None


def _check_head(model, spec: ExportSpec) -> None:
    """Refuse, in one line, export.head=end2end or nms for RT-DETR (NMS-free by itself: its own head is the
    only one), and end2end for a model without a one-to-one head."""
    if type(model.model[-1]).__name__ == heads.RTDETR_HEAD and (spec.end2end or spec.nms):
        raise StageError("export", f"{Path(spec.weights).name} is an RT-DETR, NMS-free by itself: export.head="
                                   f"{'end2end' if spec.end2end else 'nms'} applies to YOLO heads; export.head="
                                   f"one2many exports its own head")
    if spec.end2end and getattr(model.model[-1], "one2one_cv2", None) is None:
        raise StageError("export", f"{Path(spec.weights).name} has no one-to-one (NMS-free) head; export.head="
                                   f"end2end needs a yolov10 or yolo26 style model, export.head=one2many exports "
                                   f"this one")


def _export_ultralytics(spec: ExportSpec, workdir: Path) -> Path:
    from ultralytics import YOLO

    yolo = YOLO(str(_local_copy(spec, workdir)))  # it writes the ONNX next to the weights
    _check_head(yolo.model, spec)
    out = yolo.export(format="onnx", imgsz=list(spec.imgsz), dynamic=spec.dynamic, simplify=spec.simplify,
                      opset=spec.opset, quantize=16 if spec.half else None, nms=ultralytics_nms(spec.end2end, spec.nms),
                      device="cpu", batch=spec.batch, verbose=False)
    return Path(out)


def _torch_model(spec: ExportSpec, workdir: Path):
    """The checkpoint as an inference module returning the decoded head output only, a dummy input, and
    ultralytics' metadata for the ONNX."""
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    device = torch.device("cpu")
    model = load_checkpoint(str(_local_copy(spec, workdir)), device=device, inplace=True, fuse=False)[0]
    _check_head(model, spec)
    if spec.nms:
        raise StageError("export", f"export.head=nms is ultralytics' export option (nms=True); export={spec.tool} "
                                   f"does not put NMS in the graph (use export=ultralytics)")
    if hasattr(model, "end2end"):
        model.end2end = spec.end2end  # chosen before fusing, which drops the other head
    model = model.fuse(verbose=False).float().eval()
    model.model[-1].dynamic = spec.dynamic  # the head rebuilds its anchors from the input shape each call
    dummy = torch.zeros(spec.batch, 3, *spec.imgsz, device=device)
    if spec.half:
        model, dummy = model.half(), dummy.half()

    class FirstOutput(torch.nn.Module):
        """The detection head returns (decoded, raw maps) in eval mode; keep the decoded tensor."""
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    metadata = {"stride": int(max(model.stride)), "task": "detect", "head": type(model.model[-1]).__name__,
                "batch": spec.batch, "imgsz": list(spec.imgsz),
                 "names": dict(model.names), "end2end": bool(getattr(model, "end2end", False)),
                 "args": {"dynamic": spec.dynamic, "half": spec.half}}
    return FirstOutput(model).eval(), dummy, metadata


def _finish(path: Path, spec: ExportSpec, metadata: dict) -> Path:
    """Simplify (as ultralytics does its own), then add ultralytics' metadata, as it writes it, so that
    `YOLO(onnx)` reads the ONNX too."""
    model = onnx.load(str(path))
    if spec.simplify:
        import onnxslim

        model = onnxslim.slim(model)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, str(path))
    return path


def _export_torch(spec: ExportSpec, workdir: Path) -> Path:
    import torch

    model, dummy, metadata = _torch_model(spec, workdir)
    out = workdir / "model.onnx"
    axes = {"images": {0: "batch", 2: "height", 3: "width"},
            "output0": {0: "batch"} if spec.end2end else {0: "batch", 2: "anchors"}}
    with torch.no_grad():
        torch.onnx.export(model, dummy, str(out), opset_version=spec.opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes=axes if spec.dynamic else None, dynamo=False)
    return _finish(out, spec, metadata)


def _export_dynamo(spec: ExportSpec, workdir: Path) -> Path:
    import torch

    model, dummy, metadata = _torch_model(spec, workdir)
    if spec.dynamic and metadata["head"] == heads.RTDETR_HEAD:
        raise StageError("export", "export=dynamo cannot export RT-DETR with a dynamic shape (torch.export fails "
                                   "tracing its decoder); use export=torch or export=ultralytics, or shape=static")
    out = workdir / "model.onnx"
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    with torch.no_grad(), warnings.catch_warnings():
        # by design: the head rebuilds its anchors and strides from the input shape, which torch.export reports
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        torch.onnx.export(model, (dummy,), str(out), opset_version=spec.opset, input_names=["images"],
                          output_names=["output0"], dynamic_shapes=({"x": dims} if spec.dynamic else None),
                          dynamo=True, verbose=False)
    return _finish(out, spec, metadata)


EXPORTERS = {ExportTool.ultralytics.value: _export_ultralytics, ExportTool.torch.value: _export_torch,
             ExportTool.dynamo.value: _export_dynamo}


def cached_onnx(folder: Path) -> OnnxArtifact | None:
    """The ONNX cached in `folder` when it matches its record; None when there is none or it is stale."""
    try:
        artifact = cache.load(folder / "artifact.json", OnnxArtifact.from_dict)
    except cache.Stale as stale:
        log.warning("export: cached %s; re-exporting", stale)
        return None
    if artifact:
        artifact.path, artifact.cached = cache.absolute(artifact.path, folder), True
        log.info("export: cached %s (%.1f MB)", Path(artifact.path).name, artifact.size_bytes / 1e6)
    return artifact


def store_onnx(folder: Path, artifact: OnnxArtifact) -> None:
    """Record `artifact`, whose ONNX is written in `folder`, for `cached_onnx`."""
    cache.save(folder / "artifact.json", {**artifact.to_dict(), "path": Path(artifact.path).name},
               [Path(artifact.path)])


def checker_verdict(model: onnx.ModelProto) -> str:
    """"ok", or onnx.checker's complaint on one line (the backend still gets the file and has its say)."""
    try:
        onnx.checker.check_model(model)
        return "ok"
    except onnx.checker.ValidationError as exc:
        verdict = " ".join(str(exc).split())
        log.info("export: onnx.checker: %s", verdict[:200])
        return verdict


def export_onnx(spec: ExportSpec, cache_dir: Path) -> OnnxArtifact:
    """Export (or reuse) the ONNX for `spec`; raises StageError with the tool's message on failure."""
    name = (f"{spec.tool}-{'dy' if spec.dynamic else 'st'}-{'fp16' if spec.half else 'fp32'}-"
            f"{'e2e-' if spec.end2end else ''}{'nms-' if spec.nms else ''}{spec.key()}")
    folder = Path(cache_dir).absolute() / "onnx" / name
    with cache.locked(folder.with_name(folder.name + ".lock")):  # jobs in parallel export it once
        if artifact := cached_onnx(folder):
            return artifact
        return _export(spec, folder)


def _export(spec: ExportSpec, folder: Path) -> OnnxArtifact:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log.info("export: %s %s %s%s opset %d...", spec.tool, "dynamic" if spec.dynamic else "static",
             "fp16" if spec.half else "fp32", " end2end" if spec.end2end else " nms" if spec.nms else "", spec.opset)
    start = time.perf_counter()
    try:
        produced = EXPORTERS[spec.tool](spec, folder)
        (folder / "model.pt").unlink()  # the weights' working copy; the cache keeps the ONNX
        model = onnx.load(str(produced))
    except StageError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except Exception as exc:  # the tool's own failure is the result
        shutil.rmtree(folder, ignore_errors=True)
        raise StageError("export", f"{spec.tool}: {type(exc).__name__}: {exc}".strip()) from exc
    path = folder / "model.onnx"
    if produced != path:
        shutil.move(produced, path)
    artifact = OnnxArtifact(path=str(path), tool=spec.tool, dynamic=spec.dynamic, end2end=spec.end2end,
                            names=names_of(model), precision=weights_precision(model), signature=signature(model),
                            checker=checker_verdict(model),
                            size_bytes=path.stat().st_size, export_s=time.perf_counter() - start, cached=False)
    store_onnx(folder, artifact)
    log.info("export: done in %.1f s, %.1f MB", artifact.export_s, artifact.size_bytes / 1e6)
    return artifact
