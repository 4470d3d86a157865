"""`runner table|baseline|check` against a real MLflow sqlite store holding one logged sweep.

The variant results are typed `VariantResult`s built by hand and logged with the real `Tracker`, so the
report reads exactly what a sweep leaves behind.
"""
import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_module
from mlflow.tracking import MlflowClient

from runner.report import cli, gate, render
from runner.report.frame import read_results, results_frame, runs_frame
from runner.results import (BenchResult, BuildResult, BuildVariant, Cell, DetectionMetrics, ExportResult, OnnxArtifact,
                            OnnxVariant, ShapeCheck, Stats, TensorMetrics, ValidateResult, VariantResult)
from runner.sweep import JobRecord
from runner.track import Tracker

EXPECTED_MATRIX = """\
|build ↓ onnx →|ul st fp32|ul dy fp32|ul st fp16|tc st fp32|tc dy fp32|tc dy fp16|dynamo dy fp32|
|---|---|---|---|---|---|---|---|
|trt st fp32|O|O|-|O|X|-|-|
|trt dy fp32|-|O|-|-|-|-|O|
|trt st fp16|-|-|X|-|-|-|-|
|trt dy fp16|-|-|-|-|-|-|-|
|ul-trt dy fp16|-|O|-|-|-|-|-|
|ort st fp32|R|-|-|-|-|-|-|"""
EXPECTED_SECOND_MODEL = """\
|trt ↓ onnx →|ul st fp32|ul st fp32 e2e|
|---|---|---|
|trt st fp32|O|O|"""
BUILD_ERROR = "[TRT] Error Code 4: Internal Error (profile has no dimensions for input 'images')\nsecond line"
TOOLS = {"ul": "ultralytics", "tc": "torch", "dynamo": "dynamo", "trt": "tensorrt_api", "ul-trt": "ultralytics",
         "ort": "onnxruntime"}
SHAPES = {"st": "static", "dy": "dynamic"}


def stats(p50: float) -> Stats:
    return Stats(mean=p50 * 1.02, p50=p50, p90=p50 * 1.1, p99=p50 * 1.3, std=p50 * 0.05, n=50)


