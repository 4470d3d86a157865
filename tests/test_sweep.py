"""The user's command, end to end on the CPU: 12 variants, one MLflow parent run with 12 children.

Here there is no TensorRT and no GPU, so `backend=auto` runs each variant's ONNX on onnxruntime and
says so once. An fp32 variant then runs the reference ONNX on the reference runtime: its validation is
`reference`, not a pass, and its mAP is the one the fp16 variant of its ONNX was compared with. `backend=tensorrt`
asked for explicitly is `skipped` with the reason, and no numbers.

The 12-variant sweep is yolov8n at 640 (the README's `make run`, bench=quick data.limit=4): its tests are `slow`.
`make test-slow` runs it into outputs/ci (`--sweep-outputs`), where the CPU gate (`make gate-check`) checks it.
"""
from __future__ import annotations

import json
import platform
import shutil
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import onnxruntime
import pandas as pd
import pytest
import ultralytics
from mlflow.tracking import MlflowClient

from conftest import REPO, UNTIMED, mlflow_run_count, run_cli, sweep_runs
from runner.results import VariantResult

SWEEP = ["-m", "export=ultralytics,torch,dynamo", "precision=fp32,fp16", "shape=static,dynamic", "bench=quick",
         "data.limit=4"]
ONNX_LABELS = {f"{t} {s} {p}" for t in ("ul", "tc", "dynamo") for s in ("st", "dy") for p in ("fp32", "fp16")}
METRICS = ("val.map50_95", "bench.infer.p50", "bench.e2e.p90", "export.onnx_mb")
COMPARED = ("val.rel_l2", "val.det_f1", "val.passed")  # only where the model under test is not the reference


@pytest.fixture(scope="module")
def sweep(request, tmp_path_factory, export_cache):
    kept = request.config.getoption("--sweep-outputs")
    if kept:
        shutil.rmtree(kept, ignore_errors=True)
    outputs = kept.resolve() if kept else tmp_path_factory.mktemp("sweep_outputs")
    # the export cache is shared with test_export/test_processing (same content keys): each ONNX is made once
    proc = run_cli([*SWEEP, f"cache_dir={export_cache}"], outputs, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}"
    uri = f"sqlite:///{outputs}/mlflow.db"
    parents, children = sweep_runs(uri)
    return {"proc": proc, "outputs": outputs, "uri": uri, "client": MlflowClient(uri), "parents": parents,
            "children": children}


@pytest.mark.slow
def test_one_parent_and_twelve_nested_children(sweep):
    parents, children = sweep["parents"], sweep["children"]
    assert len(parents) == 1 and len(children) == 12
    assert mlflow_run_count(sweep["outputs"] / "mlflow.db") == 13  # and no run of another kind
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {c.data.tags["onnx_label"] for c in children} == ONNX_LABELS
    assert len({(c.data.tags["onnx_label"], c.data.tags["build_label"]) for c in children}) == 12
    assert {c.data.tags["cell.onnx.tool"] for c in children} == {"ultralytics", "torch", "dynamo"}
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["variants.ok"] == 12
    assert parent.data.metrics["variants.failed"] == 0 and parent.data.metrics["variants.skipped"] == 0
    assert {a.path for a in sweep["client"].list_artifacts(parent.info.run_id)} >= {"summary.csv", "results.json"}


@pytest.mark.slow
def test_every_child_has_tags_params_metrics_artifacts(sweep):
    client = sweep["client"]
    children = sweep["children"]
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        name = child.info.run_name
        assert tags["status"] == "ok", (name, tags.get("error"))
        assert child.info.status == "FINISHED"
        assert tags["onnx_label"] and tags["build_label"]
        assert params["env.python"] == platform.python_version()
        assert params["env.onnxruntime"] == onnxruntime.__version__
        assert params["env.ultralytics"] == ultralytics.__version__
        assert params["bench.iters"] == "20" and params["data.limit"] == "4"
        for key in METRICS:
            assert key in metrics, (name, key)
        assert metrics["export.onnx_mb"] > 1
        assert 0 < metrics["bench.infer.p50"] <= metrics["bench.e2e.p90"]
        assert 0 < metrics["val.map50_95"] <= 1
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert artifacts >= {"result.json", "config.yaml", "onnx_signature.json"}, (name, artifacts)


