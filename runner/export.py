"""Export stage: weights -> ONNX with ultralytics `model.export` or plain `torch.onnx.export`.

Every ONNX is checked with `onnx.checker` and described by its signature. Exports are cached by a
content key (weights bytes + export settings + tool versions), so a sweep exports each ONNX once.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import onnx

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


class ExportError(RuntimeError):
    """The export tool failed; the message is the tool's own."""


@dataclass(frozen=True)
class ExportSpec:
    weights: str
    tool: str  # ultralytics | torch
    dynamic: bool
    half: bool
    imgsz: tuple[int, int]
    opset: int
    simplify: bool
    device: str = "cpu"

    def key(self) -> str:
        h = hashlib.sha256(Path(self.weights).read_bytes())
        fields = {**asdict(self), "weights": None, "versions": [version("ultralytics"), version("torch"),
                                                                version("onnx")]}
        h.update(json.dumps(fields, sort_keys=True).encode())
        return h.hexdigest()[:16]


@dataclass
class OnnxArtifact:
    path: str
    tool: str
    dynamic: bool
    precision: str  # fp32 | fp16: the dtype of the weights inside the ONNX
    signature: dict
    checker: str  # "ok", or onnx.checker's complaint (the backend still gets the file and has its say)
    size_bytes: int
    export_s: float
    cached: bool


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


def _export_ultralytics(spec: ExportSpec, workdir: Path) -> Path:
    from ultralytics import YOLO

    local = workdir / "model.pt"
    shutil.copyfile(spec.weights, local)  # ultralytics writes the ONNX next to the weights
    out = YOLO(str(local)).export(format="onnx", imgsz=list(spec.imgsz), dynamic=spec.dynamic,
                                  simplify=spec.simplify, opset=spec.opset, quantize=16 if spec.half else None,
                                  device=spec.device, batch=1, verbose=False)
    return Path(out)


def _export_torch(spec: ExportSpec, workdir: Path) -> Path:
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    device = torch.device(spec.device if spec.device == "cpu" else f"cuda:{spec.device}")
    model = load_checkpoint(spec.weights, device=device, inplace=True, fuse=True)[0].float().eval()
    dummy = torch.zeros(1, 3, *spec.imgsz, device=device)
    if spec.half:
        model, dummy = model.half(), dummy.half()

    class FirstOutput(torch.nn.Module):
        """The detection head returns (decoded, raw maps) in eval mode; keep the decoded tensor."""
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    out = workdir / "model.onnx"
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}}
    with torch.no_grad():
        torch.onnx.export(FirstOutput(model), dummy, str(out), opset_version=spec.opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes=axes if spec.dynamic else None, dynamo=False)
    if spec.simplify:
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(str(out))), str(out))
    return out


EXPORTERS = {"ultralytics": _export_ultralytics, "torch": _export_torch}


def export_onnx(spec: ExportSpec, cache_dir: Path, progress=print) -> OnnxArtifact:
    """Export (or reuse) the ONNX for `spec`; raises ExportError with the tool's message on failure."""
    folder = Path(cache_dir) / "onnx" / f"{spec.tool}-{'dy' if spec.dynamic else 'st'}-" \
                                        f"{'fp16' if spec.half else 'fp32'}-{spec.key()}"
    meta = folder / "artifact.json"
    if meta.exists():
        artifact = OnnxArtifact(**json.loads(meta.read_text()))
        artifact.cached = True
        progress(f"export: cached {Path(artifact.path).name} ({artifact.size_bytes / 1e6:.1f} MB)")
        return artifact
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    progress(f"export: {spec.tool} {'dynamic' if spec.dynamic else 'static'} "
             f"{'fp16' if spec.half else 'fp32'} opset {spec.opset}...")
    start = time.perf_counter()
    try:
        produced = EXPORTERS[spec.tool](spec, folder)
        model = onnx.load(str(produced))
    except Exception as exc:  # the tool's own failure is the result
        shutil.rmtree(folder, ignore_errors=True)
        raise ExportError(f"{type(exc).__name__}: {exc}".strip()) from exc
    try:
        onnx.checker.check_model(model)
        checker = "ok"
    except onnx.checker.ValidationError as exc:
        checker = " ".join(str(exc).split())
        progress(f"export: onnx.checker: {checker[:200]}")
    path = folder / "model.onnx"
    if produced != path:
        shutil.move(produced, path)
    artifact = OnnxArtifact(path=str(path), tool=spec.tool, dynamic=spec.dynamic,
                            precision=weights_precision(model), signature=signature(model), checker=checker,
                            size_bytes=path.stat().st_size, export_s=time.perf_counter() - start, cached=False)
    meta.write_text(json.dumps(asdict(artifact), indent=1))
    progress(f"export: done in {artifact.export_s:.1f} s, {artifact.size_bytes / 1e6:.1f} MB")
    return artifact
