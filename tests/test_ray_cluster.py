"""A Ray cluster of two nodes on this host, sharing no folder: `ray start --head` and `ray start --address=...`, each
in a working folder of its own with its own temp dir and HOME, and runner launched from a third. A sweep under
`hydra/launcher=ray hydra.launcher.ray.init.address=auto` spreads over both nodes; every job writes its folder
and its cache under its node's folder, and the launching process's summary holds every result all the same,
each logged to a real `mlflow server` once. `cluster`: `make test-cluster` runs it where the `ray` extra is
installed, inside a network namespace of loopback only, so no node talks over the host's outward address.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PLUMBING, REPO, MlflowServer, cli_env, sweep_runs
from runner.sweep import RESULT_FILE, JobRecord, job_records
from runner.track import free_port

FOUR = ["export=ultralytics,torch", "precision=fp32,fp16"]
ALIVE = "import ray; ray.init(log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"


def ray_env(address: str | None = None, **more: str) -> dict:
    """The environment of a Ray node or driver here: loopback only, this checkout's runner importable."""
    return {**cli_env(), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), **({"RAY_ADDRESS": address} if address else {}),
            **more}


def ray_node(folder: Path, *args: str) -> subprocess.Popen:
    """`ray start --block` in `folder` (its cwd, HOME and temp dir), importing this checkout's runner."""
    for sub in ("home", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    env = ray_env(HOME=str(folder / "home"))
    ray = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={folder / 'tmp'}", *args],
                            cwd=folder, env=env, stdout=open(folder / "ray.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop a node and the processes it started (they share its session)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_nodes(address: str, count: int, nodes: list[subprocess.Popen], limit_s: float = 180) -> None:
    """Until `count` nodes are alive, asked by a driver of its own (this process stays out of Ray)."""
    deadline = time.monotonic() + limit_s
    while True:
        alive = subprocess.run([sys.executable, "-c", ALIVE], capture_output=True, text=True, timeout=limit_s,
                               env=ray_env(address)).stdout.strip()
        if alive == str(count):
            return
        if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
            pytest.fail(f"the Ray cluster did not reach {count} nodes ({alive or 'none'} alive)")
        time.sleep(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server`, started before the Ray nodes take the cores."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.STARTUP_LIMIT_S = 180
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def cluster(server):
    """(address, head folder, worker folder): two live Ray nodes of one CPU each, in folders of their own. A
    short root: Ray's socket paths must fit in 107 characters."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the ray extra is not installed "
                                                                   "(pip install 'runner[ray]')")
    from ray._raylet import node_ip_address_from_perspective

    if node_ip_address_from_perspective(None) != "127.0.0.1":  # Ray would swap 127.0.0.1 for it
        pytest.skip("this host has an outward address, which Ray nodes would talk over; run it in a network "
                    "namespace of loopback only: make test-cluster")
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ray_node(root / "head", "--head", f"--port={port}", "--include-dashboard=false")
    nodes = [head]
    try:
        wait_for_nodes(address, 1, nodes)
        nodes.append(ray_node(root / "worker", f"--address={address}"))
        wait_for_nodes(address, 2, nodes)
        yield address, root / "head", root / "worker"
    finally:
        for node in reversed(nodes):
            stop(node)


@pytest.mark.cluster
def test_a_sweep_spreads_over_two_ray_nodes_and_the_summary_holds_every_result(server, cluster, tmp_path):
    address, head, worker = cluster
    launching = tmp_path / "launching"
    launching.mkdir()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "-m", *FOUR, *PLUMBING, "backend=onnxruntime", "hydra/launcher=ray",
         "hydra.launcher.ray.init.address=auto", "tracking=server", f"tracking.uri={server.url}", "outputs=outputs"],
        cwd=launching, capture_output=True, text=True, timeout=900, env=ray_env(address))
    wall_s = time.monotonic() - started
    said = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, said
    (launching / "sweep.log").write_text(proc.stdout + proc.stderr)
    (sweep,) = (launching / "outputs" / "sweeps").iterdir()
    records = job_records(sweep)
    parents, children = sweep_runs(server.url)

    assert len(records) == 4 and all(r.result.status == "ok" for r in records), said
    ran_in = {Path(r.ran_in.split(":", 1)[1]) for r in records}
    on_head = {p for p in ran_in if p.is_relative_to(head)}
    on_worker = {p for p in ran_in if p.is_relative_to(worker)}
    assert on_head and on_worker and on_head | on_worker == ran_in, ran_in  # both nodes ran, nothing ran here
    for path in ran_in:  # each job folder, and its cache, lie on its own node; here, only the records came back
        assert (path / RESULT_FILE).is_file() and (path / "runner.log").is_file()
        assert not (sweep / path.name / "runner.log").exists()
    assert (head / "outputs" / "cache").is_dir() and (worker / "outputs" / "cache").is_dir()
    assert not (launching / "outputs" / "cache").exists()
    assert all(JobRecord.read(sweep / p.name / RESULT_FILE) for p in ran_in)

    run_ids = [r.mlflow_run_id for r in records]
    assert len(parents) == 1 and len(children) == 4  # every run once: none lost, none twice
    assert sorted(run_ids) == sorted(c.info.run_id for c in children)
    print(f"\nray cluster: 4 variants over 2 nodes ({len(on_head)} on the head, {len(on_worker)} on the worker), "
          f"{len(children)} runs in MLflow, duplicates {len(run_ids) - len(set(run_ids))}, lost "
          f"{4 - len(records)}, wall {wall_s:.0f} s")


def test_a_ray_cluster_with_the_embedded_store_is_refused_before_any_work(tmp_path, runner_main):
    proc = runner_main(["-m", "precision=fp32,fp16", "hydra/launcher=ray", "hydra.launcher.ray.init.address=auto",
                        f"outputs={tmp_path}"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("runner: error: tracking: jobs of hydra/launcher=ray run on other hosts and cannot "
                                  "share the embedded store sqlite:///")
    assert not (tmp_path / "sweeps").exists()
