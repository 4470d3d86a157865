"""The model as a matrix dimension: the five presets, both head formats, weights loaded as given, validation
that can fail, and a sweep of every preset through both exporters with one grid per model.

Everything runs for real on the CPU: ultralytics and torch exports, onnxruntime, ultralytics' own `predict`
on the same ONNX, and the `python -m runner` CLI with MLflow on sqlite.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from conftest import ASSETS, END2END_PRESETS, IMGSZ, PRESETS, SMALL_IMGSZ, UNTIMED, export_spec, run_cli, run_module
from runner.backends.onnxruntime import open_reference
from runner.config import Thresholds, ValidateConfig
from runner.data import Sample, load_samples
from runner.export import export_onnx
from runner.metrics import match_detections
from runner.prepost import Chain
from runner.processing import END2END, ONE2MANY, UnknownHead, head_format, postprocess, preprocess
from runner.results import StageError
from runner.validate import NO_REFERENCE_DETECTIONS, validate, validate_shape

FP16 = Thresholds(5e-2, 5e-2, 5e-3, 0.9, 0.01)


@pytest.fixture(scope="module")
def samples(held_out_images) -> list[Sample]:
    return load_samples(str(held_out_images), None, 8, Path("unused"))[0]


def test_every_preset_composes_names_itself_and_ships_its_weights():
    from runner.preflight import preflight

    configs = preflight([f"model={','.join(PRESETS)}", "-m"])
    assert sorted(c.model.label for c in configs) == sorted(PRESETS)  # composed in launch order (longest first)
    assert all(Path(c.model.weights) == ASSETS / f"{c.model.label}.pt" and Path(c.model.weights).is_file()
               for c in configs)
    named, = preflight(["model=yolo11n", "model.name=my-detector"])
    assert named.model.label == "my-detector"


@pytest.mark.parametrize("shape, classes, head", [
    ([1, 7, 8400], 3, ONE2MANY), (["batch", 7, "anchors"], 3, ONE2MANY), ([1, 300, 6], 3, END2END),
    (["batch", 300, 6], 3, END2END), ([1, 6, 8400], 2, ONE2MANY), ([1, 300, 6], 2, END2END),
    ([1, 84, 8400], None, ONE2MANY), (["batch", 300, 6], None, END2END)])
def test_the_head_format_comes_from_the_output_shape_and_the_class_count(shape, classes, head):
    assert head_format(shape, classes) == head


@pytest.mark.parametrize("shape", [[1, 84, 8400], [1, 8400], [1, 300, 7], ["batch", "c", "anchors"]])
def test_an_unknown_yolo_output_is_named_by_its_shape(shape):
    """The YOLO layouts; the refusal of a whole ONNX, naming its head, is in test_heads.py."""
    with pytest.raises(UnknownHead, match=r"^output shape .* is neither one-to-many"):
        head_format(shape, 3)


def _ultralytics_detections(onnx_path: str, images: list[np.ndarray]) -> list[np.ndarray]:
    from ultralytics import YOLO

    model = YOLO(onnx_path, task="detect")
    out = []
    for image in images:
        boxes = model.predict(image, imgsz=IMGSZ[0], conf=0.25, iou=0.7, verbose=False)[0].boxes
        out.append(np.concatenate([boxes.xyxy.numpy(), boxes.conf.numpy()[:, None], boxes.cls.numpy()[:, None]], 1))
    return out


CASES = [(m, tool, False) for m in PRESETS for tool in ("ultralytics", "torch")] + \
        [(m, tool, True) for m in END2END_PRESETS for tool in ("ultralytics", "torch")]


@pytest.mark.parametrize("model, tool, end2end", CASES,
                         ids=[f"{m}-{t}-{'e2e' if e else 'one2many'}" for m, t, e in CASES])
def test_our_decode_matches_ultralytics_predict_on_the_same_onnx(export_model, samples, model, tool, end2end):
    artifact = export_model(tool, model=model, end2end=end2end)
    output = artifact.signature["outputs"][0]
    head = head_format(output["shape"], len(artifact.names))
    assert head == (END2END if end2end else ONE2MANY) and artifact.names == ["circle", "rectangle", "triangle"]
    assert output["shape"] == ([1, 300, 6] if end2end else [1, 7, 8400])
    runner = open_reference(artifact.path)
    ours = []
    for s in samples:
        blob, boxes = preprocess([s.image], IMGSZ)
        ours += postprocess(runner.infer(blob)[output["name"]], boxes, 0.25, 0.7, 300, head)
    theirs = _ultralytics_detections(artifact.path, [s.image for s in samples])
    assert sum(len(d) for d in theirs) >= len(samples)  # the model finds the shapes
    f1 = [match_detections(a, b, 0.5)["f1"] for a, b in zip(ours, theirs)]
    assert min(f1) >= 0.99, f1


@pytest.mark.parametrize("tool", ["ultralytics", "torch"])
def test_end2end_export_of_a_model_without_a_one_to_one_head_fails_in_one_line(tool, tmp_path):
    with pytest.raises(StageError) as failed:
        export_onnx(export_spec(tool, weights=ASSETS / "yolo11n.pt", end2end=True), tmp_path)
    assert failed.value.stage == "export"
    assert failed.value.message.startswith("yolo11n.pt has no one-to-one (NMS-free) head; export.head=end2end")


def test_an_export_with_nms_in_the_graph_gives_the_host_nms_detections(export_model, samples):
    """export.head=nms: ultralytics' NonMaxSuppression inside the ONNX, (1, 300, 6), decoded by score alone, finds
    what the one-to-many head with our host NMS finds, on onnxruntime."""
    in_graph, host = export_model("ultralytics", nms=True), export_model("ultralytics")
    assert in_graph.signature["outputs"][0]["shape"] == [1, 300, 6]
    assert "NonMaxSuppression" in {node.op_type for node in onnx.load(in_graph.path).graph.node}
    dets = {}
    for name, artifact in (("in_graph", in_graph), ("host", host)):
        head = head_format(artifact.signature["outputs"][0]["shape"], len(artifact.names))
        runner, dets[name] = open_reference(artifact.path), []
        for s in samples:
            blob, boxes = preprocess([s.image], IMGSZ)
            dets[name] += postprocess(runner.infer(blob)["output0"], boxes, 0.25, 0.7, 300, head)
    assert sum(len(d) for d in dets["host"]) >= len(samples)
    f1 = [match_detections(a, b, 0.5)["f1"] for a, b in zip(dets["in_graph"], dets["host"])]
    assert min(f1) >= 0.99, f1


@pytest.mark.parametrize("tool", ["torch", "dynamo"])
def test_an_nms_export_by_another_tool_fails_in_one_line(tmp_path, tool):
    with pytest.raises(StageError) as failed:
        export_onnx(export_spec(tool, nms=True), tmp_path)
    assert failed.value.stage == "export"
    assert failed.value.message.startswith(f"export.head=nms is ultralytics' export option (nms=True); export={tool}")


@pytest.mark.parametrize("tool", ["ultralytics", "torch"])
def test_a_renamed_weights_file_exports_offline_as_given(tool, tmp_path, monkeypatch):
    """ultralytics renames a file called yolov5n.pt to yolov5nu.pt and downloads that; ours is loaded as is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    shutil.copyfile(ASSETS / "yolov5nu.pt", "yolov5n.pt")
    artifact = export_onnx(export_spec(tool, weights="yolov5n.pt", imgsz=SMALL_IMGSZ), tmp_path / "cache")
    assert artifact.names == ["circle", "rectangle", "triangle"]  # our 3-class model, not a COCO download
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "yolov5n.pt"]  # nothing fetched beside it


