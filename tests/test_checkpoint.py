"""A weights file runs no code: its pickle is checked against runner's allow-list before ultralytics loads it,
in preflight and again on the copy the export stage hands to ultralytics. Hostile checkpoints are the shipped
yolov8n.pt with one more entry whose unpickling would touch a marker file."""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ASSETS, DEFAULT_WEIGHTS, IMGSZ, PRESETS, export_spec
from runner import checkpoint, preflight
from runner.backends.tensorrt.build import EngineCache
from runner.backends.tensorrt.engine_export import EngineExportSpec, _export_and_store
from runner.config import ConfigError
from runner.export import export_onnx
from runner.results import StageError

REFUSED = "which runner does not load: it trusts only torch and ultralytics layers and models, tensors and plain data"


class Shell:
    """os.system(<touch marker>) when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Evaluates(Shell):
    """builtins.eval of the same command."""

    def __reduce__(self):
        return eval, (f"__import__('os').system('touch {self.marker}')",)


class CallsAModel(Shell):
    """A trusted class called as a function: DetectionModel.__init__ evals its yaml's `activation`."""

    def __reduce__(self):
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel, ({"backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [],
                                 "activation": f"__import__('os').system('touch {self.marker}')"},)


class ReachesInit(Shell):
    """A trusted layer's __init__ reached by its dotted name: STACK_GLOBAL at protocol 4, getattr at protocol 2."""

    def __reduce__(self):
        return torch.nn.Conv2d.__init__, (torch.nn.Identity(), 1, 1, 1)


class LayerFunction(Shell):
    """A function of torch.nn.modules, no Module class."""

    def __reduce__(self):
        return torch.nn.modules.module.register_module_forward_hook, (None,)


def with_extra(path: Path, extra, protocol: int = 2) -> Path:
    """The shipped yolov8n.pt plus `extra` under one more key, saved by torch.save."""
    ckpt = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=False)  # the shipped file: trusted
    torch.save({**ckpt, "extra": extra}, path, pickle_protocol=protocol)
    return path


HOSTILE = {  # the object, the protocol, what the one line says the pickle does
    "os.system": (Shell, 2, "refers to posix.system"),
    "eval": (Evaluates, 2, "refers to builtins.eval"),
    "model-called": (CallsAModel, 2, "calls ultralytics.nn.tasks.DetectionModel"),
    "dotted-stack-global": (ReachesInit, 4, "refers to torch.nn.modules.conv.Conv2d.__init__"),
    "getattr": (ReachesInit, 2, "calls builtins.getattr(Conv2d, '__init__')"),
    "layer-function": (LayerFunction, 2, "refers to torch.nn.modules.module.register_module_forward_hook"),
}


@pytest.mark.parametrize("cls,protocol,says", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path, cls, protocol, says):
    marker = tmp_path / "marker"
    bad = with_extra(tmp_path / "bad.pt", cls(marker), protocol)
    with pytest.raises(ConfigError) as info:
        preflight.check_weights(str(bad))
    assert str(info.value) == f"model.weights: {bad} {says}, {REFUSED}"
    assert not marker.exists()


