"""Data that does not fit the model, and what a row says it did not check: labels found as ultralytics finds them,
class ids the model lacks refused (file and line), class names that differ warned, shapes off the stride named,
and a static batch above 1 exported, validated and timed at that batch.

Refusals run `runner` in this process (conftest's `runner_main`); the rows come from real 128-px sweeps.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from conftest import export_spec, run_cli
from runner.backends.onnxruntime import OrtRunner
from runner.config import ValidateConfig
from runner.data import labels_folder, select
from runner.export import export_onnx
from runner.prepost import Chain
from runner.processing import ONE2MANY
from runner.report import cli as report
from runner.report.frame import INACCURATE, read_results, results_frame
from runner.results import VariantResult
from runner.validate import shapes_to_check, validate

USAGE_EXIT = 2
SMALL = ["model.imgsz=128", "bench=quick", "data.limit=2", "tracking.enabled=false", "backend=onnxruntime"]
RANGE_CLASS = "0 0.5 0.5 0.2 0.2\n3 0.4 0.4 0.1 0.1\n"


def images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"im{i}.jpg"), np.full((96, 128, 3), 60 + 40 * i, np.uint8))
    return folder


def labelled(root: Path, text: str = "0 0.5 0.5 0.25 0.25\n") -> Path:
    """root/images/val with its labels in root/labels/val."""
    folder = images(root / "images" / "val")
    (root / "labels" / "val").mkdir(parents=True)
    for image in folder.iterdir():
        (root / "labels" / "val" / f"{image.stem}.txt").write_text(text)
    return folder


def checkpoint(path: Path, names: list[str]) -> Path:
    """An ultralytics detection checkpoint of yolov8n's architecture with `names` as its classes."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    torch.save({"model": model.half()}, path)
    return path


def test_labels_are_found_as_ultralytics_finds_them(tmp_path):
    """The last `/images/` component becomes `/labels/`: an `images` earlier in the path is left alone."""
    from ultralytics.data.utils import img2label_paths

    folder = labelled(tmp_path / "images_proj" / "ds")
    selection = select(folder, None, 2)
    assert labels_folder(folder) == tmp_path / "images_proj" / "ds" / "labels" / "val"
    assert [str(selection.label_of(p)) for p in selection.files] == img2label_paths(selection.files)
    assert selection.note is None


def test_a_class_id_the_model_lacks_is_refused_with_file_and_line(tmp_path, runner_main):
    folder = labelled(tmp_path / "ds", RANGE_CLASS)
    said = runner_main([f"data.images={folder}", f"outputs={tmp_path / 'outputs'}"])
    assert said.returncode == USAGE_EXIT and not (tmp_path / "outputs").exists()
    assert said.stderr.strip().splitlines() == [
        f"runner: error: data.labels: {tmp_path}/ds/labels/val/im0.txt line 2: expected 'class cx cy w h', got "
        f"'3 0.4 0.4 0.1 0.1': class 3 is not one of the model's 3 classes (0 to 2)"]


def test_a_model_with_fewer_classes_than_the_generated_labels_is_refused(tmp_path, runner_main):
    weights = checkpoint(tmp_path / "catdog.pt", ["cat", "dog"])
    said = runner_main([f"model.weights={weights}", f"outputs={tmp_path / 'outputs'}"])
    assert said.returncode == USAGE_EXIT and not (tmp_path / "outputs").exists()
    assert said.stderr.strip().splitlines() == [
        "runner: error: data: the generated data's labels have 3 classes (circle, rectangle, triangle), model catdog "
        "has 2 (cat, dog); give data.images of its classes (YOLO labels as ultralytics finds them), or data=bus to "
        "time it without labels"]


