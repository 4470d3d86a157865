"""The gate against hostile input: metric names MLflow refuses, a failure while logging, baselines that could not
fail, metrics the sweep lacks, outputs that cannot be written and a tracking server where nothing answers.

Variant results are built by hand (tests/test_report.py's `variant`) and logged to real sqlite stores; `runner
table|baseline|check` run in-process unless the time to an answer is what is measured.
"""
import json
import time
from pathlib import Path

import pytest
from conftest import run_module, sweep_runs
from test_report import RESULTS, record, variant

from runner import sync
from runner.config import TrackingConfig
from runner.report import cli
from runner.report.frame import runs_frame
from runner.summary import LOST_EXIT
from runner.sweep import Sweep, job_records
from runner.track import Tracker

ODD_CLASS = "rectangle (big)"
KEPT = "yolov8n | ul st fp32 | trt st fp32"  # a cell of RESULTS[0], with mAP and latency


def per_class(result, deltas: dict[str, float]):
    """`result` with AP50-95 deltas per class against a reference, as validation leaves them."""
    shape = result.validate.shapes["static"]
    shape.ref_map50_95, shape.class_ap_delta = shape.map50_95 + 0.01, deltas
    return result


def test_a_class_name_mlflow_refuses_is_logged_under_a_key_it_takes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "runner", str(tmp_path / "art"))
    result = per_class(variant("ul st fp32", "trt st fp32"), {ODD_CLASS: -0.02, "circle": 0.0})
    tracker.log_variant(tracker.start_sweep("sweep", {}), record(result, tmp_path, {}))
    (run,) = sweep_runs(uri)[1]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val.ap_delta.rectangle _big_"] == pytest.approx(-0.02)
    assert run.data.metrics["val.ap_delta.circle"] == 0.0 and run.data.metrics["val.map50_95"] == 0.93
    assert run.data.tags["metric_name.val.ap_delta.rectangle _big_"] == f"val.ap_delta.{ODD_CLASS}"
    assert runs_frame([run]).loc[0, "infer_p50_ms"] == 2.0  # the table shows its numbers, not an empty O


def test_metric_keys_are_distinct_and_names_mlflow_takes_keep_theirs():
    from runner.results import metric_keys

    keys = metric_keys(["val.ap_delta.a(b)", "val.ap_delta.a_b_", "val.ap_delta.a[b]", "val.ap_delta.x/y:z"])
    assert keys == {"val.ap_delta.a_b_": "val.ap_delta.a_b_", "val.ap_delta.a(b)": "val.ap_delta.a_b_-2",
                    "val.ap_delta.a[b]": "val.ap_delta.a_b_-3", "val.ap_delta.x/y:z": "val.ap_delta.x_y_z"}
    assert len(metric_keys(["val.ap_delta." + "c" * 400])["val.ap_delta." + "c" * 400]) == 200


def write_sweep(outputs: Path, uri: str, artifact_root: Path, results: list) -> Path:
    """A sweep folder as a sweep leaves it when the store missed every result: sweep.json, one result.json per job."""
    folder = outputs / "sweeps" / "2025-01-01_00-00-00"
    tracking = TrackingConfig(enabled=True, uri=uri, experiment="runner", artifact_root=str(artifact_root))
    parent = Tracker(uri, "runner", str(artifact_root)).start_sweep("sweep", {"variants": len(results)})
    for i, result in enumerate(results):
        (folder / str(i)).mkdir(parents=True)
        record(result, folder / str(i), {"job": i}).write()
    Sweep(folder, len(results), [], tracking, parent).write()
    return folder


def test_a_failure_while_logging_leaves_no_running_run_and_sync_says_so_in_a_line(tmp_path, capsys):
    blocker = tmp_path / "blocker"  # the artifact store lies below a regular file: every artifact upload fails
    blocker.write_text("")
    uri, outputs = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
    results = [per_class(variant("ul st fp32", "trt st fp32"), {ODD_CLASS: -0.02}),
               variant("tc st fp32", "trt st fp32")]
    folder = write_sweep(outputs, uri, blocker / "art", results)
    argv = ["--sweep", str(folder), "--outputs", str(outputs)]
    capsys.readouterr()
    assert sync.main(argv) == LOST_EXIT
    out, err = capsys.readouterr()
    assert "0 run(s) logged, 0 already there, 2 not logged" in out and "Traceback" not in out + err
    assert [line.split(" not logged: ")[0] for line in err.splitlines()] == [
        f"runner: warning: {r.name}" for r in results]
    assert sweep_runs(uri)[1] == []  # none left RUNNING, half-logged
    assert not any(r.logged for r in job_records(folder))

    blocker.unlink()
    assert sync.main(argv) == 0
    assert "2 run(s) logged, 0 already there\n" in capsys.readouterr().out
    runs = sweep_runs(uri)[1]
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert {r.info.run_id for r in runs} == {r.mlflow_run_id for r in job_records(folder)}
    assert any("val.ap_delta.rectangle _big_" in r.data.metrics for r in runs)