@pytest.mark.slow
def test_reference_cells_say_so_and_fp16_cells_are_compared(sweep):
    children = sweep["children"]
    reference_maps = {}  # (tool, shape) -> the fp32 cell's mAP50-95 at each shape
    for child in children:
        m, tags, name = child.data.metrics, child.data.tags, child.info.run_name
        dynamic = tags["cell.build.shape"] == "dynamic"
        shapes = {k.split(".")[1] for k in m
                  if k.startswith("val.") and k.endswith(".map50_95") and k != "val.map50_95"}
        assert shapes == ({"min", "opt", "non_square"} if dynamic else {"static"}), (name, shapes)
        if tags["cell.onnx.precision"] == "fp32":
            # onnxruntime on the CPU running the reference ONNX: nothing to compare, so no verdict
            assert tags["validation"] == "reference", name
            assert not any(k in m for k in COMPARED), (name, sorted(m))
            assert child.data.params["resolved.precision_mechanism"] == "none"
            reference_maps[tags["cell.onnx.tool"], tags["cell.build.shape"]] = {
                m[f"val.{shape}.map50_95"] for shape in shapes}
        else:
            assert tags["validation"] == "passed", name
            assert m["val.passed"] == 1.0
            assert m["val.rel_l2"] > 0, name  # the fp16 ONNX really differs from the reference
            assert 0.9 <= m["val.det_f1"] <= 1.0
            assert child.data.params["resolved.precision_mechanism"] == "fp16_onnx"
    for child in children:  # a reference cell's mAP is the one its ONNX's fp16 cell was compared with
        m, tags = child.data.metrics, child.data.tags
        if tags["cell.onnx.precision"] == "fp16":
            references = reference_maps[tags["cell.onnx.tool"], tags["cell.build.shape"]]
            assert any(m["val.ref_map50_95"] == pytest.approx(r, abs=1e-9) for r in references), \
                (child.info.run_name, m["val.ref_map50_95"], references)


@pytest.mark.slow
def test_backend_is_onnxruntime_and_said_once(sweep):
    children = sweep["children"]
    for child in children:
        assert child.data.tags["backend"] == "onnxruntime"
        assert child.data.params["resolved.backend"] == "onnxruntime"
        assert child.data.params["resolved.model"] == child.data.tags["model"] == "yolov8n"
        assert child.data.tags["build_label"].startswith("ort ")
        result = VariantResult.from_dict(json.loads(Path(sweep["client"].download_artifacts(
            child.info.run_id, "result.json", str(sweep["outputs"] / "dl" / child.info.run_id))).read_text()))
        assert result.backend == "onnxruntime" and result.status == "ok"
        assert result.environment["tensorrt"].startswith("absent:")
        assert result.bench.settings["provider"] == "CPUExecutionProvider"
        tags = child.data.tags
        assert result.cell.key == f"{tags['model']} | {tags['onnx_label']} | {tags['build_label']}"
    out = sweep["proc"].stdout
    assert out.count("TensorRT unavailable") == 1, out[:2000]
    assert "runner: backend=auto -> onnxruntime" in out


