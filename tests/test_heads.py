"""Heads: the decode comes from what the model says it is (runner.heads), RT-DETR is decoded as ultralytics does,
and every head runner cannot decode is refused in one line naming it, before any export.

Everything is real: ultralytics models built from its own yaml and saved as checkpoints, ultralytics and torch
exports of the rtdetr-n preset, onnxruntime, and `RTDETR(onnx).predict` as the oracle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import ASSETS, export_spec
from runner import heads
from runner.backends.onnxruntime import open_reference
from runner.config import Thresholds, ValidateConfig
from runner.data import Sample, load_samples
from runner.export import export_onnx, signature
from runner.metrics import match_detections
from runner.prepost import Chain
from runner.processing import END2END, ONE2MANY, RTDETR, postprocess, preprocess
from runner.results import ExportResult, OnnxArtifact, StageError
from runner.validate import validate
from runner.variant import output_head

RTDETR_WEIGHTS = ASSETS / "rtdetr-n.pt"
FP16 = Thresholds(5e-2, 5e-2, 5e-3, 0.9, 0.01)
OTHER_TASKS = [("SegmentationModel", "yolov8n-seg.yaml", "segment", "Segment"),
               ("PoseModel", "yolov8n-pose.yaml", "pose", "Pose"), ("OBBModel", "yolov8n-obb.yaml", "obb", "OBB"),
               ("ClassificationModel", "yolov8n-cls.yaml", "classify", "Classify")]


@pytest.fixture(scope="module")
def samples(held_out_images) -> list[Sample]:
    return load_samples(str(held_out_images), None, 4, Path("unused"))[0]


@pytest.mark.parametrize("kind, yaml, task, head", OTHER_TASKS, ids=[t for _, _, t, _ in OTHER_TASKS])
def test_a_head_runner_cannot_decode_is_refused_before_export_naming_it(runner_main, tmp_path, kind, yaml, task,
                                                                        head):
    """A real ultralytics model of another task, saved as a checkpoint the allow-list admits: runner's own check
    names its class, task and head, in preflight (exit 2, nothing made) and again in the export stage."""
    import torch
    import ultralytics.nn.tasks as tasks

    weights = tmp_path / f"{task}.pt"
    torch.save({"model": getattr(tasks, kind)(yaml, nc=3, verbose=False)}, weights)
    said = f"model.weights: {weights} holds a {kind} (task {task}, head {head}); {heads.DECODED}"
    proc = runner_main([f"model.weights={weights}", f"outputs={tmp_path / 'outputs'}"])
    assert (proc.returncode, proc.stderr.strip()) == (2, f"runner: error: {said}")
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(StageError) as failed:
        export_onnx(export_spec("torch", weights=weights), tmp_path / "cache")
    assert (failed.value.stage, failed.value.message) == ("export", said)


def _onnx(path: Path, out_shape: list, metadata: dict) -> OnnxArtifact:
    """An ONNX whose output is its input reshaped to `out_shape`, carrying `metadata`."""
    size = int(np.prod(out_shape))
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "to"], ["output0"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, out_shape)],
                              [helper.make_tensor("to", TensorProto.INT64, [len(out_shape)], out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return OnnxArtifact(str(path), "torch", False, "fp32", signature(model), "ok", 1, 0.0, False,
                        names=["a", "b", "c"])


UNDECODABLE = [([1, 300, 7], {"task": "detect", "head": "Detect"},
                "output0: Detect head: output shape [1, 300, 7] is neither one-to-many (B, 4 + nc = 7, anchors) "
                "nor end-to-end (B, N, 6)"),
               ([1, 300, 7], {"task": "detect", "head": "RTDETRDecoder"},
                "output0: output shape [1, 300, 7] is not RT-DETR's (B, N, 6) [cx, cy, w, h, score, class]"),
               ([1, 39, 8400], {"task": "segment", "head": "Segment"},
                f"the ONNX says task segment, head Segment; {heads.DECODED}"),
               ([1, 300, 6], {"task": "detect", "head": "WorldDetect"},
                f"the ONNX says task detect, head WorldDetect; {heads.DECODED}")]


@pytest.mark.parametrize("shape, metadata, said", UNDECODABLE, ids=["detect-7", "rtdetr-7", "segment", "world"])
def test_an_onnx_runner_cannot_decode_fails_the_export_stage_in_one_line(tmp_path, shape, metadata, said):
    artifact = _onnx(tmp_path / "m.onnx", shape, metadata)
    with pytest.raises(StageError) as failed:
        output_head(ExportResult("w.pt", artifact, artifact))
    assert (failed.value.stage, failed.value.message) == ("export", said)


@pytest.mark.parametrize("head, decode", [("Detect", END2END), ("v10Detect", END2END), ("RTDETRDecoder", RTDETR)])
def test_the_same_output_shape_decodes_as_its_head_says(tmp_path, head, decode):
    """(1, 300, 6) is a YOLO end-to-end head in pixels or RT-DETR's in 0-1: only the metadata tells them apart."""
    artifact = _onnx(tmp_path / "m.onnx", [1, 300, 6], {"task": "detect", "head": head})
    assert output_head(ExportResult("w.pt", artifact, artifact)) == decode


def test_a_detect_head_keeps_its_one_to_many_layout(tmp_path):
    artifact = _onnx(tmp_path / "m.onnx", [1, 7, 8400], {"task": "detect", "head": "Detect"})
    assert output_head(ExportResult("w.pt", artifact, artifact)) == ONE2MANY