def variant(onnx: str, build: str, status: str = "ok", failed_stage: str | None = None, error: str | None = None,
            infer_ms: float = 2.0, build_s: float = 30.0, model: str = "yolov8n") -> VariantResult:
    """A variant result as `runner.variant.run_variant` leaves it, for the cell '<model> | <onnx> | <build>'."""
    (tool, onnx_shape, onnx_precision, *e2e), (build_tool, shape, precision) = onnx.split(), build.split()
    cell = Cell(OnnxVariant(TOOLS[tool], SHAPES[onnx_shape], onnx_precision, "end2end" if e2e else "one2many"),
                BuildVariant(TOOLS[build_tool], SHAPES[shape], precision), model)
    backend = "onnxruntime" if build_tool == "ort" else "tensorrt"
    result = VariantResult(cell=cell, backend=backend, profile="default", status=status,
                           failed_stage=failed_stage, error=error,
                           environment={"python": "3.11.7", "tensorrt": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3"})
    if status == "skipped":
        return result
    output = [1, 300, 6] if e2e else [1, 7, 8400]
    onnx_file = OnnxArtifact(path=f"cache/{tool}-{onnx_shape}-{onnx_precision}/model.onnx", tool=TOOLS[tool],
                             dynamic=onnx_shape == "dy", precision=onnx_precision, checker="ok",
                             signature={"inputs": [{"name": "images", "shape": [1, 3, 640, 640], "dtype": "float32"}],
                                        "outputs": [{"name": "output0", "shape": output, "dtype": "float32"}],
                                        "opset": 17},
                             size_bytes=12_000_000, export_s=4.0, cached=False, end2end=bool(e2e),
                             names=["circle", "rectangle", "triangle"])
    result.export = ExportResult(weights="best.pt", reference=onnx_file, tested=onnx_file)
    result.build = BuildResult(tool=cell.build.tool, artifact="engine.plan", profile=[[1, 3, 640, 640]] * 3,
                               build_s=build_s, size_bytes=9_000_000, optimization_level=3, num_layers=120)
    if failed_stage == "build":
        return result
    reference = backend == "onnxruntime"
    check = ShapeCheck([1, 3, 640, 640], "reference" if reference else "passed", map50=0.99, map50_95=0.93)
    if not reference:
        passed = failed_stage != "validate"
        check.status = "passed" if passed else "failed"
        check.tensors = {"output0": TensorMetrics(0.01, 0.001, 1e-6 if passed else 0.2, 1.0, 1.0)}
        check.detections = DetectionMetrics(1.0, 1.0, 1.0 if passed else 0.6, 0.99, 0.01, 40, 40)
    result.validate = ValidateResult(status=check.status, shapes={"static": check}, thresholds={},
                                     reference_provider="CPUExecutionProvider", images=16,
                                     headline_shape=[1, 3, 640, 640])
    result.bench = BenchResult(preprocess=stats(0.8), infer=stats(infer_ms), postprocess=stats(0.5),
                               e2e=stats(infer_ms + 1.4), compute=stats(infer_ms * 0.95),
                               settings={"warmup": 20, "iters": 200, "cuda_graph": False, "shape": [1, 3, 640, 640]})
    return result


RESULTS = [
    variant("ul st fp32", "trt st fp32", infer_ms=1.9),
    variant("ul dy fp32", "trt st fp32", infer_ms=2.1),
    variant("ul dy fp32", "trt dy fp32", infer_ms=2.4, build_s=0.2),  # an engine-cache hit
    variant("tc st fp32", "trt st fp32", infer_ms=2.0),
    variant("tc dy fp32", "trt st fp32", "failed", "build", BUILD_ERROR),
    variant("ul st fp16", "trt st fp16", "failed", "validate", "static [1, 3, 640, 640]: rel-L2 2.00e-01",
            infer_ms=1.1),
    variant("tc dy fp16", "trt dy fp16", "skipped", error="tensorrt is not installed"),
    variant("dynamo dy fp32", "trt dy fp32", infer_ms=2.3),
    variant("ul dy fp32", "ul-trt dy fp16", infer_ms=1.2),
    variant("ul st fp32", "trt st fp32", infer_ms=1.7, model="yolo26n"),
    variant("ul st fp32 e2e", "trt st fp32", infer_ms=1.6, model="yolo26n"),
    variant("ul st fp32", "ort st fp32", infer_ms=60.0),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep logged to a fresh sqlite store: (tracking uri, sweep id, results.json path)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, "runner", str(root / "mlartifacts"))
    sweep_id = tracker.start_sweep("sweep 12 variants", {"overrides": "export=ultralytics,torch,dynamo"})
    for result in RESULTS:
        tracker.log_variant(sweep_id, record(result, root, {"export": {"tool": result.cell.onnx.tool}}))
    results_file = root / "results.json"
    results_file.write_text(json.dumps([r.to_dict() for r in RESULTS]))
    tracker.end_sweep(sweep_id, RESULTS, len(RESULTS), [results_file])
    return uri, sweep_id, results_file


def record(result, folder, config: dict) -> JobRecord:
    """A job's record of `result`, as a job writes it before tracking."""
    now = int(time.time() * 1000)
    return JobRecord(folder, result, config_id=result.cell.key, config=config, started_ms=now, ended_ms=now)


def mlflow_args(sweep, *more) -> list[str]:
    uri, _, _ = sweep
    return ["--tracking-uri", uri, *more]


def test_a_batch_is_timed_per_batch_and_per_image_beside_it():
    result = variant("ul dy fp32", "trt dy fp32", infer_ms=8.0)
    result.bench.settings["shape"] = [4, 3, 640, 640]
    metrics = result.metrics()
    assert metrics["bench.batch"] == 4 and metrics["bench.infer.p50"] == 8.0
    assert metrics["bench.per_image.infer_p50_ms"] == 2.0
    assert metrics["bench.per_image.e2e_p50_ms"] == pytest.approx(9.4 / 4)
    assert metrics["bench.per_image.e2e_img_s"] == pytest.approx(4 * 1000 / 9.4)
    row = results_frame([result]).iloc[0]
    assert row["timed_shape"] == "4x3x640x640" and row["e2e_ms_per_img"] == pytest.approx(9.4 / 4)


def test_typed_results_survive_json():
    for result in RESULTS:
        assert VariantResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_metrics_come_from_the_result_and_reference_cells_have_no_verdict():
    ok, reference = RESULTS[0].metrics(), RESULTS[-1].metrics()
    assert ok["val.passed"] == 1.0 and ok["val.rel_l2"] == 1e-6 and ok["bench.infer.p50"] == 1.9
    assert "val.passed" not in reference and "val.rel_l2" not in reference and "val.det_f1" not in reference
    assert reference["val.map50_95"] == 0.93  # the reference's own accuracy is still reported
    assert "build.engine_mb" not in reference  # onnxruntime builds no engine
    assert RESULTS[6].metrics() == {}  # skipped: no numbers


def test_table_layout_files_and_artifacts(sweep, tmp_path, capsys):
    uri, sweep_id, _ = sweep
    out = tmp_path / "report"
    assert cli.main(["table", *mlflow_args(sweep, "--sweep", "latest", "--out", str(out))]) == 0
    printed = capsys.readouterr().out
    assert f"# yolov8n\n\n{EXPECTED_MATRIX}\n\n# yolo26n\n\n{EXPECTED_SECOND_MODEL}" in printed and str(out) in printed

    for name in cli.REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    markdown = (out / "table.md").read_text()
    assert f"## yolov8n\n\n{EXPECTED_MATRIX}\n\n## yolo26n\n\n{EXPECTED_SECOND_MODEL}" in markdown
    assert render.LEGEND in markdown
    details = pd.read_csv(out / "table.csv", keep_default_na=False).set_index(["model", "onnx", "build"])
    failed = details.loc[("yolov8n", "tc dy fp32", "trt st fp32")]
    assert (failed["status"], failed["failing stage"]) == ("failed", "build")
    assert failed["error / note"] == BUILD_ERROR.splitlines()[0]
    assert details.loc[("yolov8n", "ul st fp16", "trt st fp16"), "failing stage"] == "validate"
    assert details.loc[("yolov8n", "ul st fp32", "ort st fp32"), "validation"] == "reference"
    assert details.loc[("yolov8n", "ul st fp32", "trt st fp32"), "validation"] == "passed"
    assert details.loc[("yolo26n", "ul st fp32 e2e", "trt st fp32"), "status"] == "ok"
    html = (out / "table.html").read_text()
    assert all(render.COLOURS[m] in html for m in "OXR") and "Error Code 4" in html
    assert "<h3>yolov8n</h3>" in html and "<h3>yolo26n</h3>" in html

    logged = {Path(f.path).name for f in MlflowClient(uri).list_artifacts(sweep_id, "report")}
    assert logged == set(cli.REPORT_FILES)


def test_results_file_gives_the_same_tables(sweep):
    uri, sweep_id, results_file = sweep
    runs = cli.Store(uri, "runner").variant_runs(sweep_id)
    from_mlflow, from_file = runs_frame(runs), results_frame(read_results(results_file))
    assert list(render.grids(from_mlflow)) == list(render.grids(from_file)) == ["yolov8n", "yolo26n"]
    for model, grid in render.grids(from_mlflow).items():
        pd.testing.assert_frame_equal(grid, render.grids(from_file)[model])
    pd.testing.assert_frame_equal(render.detail(from_mlflow), render.detail(from_file))
    assert gate.cells(from_mlflow) == gate.cells(from_file)


def test_two_sweeps_make_one_table(sweep, tmp_path, capsys):
    uri, sweep_id, results_file = sweep
    tracker = Tracker(uri, "runner", str(tmp_path / "art"))
    second = tracker.start_sweep("sweep 1 variant", {})
    extra = variant("dynamo st fp32", "trt st fp32", infer_ms=1.8)
    tracker.log_variant(second, record(extra, tmp_path, {}))
    tracker.end_sweep(second, [extra], 1)
    out = tmp_path / "both"
    assert cli.main(["table", *mlflow_args(sweep, "--sweep", sweep_id, "--sweep", second, "--out", str(out))]) == 0
    grid = pd.read_csv(out / "table.csv")
    assert len(grid) == len(RESULTS) + 1
    assert "|dynamo st fp32|" in capsys.readouterr().out
    second_file = tmp_path / "second" / "results.json"  # the second sweep as its folder keeps it
    second_file.parent.mkdir()
    second_file.write_text(json.dumps([extra.to_dict()]))
    files = tmp_path / "files"
    assert cli.main(["table", "--results", str(results_file), "--results", str(second_file), "--out", str(files)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(files / "table.csv"), grid)  # the two files make the same one table


def make_baseline(sweep, tmp_path, edit=lambda cells: None) -> Path:
    path = tmp_path / "baseline.json"
    assert cli.main(["baseline", *mlflow_args(sweep, "--sweep", sweep[1], "--out", str(path))]) == 0
    baseline = json.loads(path.read_text())
    edit(baseline["cells"])
    path.write_text(json.dumps(baseline))
    return path


def check(sweep, baseline: Path, tmp_path, *more) -> tuple[int, str]:
    summary = tmp_path / "check.md"
    code = cli.main(["check", *mlflow_args(sweep, "--sweep", sweep[1], "--baseline", str(baseline), "--summary",
                                           str(summary)), *more])
    return code, summary.read_text()


def test_baseline_checks_clean_against_its_own_sweep(sweep, tmp_path, capsys):
    baseline = make_baseline(sweep, tmp_path)
    written = json.loads(baseline.read_text())
    assert written["sweep"] == sweep[1] and len(written["cells"]) == len(RESULTS)
    assert written["cells"]["yolov8n | tc dy fp32 | trt st fp32"]["failed_stage"] == "build"
    assert written["cells"]["yolov8n | ul st fp32 | ort st fp32"]["validation"] == "reference"
    assert Cell.from_dict(written["cells"]["yolov8n | ul dy fp32 | ul-trt dy fp16"]["cell"]) == RESULTS[8].cell
    assert written["cells"]["yolo26n | ul st fp32 | trt st fp32"]["infer_p50_ms"] == 1.7  # models stay apart
    code, summary = check(sweep, baseline, tmp_path)
    assert code == 0, capsys.readouterr().out
    assert "no regression" in summary and f"#### yolov8n\n\n{EXPECTED_MATRIX}" in summary
    assert f"#### yolo26n\n\n{EXPECTED_SECOND_MODEL}" in summary
    assert "|yolov8n \\| ul st fp32 \\| ort st fp32|validation|reference|reference|not compared" in summary


def test_slower_inference_is_a_regression_unless_timing_is_off(sweep, tmp_path, capsys):
    def faster(cells):
        cells["yolov8n | ul st fp32 | trt st fp32"]["infer_p50_ms"] = 1.0

    baseline = make_baseline(sweep, tmp_path, faster)
    capsys.readouterr()
    code, summary = check(sweep, baseline, tmp_path)
    printed = capsys.readouterr().out
    assert code == 1
    assert any("yolov8n | ul st fp32 | trt st fp32" in line and "infer p50" in line and "REGRESSION" in line
               for line in printed.splitlines())
    assert "|yolov8n \\| ul st fp32 \\| trt st fp32|infer p50|1.00 ms|1.90 ms (x1.90)|REGRESSION|" in summary
    assert "yolo26n | ul st fp32 | trt st fp32" not in [line.split("  ")[0] for line in printed.splitlines()
                                                          if "REGRESSION" in line]
    assert check(sweep, baseline, tmp_path, "--no-timing")[0] == 0


def test_o_to_x_pass_to_fail_and_missing_cells_are_regressions(sweep, tmp_path, capsys):
    def worked_before(cells):
        cells["yolov8n | tc dy fp32 | trt st fp32"].update(status="ok", failed_stage="")
        cells["yolov8n | ul st fp16 | trt st fp16"]["validation"] = "passed"
        cells["yolov8n | tc st fp16 | trt st fp16"] = dict(cells["yolov8n | ul st fp32 | trt st fp32"])

    baseline = make_baseline(sweep, tmp_path, worked_before)
    capsys.readouterr()
    code, summary = check(sweep, baseline, tmp_path, "--no-timing")
    printed = capsys.readouterr().out
    assert code == 1
    assert "|yolov8n \\| tc dy fp32 \\| trt st fp32|status|O|X (build)|REGRESSION|" in summary
    assert "|yolov8n \\| ul st fp16 \\| trt st fp16|validation|passed|failed|REGRESSION|" in summary
    assert "|yolov8n \\| tc st fp16 \\| trt st fp16|cell|O|missing|REGRESSION|" in summary
    assert any("yolov8n | tc dy fp32 | trt st fp32" in line and "REGRESSION" in line for line in printed.splitlines())


def test_rows_sort_by_precision_then_calibrator():
    results = []
    for precision, calibrator in (("fp32", ""), ("int8", "minmax"), ("int8", ""), ("fp16", ""), ("int8", "entropy2")):
        result = variant("ul st fp32", "trt st fp32")
        result.cell = replace(result.cell, build=replace(result.cell.build, precision=precision, calibrator=calibrator))
        results.append(result)
    assert list(render.matrix(results_frame(results)).index) == ["trt st fp32", "trt st fp16", "trt st int8",
                                                                 "trt st int8 entropy2", "trt st int8 minmax"]


def test_user_errors_exit_2_with_one_line(sweep, tmp_path, capsys):
    assert cli.main(["table", *mlflow_args(sweep, "--sweep", "0123abc")]) == 2
    assert capsys.readouterr().err.strip() == "runner: error: no sweep run '0123abc' in experiment 'runner'"
    assert cli.main(["check", "--baseline", str(tmp_path / "none.json"), "--results", "x.json"]) == 2
    assert capsys.readouterr().err.startswith("runner: error: cannot read baseline")
    (tmp_path / "bad.json").write_text('[{"status": "ok"}]')
    assert cli.main(["table", "--results", str(tmp_path / "bad.json")]) == 2
    assert "is not a list of variant results" in capsys.readouterr().err


def test_module_entry_point_reads_a_results_file(sweep, tmp_path):
    out = tmp_path / "from-file"
    done = run_module(["table", "--results", str(sweep[2]), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert EXPECTED_MATRIX in done.stdout and (out / "table.png").is_file()
