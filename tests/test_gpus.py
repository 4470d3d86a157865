"""The host-wide GPU pool of runner.gpus, with real lock files and real processes.

This machine has no NVIDIA driver, so each test puts a stand-in `nvidia-smi` (a shell script) at the front
of PATH: it replaces the driver's tool, which this machine lacks, and answers the one query runner.gpus
makes (`--query-gpu=index,uuid --format=csv,noheader`, optionally `-i <index or uuid>`) for a host of two
GPUs, 0 (GPU-aaaa) and 1 (GPU-bbbb). The lock folder goes to a private temp folder, so these locks never
meet those of another test run, or of a real sweep, on the same host.
"""
from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from runner import gpus
from runner.gpus import Gpu

GPU0, GPU1 = Gpu("0", "GPU-aaaa"), Gpu("1", "GPU-bbbb")

# The stand-in for the NVIDIA driver's nvidia-smi: two GPUs; `-i` selects by index or UUID (or a comma list of
# them); every call is appended to calls.log beside it; any other query is refused, as a strict fake should.
FAKE_NVIDIA_SMI = """#!/bin/sh
here=$(dirname "$0")
echo "$*" >> "$here/calls.log"
query=""; format=""; select=""
while [ $# -gt 0 ]; do
  case "$1" in
    --query-gpu=*) query="${1#--query-gpu=}" ;;
    --format=*) format="${1#--format=}" ;;
    -i) shift; select="$1" ;;
    *) echo "fake nvidia-smi: unexpected argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$query" != "index,uuid" ] || [ "$format" != "csv,noheader" ]; then
  echo "fake nvidia-smi: unexpected query '$query' format '$format'" >&2; exit 2
fi
found=0
for line in "0, GPU-aaaa" "1, GPU-bbbb"; do
  index="${line%%,*}"; uuid="${line#*, }"
  if [ -z "$select" ]; then echo "$line"; found=1; continue; fi
  for want in $(echo "$select" | tr ',' ' '); do
    if [ "$want" = "$index" ] || [ "$want" = "$uuid" ]; then echo "$line"; found=1; fi
  done
done
if [ "$found" = 0 ]; then echo "No devices were found" >&2; exit 6; fi
"""


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temp folder of this test's own for runner.gpus' lock folder (in this process and its children)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again; restored afterwards
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return folder


@pytest.fixture
def fake_smi(tmp_path, monkeypatch, private_tmp) -> Path:
    """The stand-in nvidia-smi first on PATH; returns its calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # importing ultralytics elsewhere in the session sets it
    return bin_dir / "calls.log"


def lock_dir(private_tmp: Path) -> Path:
    return private_tmp / f"runner-gpus-{os.getuid()}"


CLAIM_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from runner import gpus
wanted = {wanted}
print("claiming", flush=True)
with gpus.claim(wanted) as (gpu, env):
    print("got", gpu.index, env["CUDA_VISIBLE_DEVICES"], flush=True)
"""


def start_claimer(tmp_path: Path, wanted) -> tuple[subprocess.Popen, Path, Path]:
    """Another process that claims `wanted`, prints `got <index> <CUDA_VISIBLE_DEVICES>` and lets go at once."""
    out, err = tmp_path / "claimer.out", tmp_path / "claimer.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", CLAIM_SCRIPT.format(wanted=repr(wanted))], cwd=REPO,
                                stdout=stdout, stderr=stderr, env=os.environ.copy())
    return proc, out, err


