"""Sweeps on real cluster parts started here: a one-host SLURM (scripts/slurm-local.sh: munged, slurmctld,
slurmd) running a sweep as a job array, and an `mlflow server` over PostgreSQL (scripts/postgres-local.sh) taking
two concurrent parallel sweeps and a restart mid-sweep. Every variant is counted in MLflow by its identity (sweep,
run name): duplicates 0, lost 0. The parts are installed with apt-get where missing (root needed), else these
tests skip and say why; what a test started it stops.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from conftest import PLUMBING, REPO, MlflowServer, sweep_runs
from runner.sweep import Sweep
from runner.tags import SWEEP_TAG
from test_scale import records, start_cli, sweep_folder, wait_for

pytestmark = pytest.mark.cluster
SCRIPTS = REPO / "scripts"
TWO = ["precision=fp32,fp16"]
QUICK = [*PLUMBING, "backend=onnxruntime"]
# the preset asks for a GPU node (8 CPUs, 32 GB, 1 GPU): this one-host cluster has 2 CPUs and no GPU
SLURM_CPU = ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null",
             "hydra.launcher.cpus_per_task=1"]


def why_not_here(what: str, installed: bool) -> str | None:
    """Why `what` can neither be found (`installed`) nor installed here, or None."""
    if installed:
        return None
    if os.geteuid() != 0:
        return f"{what} not installed and not root (apt-get needs root)"
    if not shutil.which("apt-get"):
        return f"{what} not installed and no apt-get"
    return None


def script(name: str, action: str, env: dict, limit_s: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPTS / name), action], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=limit_s)
    if action == "start" and proc.returncode != 0:
        pytest.fail(f"{name} start failed:\n{proc.stdout}{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def slurm():
    """SLURM_CONF of the one-host cluster: the running one, or one started here (and stopped after)."""
    reason = why_not_here("slurm-wlm", all(shutil.which(c, path=f"{os.environ['PATH']}:/usr/sbin")
                                           for c in ("slurmctld", "slurmd", "munged", "sinfo")))
    if reason:
        pytest.skip(f"no SLURM: {reason}")
    env = {"SLURM_LOCAL_DIR": os.environ.get("SLURM_LOCAL_DIR", "/tmp/runner-slurm")}
    started = script("slurm-local.sh", "status", env).returncode != 0
    if started:
        script("slurm-local.sh", "start", env)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", f"{env['SLURM_LOCAL_DIR']}/slurm.conf")
        yield os.environ["SLURM_CONF"]
    if started:
        script("slurm-local.sh", "stop", env)


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    """An `mlflow server` over a fresh PostgreSQL cluster of this module (its own folder and port), artifacts
    served from the server's folder."""
    from runner.track import free_port

    reason = why_not_here("postgresql", any(Path("/usr/lib/postgresql").glob("*/bin/postgres")))
    if reason:
        pytest.skip(f"no PostgreSQL: {reason}")
    pytest.importorskip("psycopg", reason="psycopg missing: pip install 'runner[cluster]'")
    # a folder of /tmp, not pytest's: the `postgres` user that runs the cluster cannot enter root's 0700 basetemp
    env = {"POSTGRES_LOCAL_DIR": f"/tmp/runner-postgres-{uuid.uuid4().hex[:8]}", "POSTGRES_LOCAL_PORT": str(free_port())}
    store_uri = script("postgres-local.sh", "start", env).stdout.strip().splitlines()[-1]
    assert store_uri.startswith("postgresql://"), store_uri
    server = MlflowServer(tmp_path_factory.mktemp("pg_server"), store_uri)
    try:
        yield server.start()
    finally:
        server.stop(signal.SIGKILL)  # PostgreSQL keeps the store: nothing to wait for
        script("postgres-local.sh", "stop", env)
        shutil.rmtree(env["POSTGRES_LOCAL_DIR"], ignore_errors=True)


def tally(url: str, folder: Path) -> dict:
    """The sweep in `folder` as MLflow holds it: runs, duplicates and lost variants, counted by identity (the
    sweep's parent run, the variant's run name); `logged` the run ids."""
    sweep = Sweep.read(folder)
    _, children = sweep_runs(url)
    mine = [c for c in children if c.data.tags[SWEEP_TAG] == sweep.parent_run_id]
    count = collections.Counter(c.info.run_name for c in mine)
    expected = {r.result.name for r in records(folder)}
    return {"variants": sweep.total, "runs": len(mine), "duplicates": sum(n - 1 for n in count.values()),
            "lost": sweep.total - len(expected & set(count)), "logged": {c.info.run_id for c in mine}}


def assert_complete(url: str, folder: Path, total: int) -> dict:
    """Every variant of the sweep in `folder` has one run, the one its result.json names, and is in the summary."""
    figures = tally(url, folder)
    assert (figures["variants"], figures["runs"], figures["duplicates"], figures["lost"]) == (total, total, 0, 0)
    final = records(folder)
    assert len(final) == total and figures["logged"] == {r.mlflow_run_id for r in final}
    summary = pd.read_csv(folder / "summary.csv")
    cells = sorted(zip(summary["onnx"], summary["build"]))
    assert cells == sorted((r.result.cell.onnx.label, r.result.cell.build.label) for r in final)
    assert set(summary["status"]) == {"ok"}
    return figures


