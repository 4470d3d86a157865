"""Tracking against a real `mlflow server` on loopback: the sweep logs over HTTP, artifacts are proxied."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import PLUMBING, REPO, MlflowServer, cli_env, mlflow_run_count, run_cli, sweep_runs
from mlflow.tracking import MlflowClient
from runner.track import free_port


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield {"url": server.url, "root": server.root}
    finally:
        server.stop()


def test_sweep_logs_to_a_tracking_server(mlflow_server, tmp_path, export_cache):
    url = mlflow_server["url"]
    outputs = tmp_path / "outputs"
    proc = run_cli([f"tracking.uri={url}", *PLUMBING, f"cache_dir={export_cache}"], outputs, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"-> {url} (experiment 'runner')" in proc.stdout

    client = MlflowClient(url)
    parents, children = sweep_runs(url)
    assert len(parents) == 1 and len(children) == 1
    parent, child = parents[0], children[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["status"] == "ok", child.data.tags.get("error")
    assert child.data.tags["onnx_label"] == "ul st fp32"
    assert child.data.tags["validation"] == "reference"  # onnxruntime running the reference ONNX itself
    assert "val.rel_l2" not in child.data.metrics and child.data.metrics["val.map50_95"] > 0.1
    assert child.data.metrics["bench.infer.p50"] > 0
    assert parent.data.metrics["variants.ok"] == 1
    assert parent.info.status == child.info.status == "FINISHED"

    # artifacts went through the server into its --artifacts-destination
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"result.json", "config.yaml",
                                                                          "onnx_signature.json"}
    stored = list((mlflow_server["root"] / "artifacts").rglob(f"{child.info.run_id}/artifacts/result.json"))
    assert len(stored) == 1
    stored_result = json.loads(stored[0].read_text())
    assert stored_result["status"] == "ok"
    assert stored_result["validate"]["shapes"]["static"]["map50_95"] == child.data.metrics["val.map50_95"]
    # the server's own store holds the runs; nothing was tracked locally
    assert mlflow_run_count(mlflow_server["root"] / "store.db") == 2
    assert not (outputs / "mlflow.db").exists()


def test_unreachable_tracking_server_fails_before_any_work(tmp_path, runner_main, monkeypatch):
    """A tracking URI nobody listens on is an error, said within seconds and before any variant runs, not a silent
    untracked sweep."""
    outputs = tmp_path / "outputs"
    port = free_port()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    start = time.monotonic()
    proc = runner_main([f"tracking.uri=http://127.0.0.1:{port}", "bench=quick", "data.limit=2", f"outputs={outputs}"])
    assert time.monotonic() - start < 20
    assert "export:" not in proc.stdout, "variants ran although nothing could be tracked"
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in proc.stderr


def test_mlflow_telemetry_is_off_in_runner_processes():
    """MLflow's telemetry thread, failing to reach its endpoint, pops an environment variable while a request
    iterates the environment: a run then fails to log with KeyError('_MLFLOW_TELEMETRY_SESSION_ID'). MLflow turns
    telemetry off by itself under pytest and CI, so the child runs without their variables, as a user's does."""
    code = ("from runner.environment import quiet_defaults; quiet_defaults(); import mlflow; "
            "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())")
    env = {k: v for k, v in cli_env().items() if k not in ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS")}
    said = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert said.returncode == 0, said.stderr[-3000:]
    assert said.stdout.strip() == "True"