def host(head: str) -> Chain:
    """The host chain (pre and post on the CPU) with the default thresholds, decoding `head`."""
    v = ValidateConfig()
    return Chain(None, None, v.conf, v.nms_iou, v.max_det, head)


def _blank(n: int) -> list[Sample]:
    return [Sample(f"grey{i}.jpg", np.full((480, 640, 3), 114, np.uint8)) for i in range(n)]


def test_no_reference_detections_is_said_not_scored_as_f1_one(export_model):
    tested, reference = (open_reference(export_model("ultralytics", half=half).path) for half in (True, False))
    check = validate_shape(tested, host(ONE2MANY), reference, _blank(2), [1, 3, 640, 640], FP16, ValidateConfig())
    assert check.detections is None and check.reason == NO_REFERENCE_DETECTIONS
    assert check.status == "passed" and check.rel_l2 < FP16.max_rel_l2  # on what was measured: the tensors
    result = validate(tested, host(ONE2MANY), reference, _blank(2), [("static", [1, 3, 640, 640])], FP16,
                      ValidateConfig(), "CPUExecutionProvider", [])
    assert result.status == "passed" and NO_REFERENCE_DETECTIONS in result.reason
    assert "det_f1" not in result.aggregate() and "rel_l2" in result.aggregate()


def test_an_end2end_output_with_nothing_detected_cannot_pass(export_model):
    tested, reference = (open_reference(export_model("ultralytics", half=half, model="yolo26n", end2end=True).path)
                         for half in (True, False))
    result = validate(tested, host(END2END), reference, _blank(2), [("static", [1, 3, 640, 640])], FP16,
                      ValidateConfig(), "CPUExecutionProvider", [])
    assert result.status == "unchecked" and "nothing compared" in result.reason