def test_slurm_sweep_runs_as_a_job_array_and_logs_each_variant_once(slurm, postgres_server, tmp_path, export_cache):
    outputs = tmp_path / "out"
    start = time.monotonic()
    proc = start_cli(["-m", *TWO, *QUICK, f"cache_dir={export_cache}", *SLURM_CPU, "tracking=server",
                      f"tracking.uri={postgres_server.url}"], outputs)
    out, _ = proc.communicate(timeout=600)
    wall = time.monotonic() - start
    assert proc.returncode == 0, out[-4000:]
    folder = sweep_folder(outputs)
    figures = assert_complete(postgres_server.url, folder, 2)
    print(f"SLURM: {figures['variants']} variants, {figures['runs']} runs in MLflow, {figures['duplicates']} "
          f"duplicates, {figures['lost']} lost, {wall:.0f} s")

    # SLURM itself ran them, as the tasks of one array
    (submission,) = folder.glob(".submitit/*/*_submission.sh")
    assert "#SBATCH --array=0-1" in submission.read_text()
    array_id = submission.parent.name
    shown = subprocess.run(["scontrol", "-o", "show", "job", array_id], capture_output=True, text=True, check=True)
    tasks = {f.split("=")[1] for line in shown.stdout.splitlines() for f in line.split() if f.startswith("ArrayTaskId=")}
    states = {f.split("=")[1] for line in shown.stdout.splitlines() for f in line.split() if f.startswith("JobState=")}
    assert tasks == {"0", "1"} and states == {"COMPLETED"}, shown.stdout


def test_two_concurrent_parallel_sweeps_on_postgres_log_every_run_once(postgres_server, tmp_path, export_cache):
    args = ["-m", *TWO, *QUICK, f"cache_dir={export_cache}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            "tracking=server", f"tracking.uri={postgres_server.url}"]
    start = time.monotonic()
    sweeps = [start_cli(args, tmp_path / f"out{i}") for i in range(2)]
    said = [proc.communicate(timeout=600)[0] for proc in sweeps]
    wall = time.monotonic() - start
    for proc, out in zip(sweeps, said):
        assert proc.returncode == 0, out[-4000:]
    figures = [assert_complete(postgres_server.url, sweep_folder(tmp_path / f"out{i}"), 2) for i in range(2)]
    print(f"PostgreSQL, 2 sweeps at once: {sum(f['variants'] for f in figures)} variants, "
          f"{sum(f['runs'] for f in figures)} runs in MLflow, {sum(f['duplicates'] for f in figures)} duplicates, "
          f"{sum(f['lost'] for f in figures)} lost, {wall:.0f} s")
    # the two sweeps overlapped, and so did the two jobs of each
    jobs = [sorted(records(sweep_folder(tmp_path / f"out{i}")), key=lambda r: r.started_ms) for i in range(2)]
    assert jobs[0][0].started_ms < jobs[1][-1].ended_ms and jobs[1][0].started_ms < jobs[0][-1].ended_ms
    for a, b in jobs:
        assert b.started_ms < a.ended_ms, "the two jobs of a sweep ran one after the other"


def test_postgres_server_restarted_mid_sweep_then_sync_logs_each_run_once(postgres_server, tmp_path, export_cache,
                                                                            runner_main):
    outputs = tmp_path / "out"
    proc = start_cli(["-m", "export=ultralytics,torch", *TWO, *QUICK, f"cache_dir={export_cache}", "tracking=server",
                      f"tracking.uri={postgres_server.url}"], outputs)
    try:
        wait_for(lambda: (outputs / "sweeps").is_dir() and any(r.logged for r in records(sweep_folder(outputs))),
                 "first logged result", proc)
        postgres_server.stop(signal.SIGKILL)
        wait_for(lambda: any(r.tracking_error for r in records(sweep_folder(outputs))),
                 "a result the stopped server could not take", proc)
        postgres_server.start()
        logged_before = {r.config_id for r in records(sweep_folder(outputs)) if r.logged}
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    folder = sweep_folder(outputs)
    final = records(folder)
    assert len(final) == 4 and all(r.result.status == "ok" for r in final)
    unlogged = [r for r in final if not r.logged]
    assert unlogged and all(r.tracking_error for r in unlogged), "no variant ran while the server was down"
    assert any(r.logged and r.config_id not in logged_before for r in final), "none logged to the restarted server"
    assert "runner sync --sweep" in out

    for attempt in range(2):  # a second sync finds everything there
        sync = runner_main(["sync", "--sweep", "latest", "--outputs", str(outputs)])
        assert sync.returncode == 0, sync.stdout + sync.stderr
        logged = len(unlogged) if attempt == 0 else 0
        assert f"{logged} run(s) logged, {4 - logged} already there" in sync.stdout
    figures = assert_complete(postgres_server.url, folder, 4)
    print(f"PostgreSQL, restart mid-sweep: {figures['variants']} variants, {figures['runs']} runs in MLflow, "
          f"{figures['duplicates']} duplicates, {figures['lost']} lost")
    (parent,) = [p for p in sweep_runs(postgres_server.url)[0] if p.info.run_id == Sweep.read(folder).parent_run_id]
    assert parent.info.status == "FINISHED" and parent.data.metrics["variants.ok"] == 4
