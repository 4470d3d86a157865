"""Sweeps that scale out and lose nothing, run for real on the CPU (yolov8n at 128 px): a joblib sweep through the
loopback tracking server, `kill -9` then `resume=`, a tracking server killed mid-sweep then `runner sync` (these two
`slow`: minutes of real processes killed and started again), and the sweep values Hydra's basic sweeper takes or
refuses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import PLUMBING, REPO, MlflowServer, cli_env, run_cli, sweep_runs
from runner.tags import SWEEP_TAG
from runner.sweep import RESULT_FILE, JobRecord

QUICK = [*PLUMBING, "backend=onnxruntime"]
TWO = ["precision=fp32,fp16"]
FOUR = ["export=ultralytics,torch", "precision=fp32,fp16"]
NO_BACKOFF = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


def sweep_folder(outputs: Path) -> Path:
    (folder,) = (outputs / "sweeps").iterdir()
    return folder


def records(folder: Path) -> list[JobRecord]:
    return [r for r in map(JobRecord.read, sorted(folder.glob(f"*/{RESULT_FILE}"))) if r]


def start_cli(args: list[str], outputs: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner", *args, f"outputs={outputs}"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**cli_env(), **env})


def wait_for(condition, what: str, proc: subprocess.Popen, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {limit_s} s")
        time.sleep(0.5)


def test_joblib_sweep_runs_jobs_in_parallel_under_one_parent(tmp_path, export_cache):
    outputs = tmp_path / "out"
    proc = run_cli(["-m", *TWO, *QUICK, "bench.offline_batches=[]", f"cache_dir={export_cache}",
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], outputs)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    said = proc.stdout + proc.stderr
    assert "database is locked" not in said
    assert "[1/2] " in said and "[2/2] " in said  # progress numbered by hydra.job.num, in the workers
    assert "parallel jobs log through http://127.0.0.1:" in proc.stdout
    folder = sweep_folder(outputs)
    parents, children = sweep_runs(f"sqlite:///{outputs}/mlflow.db")
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["variants.ok"] == 2
    summary = pd.read_csv(folder / "summary.csv")
    assert sorted(summary["onnx"]) == ["ul st fp16", "ul st fp32"] and set(summary["status"]) == {"ok"}
    jobs = records(folder)
    assert {j.mlflow_run_id for j in jobs} == {c.info.run_id for c in children}
    # the workers overlapped: each started before the other ended
    (a, b) = sorted(jobs, key=lambda j: j.started_ms)
    assert b.started_ms < a.ended_ms, "the two jobs ran one after the other"


@pytest.mark.slow
def test_kill_9_then_resume_measures_nothing_twice(tmp_path, export_cache, runner_main):
    outputs = tmp_path / "out"
    args = ["-m", *FOUR, *QUICK, f"cache_dir={export_cache}"]
    proc = start_cli(args, outputs)
    wait_for(lambda: (outputs / "sweeps").is_dir() and any(r.logged for r in records(sweep_folder(outputs))),
             "first logged result", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = sweep_folder(outputs)
    kept = {r.config_id: r.result_id for r in records(folder)}
    assert 1 <= len(kept) < 4
    uri = f"sqlite:///{outputs}/mlflow.db"
    (parent,), children = sweep_runs(uri)
    assert parent.info.status == "RUNNING"

    # a killed sweep says it is incomplete, in the table and in the gate
    table = runner_main(["table", "--tracking-uri", uri, "--out", str(tmp_path / "report")])
    assert table.returncode == 0, table.stderr
    assert f"is incomplete: {len(children)} of 4 variants" in table.stderr
    from_folder = runner_main(["table", "--results", str(folder), "--out", str(tmp_path / "report2")])
    assert f"is incomplete: {len(kept)} of 4 variants" in from_folder.stderr
    gate = runner_main(["check", "--no-timing", "--results", str(folder), "--baseline",
                        str(REPO / "results" / "baseline-cpu.json"), "--summary", str(tmp_path / "check.md")])
    assert gate.returncode == 1 and f"is incomplete: {len(kept)} of 4 variants" in gate.stderr
    assert "incomplete" in (tmp_path / "check.md").read_text()

    # a run a kill left RUNNING while it was being logged
    client = MlflowClient(uri)
    stale = client.create_run(parent.info.experiment_id, tags={
        "runner.kind": "variant", SWEEP_TAG: parent.info.run_id, "runner.result_id": "killed-while-logging"})

    resumed = run_cli([*args, "resume=latest"], outputs)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    said = resumed.stdout + resumed.stderr
    assert f"resuming sweep {folder}" in said and "1 run(s) a kill left RUNNING closed as KILLED" in said
    assert said.count("not measured again") == len(kept)
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    final = records(folder)
    assert len(final) == 4 and all(r.logged for r in final)
    assert {r.config_id: r.result_id for r in final if r.config_id in kept} == kept  # not measured again
    assert json.loads((folder / "sweep.json").read_text())["variants"] == [r.config_id for r in final]  # job order
    (parent,), children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    live = [c for c in children if c.info.status != "KILLED"]
    assert len(live) == 4 and len({c.data.tags["runner.result_id"] for c in live}) == 4
    assert {c.info.run_id for c in live} == {r.mlflow_run_id for r in final}
    assert len(list((outputs / "sweeps").iterdir())) == 1  # resumed in place


@pytest.mark.slow
def test_tracking_server_killed_mid_sweep_then_sync_logs_each_run_once(tmp_path, export_cache, runner_main):
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    outputs = tmp_path / "out"
    try:
        # MLflow's retries stay; their back-off (seconds of sleep per request to the dead server) does not
        proc = start_cli(["-m", *FOUR, *QUICK, f"cache_dir={export_cache}", "tracking=server",
                          f"tracking.uri={server.url}"], outputs, **NO_BACKOFF)
        wait_for(lambda: (outputs / "sweeps").is_dir() and any(r.logged for r in records(sweep_folder(outputs))),
                 "first logged result", proc)
        server.stop(signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        folder = sweep_folder(outputs)
        final = records(folder)
        assert len(final) == 4 and all(r.result.status == "ok" for r in final)  # every variant still measured
        unlogged = [r for r in final if not r.logged]
        assert unlogged and all(r.tracking_error for r in unlogged)
        assert "result(s) not yet in MLflow" in out and "runner sync --sweep" in out

        server.start()
        for attempt in range(2):  # a second sync finds everything there
            sync = runner_main(["sync", "--sweep", "latest", "--outputs", str(outputs)])
            assert sync.returncode == 0, sync.stdout + sync.stderr
            logged = len(unlogged) if attempt == 0 else 0
            assert f"{logged} run(s) logged, {4 - logged} already there" in sync.stdout
        (parent,), children = sweep_runs(server.url)
        assert len(children) == 4 and len({c.data.tags["runner.result_id"] for c in children}) == 4
        assert {c.info.run_id for c in children} == {r.mlflow_run_id for r in records(folder)}
        assert parent.info.status == "FINISHED" and parent.data.metrics["variants.ok"] == 4
    finally:
        server.stop()


@pytest.mark.parametrize("sweep, count", [("precision=glob(*)", 5), ("precision=glob(fp1*)", 1),
                                          ("bench.iters=range(10,40,10)", 3)])
def test_glob_and_range_sweeps_expand_up_front(sweep, count):
    from runner.preflight import preflight

    assert len(preflight(["-m", sweep, "backend=onnxruntime"])) == count


@pytest.mark.parametrize("sweep, said", [
    ("bench.warmup=interval(0,5)", "bench.warmup: interval() needs an optimizing sweeper"),
    ("bench.iters=glob(*)", "bench.iters: glob() selects options of a config group"),
])
def test_sweeps_the_basic_sweeper_cannot_run_are_refused_in_one_line(tmp_path, runner_main, sweep, said):
    proc = runner_main(["-m", sweep, f"outputs={tmp_path / 'out'}"])
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"runner: error: {said}")
    assert not (tmp_path / "out" / "sweeps").exists()


def test_sweep_folders_are_unique_and_a_new_store_is_created_once(tmp_path):
    from runner.sweep import new_folder

    assert len({new_folder(tmp_path / "sweeps") for _ in range(3)}) == 3
    uri = f"sqlite:///{tmp_path}/new.db"
    code = f"from runner.track import Tracker; Tracker({uri!r}, 'runner', {str(tmp_path / 'art')!r})"
    racers = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env=cli_env()) for _ in range(3)]
    for racer in racers:
        _, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err[-3000:]
    assert len(MlflowClient(uri).search_experiments()) == 2  # Default and runner, once each


def test_a_single_untracked_run_keeps_its_result_in_its_folder(tmp_path, export_cache):
    outputs = tmp_path / "out"
    proc = run_cli([*QUICK, f"cache_dir={export_cache}", "tracking.enabled=false"], outputs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = (outputs / "runs").iterdir()
    (result,) = json.loads((folder / "results.json").read_text())
    assert result["status"] == "ok" and result["mlflow_run_id"] is None
    assert JobRecord.read(folder / RESULT_FILE).result.status == "ok"