def wait_until(condition, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {limit_s} s")
        time.sleep(0.05)


def assert_waits_for_a_gpu(proc: subprocess.Popen, out: Path, err: Path, taken: int) -> None:
    """The claimer got to its claim, said it waits for a GPU, and is still waiting 1.5 s later."""
    try:
        wait_until(lambda: f"waiting for a free GPU (all {taken} taken)" in err.read_text() or proc.poll() is not None,
                   30, "'waiting for a free GPU' from the second process")
        assert proc.poll() is None, f"the second process ended while every GPU was taken:\n{out.read_text()}" \
                                    f"\n{err.read_text()}"
        time.sleep(1.5)
        assert proc.poll() is None, f"the second process got a GPU that was taken:\n{out.read_text()}"
        assert "got" not in out.read_text()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def test_host_gpus_reads_the_stand_in(fake_smi):
    assert gpus.host_gpus() == [GPU0, GPU1]
    assert gpus.host_gpus("1") == [GPU1]
    assert gpus.host_gpus("GPU-aaaa") == [GPU0]
    assert gpus.host_gpus("7") == []  # nvidia-smi fails: no such GPU, no exception


def test_two_claims_at_once_get_different_gpus(fake_smi, private_tmp):
    with gpus.claim("auto") as (first, first_env):
        with gpus.claim("auto") as (second, second_env):
            assert {first, second} == {GPU0, GPU1}
            cores = str(max(1, os.cpu_count() // 2))  # two GPUs: each child gets half the cores
            assert first_env == {"CUDA_VISIBLE_DEVICES": first.index, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                 "OMP_NUM_THREADS": cores, "RUNNER_CPU_THREADS": cores}
            assert second_env == {**first_env, "CUDA_VISIBLE_DEVICES": second.index}
            assert first.environment() == {"gpu.index": first.index, "gpu.uuid": first.uuid}
            assert second.environment() == {"gpu.index": second.index, "gpu.uuid": second.uuid}
    assert sorted(p.name for p in lock_dir(private_tmp).iterdir()) == ["gpu0.lock", "gpu1.lock"]
    # both given back: the next claim gets the first GPU again, at once
    with gpus.claim("auto") as (again, _):
        assert again == GPU0


def test_a_third_claim_waits_for_a_released_gpu(fake_smi, private_tmp, tmp_path):
    with gpus.claim("auto") as (first, _):
        with gpus.claim("auto") as (second, _):
            proc, out, err = start_claimer(tmp_path, "auto")
            assert_waits_for_a_gpu(proc, out, err, taken=2)
        released = second.index  # the inner claim ended: its GPU is free, the outer one still held
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"the waiting process did not get GPU {released} once it was free")
        assert proc.returncode == 0, err.read_text()
        assert out.read_text().splitlines() == ["claiming", f"got {released} {released}"]
        assert first.index != released


def test_a_list_of_indices_only_ever_gives_those(fake_smi, private_tmp, tmp_path):
    for _ in range(3):  # GPU 0 is free, and first on the host: still GPU 1
        with gpus.claim([1]) as (gpu, env):
            assert gpu == GPU1 and env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == str(os.cpu_count())
    with gpus.claim("auto") as (other, _):
        assert other == GPU0
        with gpus.claim([1]) as (gpu, env):
            assert gpu == GPU1 and env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == str(os.cpu_count())
    with gpus.claim([1]) as (gpu, _):
        assert gpu == GPU1
        proc, out, err = start_claimer(tmp_path, [1])  # GPU 0 is free now: the claimer must not take it
        assert_waits_for_a_gpu(proc, out, err, taken=1)
    proc.wait(timeout=30)
    assert proc.returncode == 0, err.read_text()
    assert out.read_text().splitlines() == ["claiming", "got 1 1"]


def test_a_scheduler_s_cuda_visible_devices_stands(fake_smi, private_tmp, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # as SLURM or Ray set it
    folder = lock_dir(private_tmp)
    folder.mkdir()
    held = [open(folder / f"gpu{i}.lock", "w") for i in (0, 1)]
    for handle in held:  # every GPU of the pool taken: a claim that took a lock would wait forever
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    got = []
    worker = threading.Thread(target=lambda: got.append(_claim_once("auto")), daemon=True)
    try:
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "claim() waited for a lock although CUDA_VISIBLE_DEVICES was set"
    finally:
        for handle in held:
            handle.close()
    assert got == [(GPU1, {})]  # the GPU it runs on (for the result), and no change to the child's environment
    assert sorted(p.name for p in folder.iterdir()) == ["gpu0.lock", "gpu1.lock"]  # only ours
    assert fake_smi.read_text().splitlines() == ["--query-gpu=index,uuid --format=csv,noheader -i 1"]


def test_a_preset_uuid_is_looked_up_too(fake_smi, private_tmp, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert _claim_once("auto") == (GPU1, {})
    assert not lock_dir(private_tmp).exists()  # no lock folder: no lock taken


def _claim_once(wanted):
    with gpus.claim(wanted) as (gpu, env):
        return gpu, env


def test_no_nvidia_smi_means_no_gpu(tmp_path, private_tmp, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert gpus.host_gpus() == []
    assert _claim_once("auto") == (None, {})
    assert _claim_once([0, 1]) == (None, {})
    assert not lock_dir(private_tmp).exists()


# The lock folder is in the host's shared temp folder: another user may have made it first, or planted links there.
def test_the_lock_folder_is_private_and_the_locks_too(fake_smi, private_tmp):
    with gpus.claim("auto"):
        pass
    folder = lock_dir(private_tmp)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "gpu0.lock").stat().st_mode) == 0o600


def test_a_planted_link_is_refused_and_its_target_kept(fake_smi, private_tmp, tmp_path):
    folder = lock_dir(private_tmp)
    folder.mkdir(mode=0o700)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (folder / "gpu0.lock").symlink_to(victim)
    refused = _refusal()
    assert victim.read_text() == "keep me"  # not truncated through the link
    assert refused == f"{folder / 'gpu0.lock'} is not ours; remove it or set TMPDIR"


def _refusal() -> str | None:
    """What claim() refuses with, or None where it claims a GPU."""
    try:
        _claim_once("auto")
    except gpus.PoolError as exc:
        return str(exc)
    return None


def _link_to_a_folder(folder: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder.symlink_to(elsewhere)


def _owned_by_another_user(folder: Path, tmp_path: Path) -> None:
    folder.mkdir(mode=0o700)
    os.chown(folder, os.getuid() + 4242, os.getgid() + 4242)


@pytest.mark.parametrize("plant", [
    _link_to_a_folder,
    pytest.param(_owned_by_another_user, marks=pytest.mark.skipif(os.getuid() != 0, reason="chown needs root"))])
def test_a_lock_folder_not_ours_is_refused(fake_smi, private_tmp, tmp_path, plant):
    folder = lock_dir(private_tmp)
    plant(folder, tmp_path)
    assert _refusal() == f"{folder} is not ours; remove it or set TMPDIR"
    assert not list(folder.iterdir())  # no lock made in it