def test_an_end2end_output_is_compared_as_detections(export_model, samples):
    tested, reference = (open_reference(export_model("torch", half=half, model="yolov10n", end2end=True).path)
                         for half in (True, False))
    result = validate(tested, host(END2END), reference, samples, [("static", [1, 3, 640, 640])], FP16,
                      ValidateConfig(), "CPUExecutionProvider", [])
    assert result.status == "passed" and result.head == END2END
    assert result.shapes["static"].tensors == {} and result.aggregate()["det_f1"] >= 0.99
    assert "tensors not compared" in result.reason


@pytest.mark.slow
def test_a_sweep_of_every_preset_through_both_exporters(tmp_path, export_cache):
    """The issue's sweep on onnxruntime: every cell named by its model, one grid per model, keys per model."""
    outputs = tmp_path / "outputs"
    proc = run_cli(["-m", f"model={','.join(PRESETS)}", "export=ultralytics,torch", "precision=fp16",
                    "backend=onnxruntime", "data.limit=4", *UNTIMED, f"cache_dir={export_cache}"], outputs,
                   timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = max((outputs / "sweeps").iterdir())
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["model"]) == sorted(PRESETS * 2)
    assert set(summary["status"]) == {"ok"} and set(summary["validation"]) == {"passed"}
    assert summary["det_f1"].min() >= 0.95  # fp16 moves a few borderline boxes of the harder set
    results = json.loads((sweep / "results.json").read_text())
    assert sorted(r["cell"]["model"] for r in results) == sorted(PRESETS * 2)

    report = tmp_path / "report"
    db = f"sqlite:///{outputs / 'mlflow.db'}"
    table = run_module(["table", "--tracking-uri", db, "--out", str(report)])
    assert table.returncode == 0, table.stderr
    markdown = (report / "table.md").read_text()
    assert [line[3:] for line in markdown.splitlines() if line.startswith("## ") and line != "## Details"] == \
        ["yolov5nu", "yolov8n", "yolov10n", "yolo11n", "yolo26n"]
    assert markdown.count("|ort st fp16|O|O|") == len(PRESETS)  # each grid: ul and tc columns, both O
    baseline = tmp_path / "baseline.json"
    assert run_module(["baseline", "--tracking-uri", db, "--out", str(baseline)]).returncode == 0
    keys = json.loads(baseline.read_text())["cells"]
    assert sorted(keys) == sorted(f"{m} | {o} st fp16 | ort st fp16" for m in PRESETS for o in ("ul", "tc"))
