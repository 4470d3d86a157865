"""Export stage: the three tools x static/dynamic x fp32/fp16, for real (ultralytics, and torch.onnx.export with
the TorchScript and the dynamo exporter)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import DEFAULT_WEIGHTS, IMGSZ, OPSETS, SMALL_IMGSZ, export_spec
from runner.export import export_onnx
from runner.metrics import tensor_metrics
from runner.processing import preprocess
from runner.results import StageError

TOOLS = ("ultralytics", "torch", "dynamo")
VARIANTS = [(tool, dynamic, half) for tool in TOOLS for dynamic in (False, True) for half in (False, True)]
IDS = [f"{t}-{'dy' if d else 'st'}-{'fp16' if h else 'fp32'}" for t, d, h in VARIANTS]
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
SMALL = {"imgsz": SMALL_IMGSZ}  # the cache and failure tests need no 640 px


def run(path: str, blob: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    feed = blob.astype(np.float16 if inp.type == "tensor(float16)" else np.float32)
    return np.asarray(session.run(None, {inp.name: feed})[0], np.float32)


@pytest.fixture(scope="module")
def blob(held_out_images) -> np.ndarray:
    image = cv2.imread(str(sorted(held_out_images.iterdir())[0]))
    return preprocess([image], IMGSZ)[0]


@pytest.mark.parametrize("tool,dynamic,half", VARIANTS, ids=IDS)
def test_export_records_signature_and_precision(export_model, tool, dynamic, half):
    artifact = export_model(tool, dynamic, half)
    path = Path(artifact.path)
    assert path.is_file() and path.name == "model.onnx"
    assert artifact.size_bytes == path.stat().st_size
    assert (artifact.tool, artifact.dynamic) == (tool, dynamic)
    assert artifact.precision == ("fp16" if half else "fp32")
    assert isinstance(artifact.checker, str) and artifact.checker
    if not half:
        assert artifact.checker == "ok"

    sig = artifact.signature
    assert sig["opset"] == OPSETS[tool]
    assert [i["name"] for i in sig["inputs"]] == ["images"]
    assert [o["name"] for o in sig["outputs"]] == ["output0"]
    (inp,), (out,) = sig["inputs"], sig["outputs"]
    if dynamic:
        assert inp["shape"][1] == 3 and out["shape"][1] == 7
        assert all(isinstance(d, str) and d for d in (inp["shape"][0], inp["shape"][2], inp["shape"][3])), inp
        assert isinstance(out["shape"][0], str) and isinstance(out["shape"][2], str), out
    else:
        assert inp["shape"] == [1, 3, 640, 640]
        assert out["shape"] == [1, 7, 8400]  # 4 box + 3 classes, 80*80 + 40*40 + 20*20 anchors
    if not half:
        assert inp["dtype"] == out["dtype"] == "float32"
    assert inp["dtype"] in ("float32", "float16") and out["dtype"] in ("float32", "float16")

    # what was recorded is what the file holds, as onnxruntime sees it
    session = ort.InferenceSession(artifact.path, providers=["CPUExecutionProvider"])
    for recorded, actual in zip(sig["inputs"] + sig["outputs"], session.get_inputs() + session.get_outputs()):
        assert recorded["name"] == actual.name
        assert recorded["dtype"] == ORT_TYPES[actual.type]
        assert recorded["shape"] == list(actual.shape)
    initializers = onnx.load(artifact.path, load_external_data=False).graph.initializer
    fp16_bytes = sum(len(i.raw_data) for i in initializers if i.data_type == onnx.TensorProto.FLOAT16)
    assert (fp16_bytes > 0) == half


@pytest.mark.parametrize("tool", TOOLS)
def test_fp16_export_is_smaller_and_close_to_fp32(export_model, blob, tool):
    fp32, fp16 = export_model(tool, False, False), export_model(tool, False, True)
    assert fp16.size_bytes < 0.6 * fp32.size_bytes
    m = tensor_metrics(run(fp16.path, blob), run(fp32.path, blob), atol=5e-2, rtol=5e-2)
    assert 0 < m["rel_l2"] < 5e-3  # really fp16, and within the fp16 validation limit
    assert m["cosine"] > 0.9999


@pytest.mark.parametrize("tool", ["torch", "dynamo"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_every_tool_exports_the_same_model(export_model, blob, dynamic, tool):
    a, b = export_model("ultralytics", dynamic, False), export_model(tool, dynamic, False)
    ya, yb = run(a.path, blob), run(b.path, blob)
    assert ya.shape == yb.shape == (1, 7, 8400)
    m = tensor_metrics(yb, ya, atol=1e-3, rtol=1e-3)
    assert m["rel_l2"] < 1e-5, m
    assert m["allclose_rate"] == 1.0, m


def test_dynamic_exports_run_at_other_shapes(export_model, held_out_images):
    image = cv2.imread(str(sorted(held_out_images.iterdir())[1]))
    blob2, _ = preprocess([image, image], (480, 640))
    outs = [run(export_model(tool, True, False).path, blob2) for tool in TOOLS]
    assert all(out.shape == (2, 7, 60 * 80 + 30 * 40 + 15 * 20) for out in outs)
    assert all(tensor_metrics(out, outs[0], 1e-3, 1e-3)["rel_l2"] < 1e-5 for out in outs[1:])


def test_static_export_rejects_other_shapes(export_model, held_out_images):
    image = cv2.imread(str(sorted(held_out_images.iterdir())[1]))
    blob2, _ = preprocess([image], (480, 640))
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        run(export_model("ultralytics", False, False).path, blob2)


def test_second_export_is_cached(tmp_path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level("INFO", logger="runner.export")
    first = export_onnx(export_spec("torch", **SMALL), cache)
    assert first.cached is False
    assert any("export: done" in m for m in caplog.messages)
    mtime = Path(first.path).stat().st_mtime_ns
    caplog.clear()
    second = export_onnx(export_spec("torch", **SMALL), cache)
    assert second.cached is True
    assert caplog.messages and all("cached" in m for m in caplog.messages)
    assert second.path == first.path and Path(second.path).stat().st_mtime_ns == mtime  # not rewritten
    assert second.signature == first.signature and second.size_bytes == first.size_bytes
    assert json.loads((Path(first.path).parent / "artifact.json").read_text())["cached"] is False
    # a different export setting is a different cache entry
    other = export_onnx(export_spec("torch", dynamic=True, **SMALL), cache)
    assert other.cached is False and Path(other.path).parent != Path(first.path).parent
    assert len([p for p in (cache / "onnx").iterdir() if p.is_dir()]) == 2  # beside them: their lock files


def test_cache_key_follows_weight_bytes_and_settings(tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copyfile(DEFAULT_WEIGHTS, copy)
    assert export_spec("torch", weights=copy).key() == export_spec("torch").key()  # content, not path
    changed = tmp_path / "changed.pt"
    changed.write_bytes(DEFAULT_WEIGHTS.read_bytes() + b"\0")
    assert export_spec("torch", weights=changed).key() != export_spec("torch").key()
    keys = {export_spec("torch").key(), export_spec("ultralytics").key(), export_spec("torch", dynamic=True).key(),
            export_spec("torch", half=True).key(), export_spec("torch", opset=18).key()}
    assert len(keys) == 5


def test_ultralytics_failure_is_a_stage_error_with_its_message(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(StageError) as info:
        export_onnx(export_spec("ultralytics", opset=1, **SMALL), cache)
    message = info.value.message
    assert info.value.stage == "export"
    assert message.startswith("ultralytics: AssertionError: ")
    assert "opset>=9" in message and "opset=1" in message
    assert [p.name for p in (cache / "onnx").iterdir() if p.suffix != ".lock"] == []  # nothing half-written left


def test_torch_failure_is_a_stage_error_with_its_message(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(StageError) as info:
        export_onnx(export_spec("torch", opset=1, **SMALL), cache)
    assert info.value.stage == "export"
    assert "Unsupported: ONNX export of operator" in info.value.message
    assert [p.name for p in (cache / "onnx").iterdir() if p.suffix != ".lock"] == []


def test_missing_weights_is_an_error_before_any_export(tmp_path):
    with pytest.raises(FileNotFoundError):
        export_onnx(export_spec("torch", weights=tmp_path / "missing.pt"), tmp_path / "cache")