def test_a_metric_the_baseline_has_and_the_sweep_lacks_is_a_regression(tmp_path, capsys):
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps([r.to_dict() for r in RESULTS]))
    baseline = tmp_path / "baseline.json"
    assert cli.main(["baseline", "--results", str(results_file), "--out", str(baseline)]) == 0
    unmeasured = [r.to_dict() for r in RESULTS]
    kept = next(r for r in unmeasured if f"{r['cell']['model']} | ul st fp32 | trt st fp32" == KEPT)
    kept["bench"], kept["validate"]["shapes"]["static"]["map50_95"] = None, None  # ran, but its numbers were lost
    results_file.write_text(json.dumps(unmeasured))
    capsys.readouterr()

    summary = tmp_path / "check.md"
    assert cli.main(["check", "--results", str(results_file), "--baseline", str(baseline), "--summary",
                     str(summary)]) == 1
    text = summary.read_text()
    for metric, before in (("mAP50-95", "0.930"), ("mAP50-95 worst", "0.930"), ("infer p50", "1.90 ms"),
                           ("e2e p50", "3.30 ms")):
        assert f"|{KEPT.replace('|', chr(92) + '|')}|{metric}|{before}|missing|REGRESSION|" in text
    assert "4 regression(s) in 1 cell(s)" in text and "4 regression(s)" in capsys.readouterr().out


def test_a_cell_that_ran_with_a_shape_unchecked_is_a_regression_from_a_fully_checked_one(tmp_path):
    results_file, _ = results_and_baseline(tmp_path)
    partly = [r.to_dict() for r in RESULTS]
    kept = next(r for r in partly if f"{r['cell']['model']} | ul st fp32 | trt st fp32" == KEPT)
    kept["validate"]["shapes"]["min"] = {**kept["validate"]["shapes"]["static"], "status": "skipped",
                                         "reason": "reference failed: H 1 not a multiple of the stride 32"}
    results_file.write_text(json.dumps(partly))
    summary = tmp_path / "check.md"
    assert cli.main(["check", "--results", str(results_file), "--baseline", str(tmp_path / "recorded.json"),
                     "--summary", str(summary)]) == 1
    assert f"|{KEPT.replace('|', chr(92) + '|')}|status|O|△|REGRESSION|" in summary.read_text()


def test_a_cell_whose_precision_pins_tensorrt_ignored_is_a_regression_and_says_which(tmp_path):
    results_file, _ = results_and_baseline(tmp_path)
    ignored = [r.to_dict() for r in RESULTS]
    kept = next(r for r in ignored if f"{r['cell']['model']} | ul st fp32 | trt st fp32" == KEPT)
    kept["build"]["calibration"] = {"fp16_layers": ["/model.0/conv/Conv", "/model.1/conv/Conv"]}
    kept["build"]["pins_ignored"] = ["/model.0/conv/Conv: asked fp16, runs int8 -> int8"]
    results_file.write_text(json.dumps(ignored))
    summary, table = tmp_path / "check.md", tmp_path / "table"
    assert cli.main(["check", "--results", str(results_file), "--baseline", str(tmp_path / "recorded.json"),
                     "--summary", str(summary)]) == 1
    assert f"|{KEPT.replace('|', chr(92) + '|')}|status|O|△|REGRESSION|" in summary.read_text()
    assert cli.main(["table", "--results", str(results_file), "--out", str(table)]) == 0
    assert ("|ok|passed||TensorRT ignored 1 of 2 pins: /model.0/conv/Conv: asked fp16, runs int8 -> int8|"
            in (table / "table.md").read_text())


def results_and_baseline(tmp_path) -> tuple[Path, dict]:
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps([r.to_dict() for r in RESULTS]))
    baseline = tmp_path / "recorded.json"
    assert cli.main(["baseline", "--results", str(results_file), "--out", str(baseline)]) == 0
    return results_file, json.loads(baseline.read_text())