@pytest.mark.slow
def test_stdout_ends_with_summary_table(sweep):
    lines = sweep["proc"].stdout.rstrip().splitlines()
    assert re.fullmatch(r"runner: 12/12 variants ok; sweep run [0-9a-f]{32}; summary in .+", lines[-1]), lines[-1]
    header = max(i for i, line in enumerate(lines) if line.split()[:4] == ["model", "onnx", "build", "status"])
    rows = [line for line in lines[header + 1:-1] if line.strip()]
    assert len(rows) == 12, "\n".join(lines[header:])
    assert all(" ok " in f" {row} " and row.split()[0] == "yolov8n" for row in rows)
    for col in ("validation", "rel_l2", "det_f1", "map50_95", "infer_p50_ms", "e2e_p50_ms"):
        assert col in lines[header]
    summary_dir = REPO / lines[-1].split("summary in ", 1)[1]  # shown relative to the CLI's folder where under it
    assert summary_dir.is_relative_to(sweep["outputs"])  # nothing outside outputs=
    table = pd.read_csv(summary_dir / "summary.csv")
    assert len(table) == 12 and set(table["status"]) == {"ok"}
    assert set(table["onnx"]) == ONNX_LABELS
    assert dict(table.groupby("validation").size()) == {"passed": 6, "reference": 6}
    assert (summary_dir / "0" / "runner.log").read_text().count("] validate: ") >= 2  # Hydra's per-job log


@pytest.mark.slow
def test_artifacts_are_stored_under_outputs(sweep):
    children = sweep["children"]
    root = sweep["outputs"] / "mlartifacts"
    for child in children:
        assert child.info.artifact_uri.startswith(root.resolve().as_uri())
        stored = Path(unquote(urlparse(child.info.artifact_uri).path))
        assert stored.is_relative_to(root.resolve()) and child.info.run_id in stored.parts
        signature = json.loads((stored / "onnx_signature.json").read_text())
        assert signature["tested"]["inputs"][0]["name"] == "images"
        assert (stored / "config.yaml").read_text().strip()


def test_explicit_tensorrt_is_skipped_with_the_reason(tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_cli(["backend=tensorrt", "bench=quick", "data.limit=2"], outputs, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-> skipped" in proc.stdout
    assert "export:" not in proc.stdout  # no work was started for a backend that is not there
    assert "tensorrt is not installed" in proc.stdout  # the reason, in the summary table
    assert proc.stdout.rstrip().splitlines()[-1].startswith("runner: 0/1 variants ok")
    uri = f"sqlite:///{outputs}/mlflow.db"
    client, (parents, children) = MlflowClient(uri), sweep_runs(uri)
    assert len(parents) == 1 and len(children) == 1
    child = children[0]
    assert child.data.tags["status"] == "skipped"
    assert child.data.tags["backend"] == "tensorrt"
    assert "tensorrt is not installed" in child.data.tags["error"]
    assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert child.data.metrics == {}, "a skipped variant must not report numbers"
    assert parents[0].data.metrics["variants.skipped"] == 1
    result = VariantResult.from_dict(json.loads(Path(client.download_artifacts(child.info.run_id, "result.json",
                                                                                str(tmp_path))).read_text()))
    assert result.status == "skipped" and result.export is None and result.build is None
    assert "tensorrt is not installed" in result.error


def test_console_shows_runner_lines_and_library_noise_goes_to_the_variant_log(tmp_path, export_cache):
    """profile=seed's min shape (H of 1) makes onnxruntime refuse it, and its C++ logger print an error line; a new
    sqlite store makes MLflow say it creates its tables. Neither reaches the console; onnxruntime's is in the log."""
    outputs = tmp_path / "outputs"
    proc = run_cli(["-m", "precision=fp32,fp16", "shape=dynamic", "profile=seed", *UNTIMED, "data.limit=2",
                    f"cache_dir={export_cache}"], outputs, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validate: min skipped: H 1 not a multiple of the stride 32: [ONNXRuntimeError]" in proc.stdout  # why
    for noise in ("[E:onnxruntime", "Creating initial MLflow database tables", "Updating database tables",
                  "INFO  [alembic"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert proc.stderr == ""
    sweep = Path(proc.stdout.rstrip().splitlines()[-1].split("summary in ", 1)[1])
    for job in ("0", "1"):
        assert "[E:onnxruntime" in (sweep / job / "runner.log").read_text()