def test_class_names_that_differ_and_bounds_off_the_stride_are_said_before_any_work(tmp_path):
    from runner.preflight import preflight

    weights = checkpoint(tmp_path / "pets.pt", ["cat", "dog", "bird"])
    argv = [f"model.weights={weights}", "shape=dynamic", "profile.min=[1,3,1,640]", f"outputs={tmp_path / 'o'}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        preflight(argv)
    assert printed.getvalue().splitlines() == [
        "runner: warning: pets: class names differ: the model has 0 cat, 1 dog, 2 bird, the data 0 circle, "
        "1 rectangle, 2 triangle; mAP compares class ids",
        "runner: warning: profile default: min [1, 3, 1, 640]: H 1 not a multiple of the stride 32: built, but not "
        "validated there (the row's note names it)"]
    assert not (tmp_path / "o").exists()


def test_the_non_square_shape_is_on_the_stride():
    shapes = dict(shapes_to_check([[1, 3, 321, 320], [1, 3, 640, 640], [1, 3, 640, 650]], 32, True, [640, 640]))
    assert shapes["non_square"] == [1, 3, 480, 640]


def test_a_refused_input_reaches_the_row_whole(export_cache, held_out_images):
    """onnxruntime names the dim it refused on its message's later lines."""
    from runner.data import load_samples

    onnx = export_onnx(export_spec("ultralytics", imgsz=(128, 128)), export_cache)
    samples, selection = load_samples(str(held_out_images), None, 2, Path("unused"))
    with OrtRunner(onnx.path) as runner:
        result = validate(runner, Chain(None, None, 0.25, 0.7, 300, ONE2MANY), None, samples,
                          [("static", [4, 3, 128, 128])], ValidateConfig().fp32, ValidateConfig(), "cpu", [])
    assert result.status == "unchecked"
    assert "index: 0 Got: 4 Expected: 1" in result.reason


def test_a_padded_batch_scores_each_image_once(export_cache, held_out_images):
    """3 images at batch 2: the last input is padded with the third image, which counts once, as at batch 1."""
    from runner.data import load_samples
    from runner.validate import validate_shape

    onnx = export_onnx(export_spec("ultralytics", dynamic=True, imgsz=(128, 128)), export_cache)
    samples, _ = load_samples(str(held_out_images), None, 3, Path("unused"))
    chain, v = Chain(None, None, 0.25, 0.7, 300, ONE2MANY), ValidateConfig()
    with OrtRunner(onnx.path) as runner:
        one, two = (validate_shape(runner, chain, None, samples, [b, 3, 128, 128], v.fp32, v) for b in (1, 2))
    assert one.map50_95 is not None and two.map50_95 == one.map50_95


def test_a_later_stage_error_is_kept_in_error_detail():
    result = VariantResult.from_dict(json.loads(json.dumps(FAILED)))
    result.fail("bench", "RuntimeError: no session", "Traceback ...")
    assert (result.failed_stage, result.error) == ("validate", "no shape could be checked")
    assert result.error_detail == "then bench: RuntimeError: no session\nTraceback ..."


FAILED = {"cell": {"onnx": {"tool": "ultralytics", "shape": "static", "precision": "fp32"},
                   "build": {"tool": "onnxruntime", "shape": "static", "precision": "fp32"}, "model": "yolov8n"},
          "backend": "onnxruntime", "profile": "default", "status": "failed", "failed_stage": "validate",
          "error": "no shape could be checked"}


def run(args: list[str], outputs: Path, cache: Path) -> tuple[VariantResult, dict]:
    """The one variant of `runner <args>` and its summary.csv row, its exports in `cache`."""
    proc = run_cli([*SMALL, *args, f"cache_dir={cache}"], outputs, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder, = (outputs / "runs").iterdir()
    (result,), (row,) = read_results(folder / "results.json"), list(csv.DictReader(open(folder / "summary.csv")))
    return result, row


def test_a_row_names_what_it_could_not_check(tmp_path, capsys, export_cache):
    """No labels, class names that differ, a profile bound off the stride: the row passes as the reference and its
    note, the summary and the grid say what was not checked."""
    folder = images(tmp_path / "ds" / "images" / "val")
    result, row = run([f"data.images={folder}", "data.names=[a,b,c]", "shape=dynamic", "profile.min=[1,3,1,128]",
                       "profile.opt=[1,3,128,128]", "profile.max=[1,3,128,128]"], tmp_path / "outputs", export_cache)
    assert result.status == "ok" and result.validate.status == "reference"
    assert result.validate.unvalidated == ["min"]
    reason = result.validate.reason
    assert reason.startswith("not validated: min [1, 3, 1, 128] (H 1 not a multiple of the stride 32: ")
    assert reason.endswith(f"); no labels: mAP not measured (no <image>.txt in {tmp_path}/ds/labels/val); class "
                           f"names differ: the model has 0 circle, 1 rectangle, 2 triangle, the data 0 a, 1 b, 2 c; "
                           f"mAP compares class ids")
    assert row["error / note"].startswith("not validated: min [1, 3, 1, 128]")
    assert results_frame([result])["mark"].tolist() == [INACCURATE]
    assert report.main(["table", "--results", str(next((tmp_path / "outputs" / "runs").iterdir()) / "results.json"),
                        "--out", str(tmp_path / "table")]) == 0
    assert "|ort dy fp32|△|" in capsys.readouterr().out


def test_a_static_batch_above_one_is_exported_validated_and_timed_at_that_batch(tmp_path, export_cache):
    result, row = run(["shape=static", "shape.opt=[4,3,128,128]", "bench.batch=4"], tmp_path / "outputs",
                      export_cache)
    assert (result.status, row["status"]) == ("ok", "ok")
    assert result.export.tested.signature["inputs"][0]["shape"] == [4, 3, 128, 128]
    assert result.validate.shapes["static"].shape == [4, 3, 128, 128] and result.validate.shapes["static"].map50_95
    assert result.bench.settings["shape"] == [4, 3, 128, 128]