def _predict(onnx_path: str, images: list[np.ndarray], imgsz: int) -> list[np.ndarray]:
    from ultralytics import RTDETR as UltralyticsRTDETR

    model = UltralyticsRTDETR(onnx_path)
    results = [model.predict(image, imgsz=imgsz, conf=0.25, verbose=False)[0].boxes for image in images]
    return [np.concatenate([b.xyxy.numpy(), b.conf.numpy()[:, None], b.cls.numpy()[:, None]], 1) for b in results]


@pytest.mark.parametrize("tool", ["ultralytics", "torch", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_rtdetr_decode_matches_ultralytics_predict_on_the_same_onnx(export_cache, samples, tool):
    """runner's stretch and decode against `RTDETR(onnx).predict` at conf 0.25 on held-out images."""
    artifact = export_onnx(export_spec(tool, weights=RTDETR_WEIGHTS), export_cache)
    head = output_head(ExportResult(str(RTDETR_WEIGHTS), artifact, artifact))
    assert head == RTDETR and artifact.signature["outputs"][0]["shape"] == [1, 300, 6]
    runner = open_reference(artifact.path)
    ours = []
    for s in samples:
        blob, boxes = preprocess([s.image], (640, 640), head=head)
        ours += postprocess(runner.infer(blob)["output0"], boxes, 0.25, 0.7, 300, head)
    theirs = _predict(artifact.path, [s.image for s in samples], 640)
    assert sum(len(d) for d in theirs) >= len(samples)  # the model finds the shapes
    f1 = [match_detections(a, b, 0.5)["f1"] for a, b in zip(ours, theirs)]
    assert min(f1) >= 0.99, f1


def test_an_rtdetr_fp16_onnx_validates_against_its_fp32_reference_with_a_real_map(export_cache, samples):
    """The reference is decoded as RT-DETR too: both mAPs are the model's, and they agree."""
    reference = export_onnx(export_spec("ultralytics", weights=RTDETR_WEIGHTS), export_cache)
    tested = export_onnx(export_spec("ultralytics", half=True, weights=RTDETR_WEIGHTS), export_cache)
    with open_reference(tested.path) as runner, open_reference(reference.path) as ref:
        result = validate(runner, Chain(head=RTDETR), ref, samples, [("static", [1, 3, 640, 640])], FP16,
                          ValidateConfig(), "CPUExecutionProvider", [])
    shape = result.shapes["static"]
    assert result.status == "passed" and result.head == RTDETR, result.reason
    assert shape.ref_map50_95 > 0.2 and abs(shape.map50_95 - shape.ref_map50_95) < 0.02
    assert shape.detections.f1 >= 0.95


@pytest.mark.parametrize("tool, head, said", [
    ("torch", {"end2end": True}, "rtdetr-n.pt is an RT-DETR, NMS-free by itself: export.head=end2end applies to "
                                 "YOLO heads; export.head=one2many exports its own head"),
    ("ultralytics", {"nms": True}, "rtdetr-n.pt is an RT-DETR, NMS-free by itself: export.head=nms applies to "
                                   "YOLO heads; export.head=one2many exports its own head"),
    ("dynamo", {"dynamic": True}, "export=dynamo cannot export RT-DETR with a dynamic shape (torch.export fails "
                                  "tracing its decoder); use export=torch or export=ultralytics, or shape=static")])
def test_rtdetr_exports_that_do_not_apply_are_refused_in_one_line(tmp_path, tool, head, said):
    with pytest.raises(StageError) as failed:
        export_onnx(export_spec(tool, weights=RTDETR_WEIGHTS, **head), tmp_path)
    assert (failed.value.stage, failed.value.message) == ("export", said)


def _gpu_missing() -> str | None:
    from runner.backends.tensorrt import compat

    return next((why for ok, why in (compat.trt_available(), compat.cuda_gpu_available()) if not ok), None)


@pytest.mark.gpu
@pytest.mark.parametrize("ends", ["host", "gpu"], ids=["host-pre-post", "gpu-pre-post"])
def test_rtdetr_through_tensorrt_matches_ultralytics_predict(export_cache, samples, tmp_path, ends):
    """A TensorRT fp32 engine of the RT-DETR ONNX, through runner's chain with both ends on the host or on the GPU
    (the GPU stretch, the output copied as it is), against `RTDETR(onnx).predict` on the same ONNX."""
    missing = _gpu_missing()
    if missing:
        pytest.skip(missing)
    from runner.backends.tensorrt.build import BuildSpec, build_engine
    from runner.backends.tensorrt.runtime import TrtRunner

    artifact = export_onnx(export_spec("ultralytics", weights=RTDETR_WEIGHTS), export_cache)
    shape = [1, 3, 640, 640]
    engine = build_engine(BuildSpec(artifact.path, "fp32", "none", shape, shape, shape, 0, 2.0, str(tmp_path)))
    with TrtRunner(engine.artifact) as runner:
        runner.set_shape(tuple(shape))
        on_gpu = ends == "gpu"
        chain = Chain(runner.gpu_letterbox() if on_gpu else None, runner.gpu_score_filter() if on_gpu else None,
                      head=RTDETR)
        ours = [chain.run(runner, [s.image], (640, 640))[0][0] for s in samples]
    theirs = _predict(artifact.path, [s.image for s in samples], 640)
    assert sum(len(d) for d in theirs) >= len(samples)
    f1 = [match_detections(a, b, 0.5)["f1"] for a, b in zip(ours, theirs)]
    assert min(f1) >= 0.99, f1


def test_rtdetr_presets_rank_after_the_yolo_presets_and_before_other_models():
    from runner.report.order import model_key

    assert sorted(["my-model", "rtdetr-n", "yolo26n", "yolov5nu"], key=model_key) == \
        ["yolov5nu", "yolo26n", "rtdetr-n", "my-model"]