def some_cells(count: int):
    def edit(baseline: dict) -> dict:
        baseline["cells"] = dict(list(baseline["cells"].items())[:count])
        return baseline
    return edit


def without(key: str):
    def edit(baseline: dict) -> dict:
        for cell in baseline["cells"].values():
            cell.pop(key)
        return baseline
    return edit


def renamed(baseline: dict) -> dict:
    baseline["cells"] = {f"yolo99 | {key}": cell for key, cell in baseline["cells"].items()}
    return baseline


def text_map(baseline: dict) -> dict:
    baseline["cells"][KEPT]["map50_95"] = "high"
    return baseline


@pytest.mark.parametrize("edit, said", [
    (lambda b: "{not json", "cannot read baseline"),
    (lambda b: [], "holds no cells, so no check could fail"),
    (lambda b: {"sweep": "x"}, "holds no cells, so no check could fail"),
    (lambda b: {**b, "cells": {}}, "holds no cells, so no check could fail"),
    (lambda b: {**b, "cells": list(b["cells"].values())}, "holds no cells, so no check could fail"),
    (without("status"), "has no 'status' and 'cell'"),
    (text_map, "has map50_95 that is not a number"),
    (renamed, "shares no cell with sweep"),
])
def test_a_baseline_that_could_not_fail_is_refused_in_one_line(tmp_path, capsys, edit, said):
    results_file, recorded = results_and_baseline(tmp_path)
    baseline, summary = tmp_path / "baseline.json", tmp_path / "check.md"
    edited = edit(recorded)
    baseline.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    capsys.readouterr()
    assert cli.main(["check", "--results", str(results_file), "--baseline", str(baseline), "--summary",
                     str(summary)]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith("runner: error: ") and said in err, err
    assert out == "" and not summary.exists()


def test_cells_the_baseline_lacks_are_listed_as_new_apart_from_regressions(tmp_path, capsys):
    results_file, recorded = results_and_baseline(tmp_path)
    baseline, summary = tmp_path / "baseline.json", tmp_path / "check.md"
    baseline.write_text(json.dumps(some_cells(len(RESULTS) - 2)(recorded)))
    capsys.readouterr()
    assert cli.main(["check", "--results", str(results_file), "--baseline", str(baseline), "--summary",
                     str(summary)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("runner: 0 regression(s) against") and "; 2 new cell(s), not in the baseline;" in last
    text = summary.read_text()
    assert text.startswith("## runner check: passed, no regression; 2 new cell(s)\n")
    new = text.split("### New cells (not in the baseline, so not checked)\n\n")[1].split("\n\n")[0].splitlines()[2:]
    assert [row.split("|")[-2] for row in new] == ["new", "new"]


@pytest.mark.parametrize("command, option", [("table", "--out"), ("baseline", "--out"), ("check", "--summary")])
def test_an_output_that_cannot_be_written_is_refused_before_the_store_is_read(tmp_path, capsys, command, option):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    results_file, recorded = results_and_baseline(tmp_path)
    more = ["--baseline", str(tmp_path / "recorded.json")] if command == "check" else []
    capsys.readouterr()
    target = blocker / "report"
    store = f"sqlite:///{tmp_path / 'none.db'}"  # read first, this would be the error
    assert cli.main([command, "--tracking-uri", store, option, str(target), *more]) == 2
    assert capsys.readouterr().err == (f"runner: error: {option} {target}: {blocker} is a file, not a folder; give a "
                                       f"path that can be written\n")


@pytest.mark.parametrize("command", ["table", "check"])
def test_a_server_where_nothing_answers_is_said_within_seconds(tmp_path, command):
    results_file, _ = results_and_baseline(tmp_path)
    more = ["--baseline", str(tmp_path / "recorded.json"), "--summary", str(tmp_path / "check.md")] \
        if command == "check" else ["--out", str(tmp_path / "report")]
    start = time.monotonic()
    done = run_module([command, "--tracking-uri", "http://127.0.0.1:9", *more], timeout=120)
    took = time.monotonic() - start
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("runner: error: --tracking-uri http://127.0.0.1:9: cannot read the MLflow store: no server "
                           "answers there (connection refused); start the server, or pass the right --tracking-uri\n")
    assert took < 20, took
