"""`runner table|baseline|check` against a real MLflow sqlite store holding one logged sweep.

The variant results are built by hand with the keys the pipeline produces, and logged with the
real `Tracker`, so the report reads exactly what a sweep leaves behind.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from runner import report
from runner.track import Tracker

EXPECTED_MATRIX = """\
|onnx\\trt|ul st fp32|ul dy fp32|ul st fp16|tc st fp32|tc dy fp32|tc dy fp16|
|---|---|---|---|---|---|---|
|st fp32|O|O|-|O|X|-|
|dy fp32|-|O|-|-|-|-|
|st fp16|-|-|X|-|-|-|
|dy fp16|-|-|-|-|-|-|"""
BUILD_ERROR = "[TRT] Error Code 4: Internal Error (profile has no dimensions for input 'images')\nsecond line"


def stats(p50: float) -> dict:
    return {"mean": p50 * 1.02, "p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "std": p50 * 0.05, "n": 50}


def variant(onnx: str, build: str, status: str = "ok", failed_stage: str | None = None, error: str | None = None,
            infer_ms: float = 2.0, build_s: float = 30.0) -> dict:
    """A variant result with the structure `runner.pipeline.run_variant` returns."""
    tool, onnx_shape, precision = onnx.split()
    shape = {"st": "static", "dy": "dynamic"}
    result = {"status": status, "failed_stage": failed_stage, "error": error, "backend": "tensorrt",
              "precision": build.split()[1], "shape": shape[build.split()[0]], "profile": "default",
              "environment": {"python": "3.11.7", "tensorrt": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3"},
              "onnx_label": onnx, "build_label": build, "onnx_shape": shape[onnx_shape],
              "name": f"{onnx}__{build}".replace(" ", "-"), "fp16_mode": "none", "stages": {}}
    if status == "skipped":
        return result
    onnx_file = {"path": f"cache/{tool}-{onnx_shape}-{precision}/model.onnx", "tool": tool,
                 "dynamic": onnx_shape == "dy", "precision": precision, "checker": "ok",
                 "signature": {"inputs": [{"name": "images", "shape": [1, 3, 640, 640], "dtype": "float32"}],
                               "outputs": [{"name": "output0", "shape": [1, 7, 8400], "dtype": "float32"}],
                               "opset": 17},
                 "size_bytes": 12_000_000, "export_s": 4.0, "cached": False}
    result["stages"]["export"] = {"reference": onnx_file, "tested": onnx_file}
    result["stages"]["build"] = {"ok": failed_stage != "build", "error": error if failed_stage == "build" else None,
                                 "engine_path": None, "build_s": build_s, "engine_bytes": 9_000_000,
                                 "cache_hit": False, "fp16_mechanism": "none", "optimization_level": 3,
                                 "trt_version": "10.9.0", "gpu_name": "NVIDIA H100 80GB HBM3", "log_path": None,
                                 "layers_path": None, "num_layers": 120}
    if failed_stage == "build":
        return result
    passed = failed_stage != "validate"
    result["stages"]["validate"] = {"passed": passed, "shapes": {}, "rel_l2": 1e-6 if passed else 0.2,
                                    "det_f1": 1.0 if passed else 0.6, "map50": 0.99, "map50_95": 0.93}
    result["stages"]["bench"] = {"preprocess": stats(0.8), "infer": stats(infer_ms), "postprocess": stats(0.5),
                                 "e2e": stats(infer_ms + 1.4), "compute": stats(infer_ms * 0.95),
                                 "infer_over_compute": 1 / 0.95,
                                 "settings": {"warmup": 20, "iters": 200, "shape": [1, 3, 640, 640],
                                              "cuda_graph": False, "trt_version": "10.9.0"}}
    return result


RESULTS = [
    variant("ul st fp32", "st fp32", infer_ms=1.9),
    variant("ul dy fp32", "st fp32", infer_ms=2.1),
    variant("ul dy fp32", "dy fp32", infer_ms=2.4, build_s=0.2),  # an engine-cache hit
    variant("tc st fp32", "st fp32", infer_ms=2.0),
    variant("tc dy fp32", "st fp32", "failed", "build", BUILD_ERROR),
    variant("ul st fp16", "st fp16", "failed", "validate", "static [1, 3, 640, 640]: rel-L2 2.00e-01", infer_ms=1.1),
    variant("tc dy fp16", "dy fp16", "skipped", error="tensorrt is not installed"),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep logged to a fresh sqlite store: (tracking uri, sweep id, results.json path)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, "runner", str(root / "mlartifacts"))
    sweep_id = tracker.start_sweep("sweep 7 variants", {"overrides": "export=ultralytics,torch"})
    for result in RESULTS:
        tracker.log_variant(sweep_id, result, {"export.tool": result["onnx_label"].split()[0]}, "export: {}\n",
                            int(time.time() * 1000))
    results_file = root / "results.json"
    results_file.write_text(json.dumps(RESULTS))
    tracker.end_sweep(sweep_id, RESULTS, [results_file])
    return uri, sweep_id, results_file


def mlflow_args(sweep, *more) -> list[str]:
    uri, _, _ = sweep
    return ["--tracking-uri", uri, *more]


def test_table_layout_files_and_artifacts(sweep, tmp_path, capsys):
    uri, sweep_id, _ = sweep
    out = tmp_path / "report"
    assert report.main(["table", *mlflow_args(sweep, "--sweep", "latest", "--out", str(out))]) == 0
    printed = capsys.readouterr().out
    assert EXPECTED_MATRIX in printed and str(out) in printed

    for name in report.REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert EXPECTED_MATRIX in (out / "table.md").read_text()
    details = pd.read_csv(out / "table.csv", keep_default_na=False).set_index(["onnx", "build"])
    failed = details.loc[("tc dy fp32", "st fp32")]
    assert (failed["status"], failed["failing stage"]) == ("failed", "build")
    assert failed["error"] == BUILD_ERROR.splitlines()[0]
    assert details.loc[("ul st fp16", "st fp16"), "failing stage"] == "validate"
    html = (out / "table.html").read_text()
    assert report.COLOURS["X"] in html and report.COLOURS["O"] in html and "Error Code 4" in html

    logged = {Path(f.path).name for f in MlflowClient(uri).list_artifacts(sweep_id, "report")}
    assert logged == set(report.REPORT_FILES)


def test_results_file_gives_the_same_tables(sweep):
    uri, sweep_id, results_file = sweep
    from_mlflow, from_file = report.runs_frame(uri, "runner", sweep_id), report.results_frame(results_file)
    pd.testing.assert_frame_equal(report.matrix(from_mlflow), report.matrix(from_file))
    pd.testing.assert_frame_equal(report.detail(from_mlflow), report.detail(from_file))
    assert report.cells(from_mlflow) == report.cells(from_file)


def make_baseline(sweep, tmp_path, edit=lambda cells: None) -> Path:
    path = tmp_path / "baseline.json"
    assert report.main(["baseline", *mlflow_args(sweep, "--out", str(path))]) == 0
    baseline = json.loads(path.read_text())
    edit(baseline["cells"])
    path.write_text(json.dumps(baseline))
    return path


def check(sweep, baseline: Path, tmp_path, *more) -> tuple[int, str]:
    summary = tmp_path / "check.md"
    code = report.main(["check", *mlflow_args(sweep, "--baseline", str(baseline), "--summary", str(summary)), *more])
    return code, summary.read_text()


def test_baseline_checks_clean_against_its_own_sweep(sweep, tmp_path, capsys):
    baseline = make_baseline(sweep, tmp_path)
    written = json.loads(baseline.read_text())
    assert written["sweep"] == sweep[1] and len(written["cells"]) == len(RESULTS)
    assert written["cells"]["tc dy fp32 | st fp32"]["failed_stage"] == "build"
    code, summary = check(sweep, baseline, tmp_path)
    assert code == 0, capsys.readouterr().out
    assert "no regression" in summary and EXPECTED_MATRIX in summary


def test_slower_inference_is_a_regression_unless_timing_is_off(sweep, tmp_path, capsys):
    def faster(cells):
        cells["ul st fp32 | st fp32"]["infer_p50_ms"] = 1.0

    baseline = make_baseline(sweep, tmp_path, faster)
    capsys.readouterr()
    code, summary = check(sweep, baseline, tmp_path)
    printed = capsys.readouterr().out
    assert code == 1
    assert any("ul st fp32 | st fp32" in line and "infer p50" in line and "REGRESSION" in line
               for line in printed.splitlines())
    assert "|ul st fp32 \\| st fp32|infer p50|1.00 ms|1.90 ms (x1.90)|REGRESSION|" in summary
    assert check(sweep, baseline, tmp_path, "--no-timing")[0] == 0


def test_o_to_x_and_missing_cells_are_regressions(sweep, tmp_path, capsys):
    def worked_before(cells):
        cells["tc dy fp32 | st fp32"].update(status="ok", failed_stage="")
        cells["tc st fp16 | st fp16"] = dict(cells["ul st fp32 | st fp32"])

    baseline = make_baseline(sweep, tmp_path, worked_before)
    capsys.readouterr()
    code, summary = check(sweep, baseline, tmp_path, "--no-timing")
    printed = capsys.readouterr().out
    assert code == 1
    assert "|tc dy fp32 \\| st fp32|status|O|X (build)|REGRESSION|" in summary
    assert "|tc st fp16 \\| st fp16|cell|O|missing|REGRESSION|" in summary
    assert any("tc dy fp32 | st fp32" in line and "REGRESSION" in line for line in printed.splitlines())


def test_user_errors_exit_2_with_one_line(sweep, tmp_path, capsys):
    assert report.main(["table", *mlflow_args(sweep, "--sweep", "0123abc")]) == 2
    assert capsys.readouterr().err.strip() == "runner: error: no sweep run '0123abc' in experiment 'runner'"
    assert report.main(["check", "--baseline", str(tmp_path / "none.json"), "--results", "x.json"]) == 2
    assert capsys.readouterr().err.startswith("runner: error: cannot read baseline")


def test_module_entry_point_reads_a_results_file(sweep, tmp_path):
    out = tmp_path / "from-file"
    done = subprocess.run([sys.executable, "-m", "runner", "table", "--results", str(sweep[2]), "--out", str(out)],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert EXPECTED_MATRIX in done.stdout and (out / "table.png").is_file()