def raw_checkpoint(path: Path, payload: bytes) -> Path:
    """A zip archive as torch.save lays it out, holding `payload` as its data.pkl."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    return path


RAW = {  # protocol 2 opcodes no torch.save writes: the state of a trusted function set, a layer class appended to
    "build-on-a-function": (b"\x80\x02ctorch._utils\n_rebuild_parameter\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s"
                            b"\x86b.", "sets the state of torch._utils._rebuild_parameter"),
    "append-to-a-class": (b"\x80\x02ctorch.nn.modules.container\nModuleList\n(Ne.",
                          "appends to torch.nn.modules.container.ModuleList"),
}


@pytest.mark.parametrize("payload,says", RAW.values(), ids=RAW.keys())
def test_pickle_opcodes_touch_only_what_they_made(tmp_path, payload, says):
    defaults = torch._utils._rebuild_parameter.__defaults__
    bad = raw_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(ConfigError) as info:
        checkpoint.verify(bad)
    assert str(info.value) == f"model.weights: {bad} {says}, {REFUSED}"
    assert torch._utils._rebuild_parameter.__defaults__ == defaults


@pytest.mark.parametrize("tool", ["ultralytics", "torch"])
def test_the_export_stage_refuses_a_file_swapped_after_preflight(tmp_path, tool):
    weights, marker = tmp_path / "best.pt", tmp_path / "marker"
    shutil.copyfile(DEFAULT_WEIGHTS, weights)
    preflight.check_weights(str(weights))  # preflight passes
    with_extra(weights, Shell(marker))  # then the file changes
    with pytest.raises(StageError) as info:
        export_onnx(export_spec(tool, weights=weights), tmp_path / "cache")
    assert info.value.stage == "export"
    assert info.value.message == f"model.weights: {weights} refers to posix.system, {REFUSED}"
    assert not marker.exists()
    assert [p.name for p in (tmp_path / "cache" / "onnx").iterdir() if p.suffix != ".lock"] == []


def test_the_engine_export_refuses_its_copy_before_tensorrt(tmp_path):
    """build=ultralytics checks its copy before anything else: no TensorRT is reached (none is passed)."""
    marker = tmp_path / "marker"
    bad = with_extra(tmp_path / "best.pt", Shell(marker))
    spec = EngineExportSpec(weights=str(bad), imgsz=IMGSZ, dynamic=False, half=False, workspace_gib=1,
                            optimization_level=None, opset=17, simplify=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(StageError) as info:
        _export_and_store(None, spec, EngineCache(spec.cache_dir, suffix=".engine"), "key", "gpu")
    assert (info.value.stage, info.value.message) == ("build", f"model.weights: {bad} refers to posix.system, "
                                                               f"{REFUSED}")
    assert not marker.exists()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_passes(preset):
    checkpoint.verify(ASSETS / f"{preset}.pt")


def test_what_ultralytics_writes_passes(tmp_path, monkeypatch):
    """Written by ultralytics: a tiny training's checkpoints (the one saved mid-run, with its optimizer state and
    model.args an IterableSimpleNamespace, and the final best.pt), a fused model saved (its pickle reads a layer's
    forward_fuse with getattr), an RT-DETR built from its yaml; and numpy scalars as older trainings stored."""
    from ultralytics import RTDETR, YOLO

    from runner.synthetic import make_dataset

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # ultralytics' own MLflow logging
    saved, mid = [], tmp_path / "mid.pt"
    model = YOLO("yolov8n.yaml")
    model.add_callback("on_model_save", lambda trainer: saved.append(shutil.copyfile(trainer.last, mid)))
    model.train(data=str(make_dataset(tmp_path / "shapes", train=4, val=2)), epochs=1, imgsz=32, batch=2,
                device="cpu", workers=0, project=str(tmp_path / "train"), name="tiny", plots=False, amp=False,
                val=False, verbose=False)
    fused = YOLO(str(DEFAULT_WEIGHTS))
    fused.fuse()
    fused.save(tmp_path / "fused.pt")
    RTDETR("rtdetr-l.yaml").save(tmp_path / "rtdetr.pt")
    with_extra(tmp_path / "numpy.pt", {"best_fitness": np.float64(0.5), "dtype": np.dtype("float32")})
    assert saved, "training saved no checkpoint mid-run"
    for path in [mid, Path(model.trainer.best), tmp_path / "fused.pt", tmp_path / "rtdetr.pt", tmp_path / "numpy.pt"]:
        checkpoint.verify(path)


def test_a_checkpoint_with_a_missing_tensor_record_is_damaged(tmp_path):
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(DEFAULT_WEIGHTS) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("/data/0"):
                target.writestr(item, source.read(item))
    with pytest.raises(ConfigError, match=r"is a damaged checkpoint \(UnpicklingError: unknown tensor storage"):
        checkpoint.verify(damaged)

