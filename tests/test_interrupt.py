"""Ctrl-C, SIGTERM and `kill -9` of a real sweep: what is left behind, and what a resume does with it.

Each sweep runs `python -m runner` in a session of its own, as a terminal runs a command; the signal goes where a
terminal (Ctrl-C: the whole process group) or a scheduler (SIGTERM: the launching process alone) sends it, once
a variant is being measured. Two variants, `data.limit=2 bench=quick` at 640 px: a variant measures for a few
seconds. Stopping a measuring sweep and resuming it takes minutes of real processes: those tests are `slow`.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, cli_env, run_module, sweep_runs
from runner.track import healthy

SWEEP = ["-m", "precision=fp32,fp16", "bench=quick", "data.limit=2"]
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
RESUME = re.compile(r"^runner: resume with: python -m runner (.+ resume=(\S+))$", re.M)


class Launched:
    """A sweep started as a terminal starts it, its output in files, and every process it starts, for the end."""

    def __init__(self, args: list[str], folder: Path):
        self.stdout, self.stderr = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=REPO, stdout=out, stderr=err,
                                         env=cli_env(), start_new_session=True)
        self.family: list[psutil.Process] = []

    def wait_for(self, pattern: str, after: str = "", limit_s: float = 300) -> re.Match:
        """The first match of `pattern` in stdout after the text `after`, once it is there."""
        deadline = time.monotonic() + limit_s
        while True:
            text = self.stdout.read_text()
            found = re.search(pattern, text[text.find(after):]) if after in text else None
            if found:
                self.family = psutil.Process(self.proc.pid).children(recursive=True)
                return found
            assert self.proc.poll() is None, f"the sweep ended before '{pattern}':\n{text}\n{self.stderr.read_text()}"
            assert time.monotonic() < deadline, f"no '{pattern}' after {limit_s} s:\n{text}"
            time.sleep(0.1)

    def alive(self) -> list[str]:
        return [_command(p) for p in self.family if _running(p)]

    def clean_up(self) -> None:
        """Leave nothing running, even where the test failed."""
        for process in [psutil.Process(self.proc.pid), *self.family] if self.proc.poll() is None else self.family:
            if _running(process):
                process.kill()


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def _until(condition, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _stopped(sweep: Launched, rc: int, signum: int) -> tuple[str, Path, int]:
    """Check a sweep that `signum` stopped: its exit code, no traceback, nothing left running, the resume line.
    Returns the resume line's arguments, the sweep folder, and how many variants it says have a result."""
    out, err = sweep.stdout.read_text(), sweep.stderr.read_text()
    assert rc == 128 + signum, f"exit {rc}\n{out[-3000:]}\n{err[-3000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    assert _until(lambda: not sweep.alive(), 15), f"still running 15 s after the sweep stopped: {sweep.alive()}"
    kept = re.search(rf"^runner: stopped by {signal.Signals(signum).name}: (\d) of 2 variants have a result; "
                     r"sweep run [0-9a-f]{32} closed as KILLED$", out, re.M)
    resume = RESUME.search(out)
    assert kept and resume, out[-2000:]
    return resume.group(1), Path(resume.group(2)), int(kept.group(1))


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_resume_measures_the_variant_again(tmp_path, export_cache):
    """SIGINT to the process group (Ctrl-C) while the second variant measures: the sweep stops there, the variant
    gets no result (no false failure), the parent run is KILLED, and the printed command finishes the sweep."""
    outputs = tmp_path / "outputs"
    args = [*SWEEP, f"cache_dir={export_cache}", f"outputs={outputs}"]
    sweep = Launched(args, tmp_path)
    try:
        sweep.wait_for(r"\] validate: ", after="[2/2]")
        os.killpg(sweep.proc.pid, signal.SIGINT)
        rc = sweep.proc.wait(timeout=120)
    finally:
        sweep.clean_up()
    resume_args, folder, kept = _stopped(sweep, rc, signal.SIGINT)
    assert resume_args == shlex.join([*args, f"resume={folder}"])
    assert kept == 1 and (folder / "0" / "result.json").is_file()
    assert not (folder / "1" / "result.json").exists()  # interrupted: nothing to keep, so resume measures it
    (parent,), children = sweep_runs(f"sqlite:///{outputs}/mlflow.db")
    assert parent.info.status == "KILLED"
    assert [(c.info.run_name, c.info.status) for c in children] == [("yolov8n__ul-st-fp16__ort-st-fp16", "FINISHED")]

    resumed = run_module(shlex.split(resume_args), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[1/2] yolov8n__ul-st-fp16__ort-st-fp16: kept from" in resumed.stdout  # fp16 launches first
    assert "[2/2] yolov8n__ul-st-fp32__ort-st-fp32 (onnxruntime)" in resumed.stdout
    assert "runner: 2/2 variants ok" in resumed.stdout
    (parent,), children = sweep_runs(f"sqlite:///{outputs}/mlflow.db")
    assert parent.info.status == "FINISHED" and sorted(c.info.status for c in children) == ["FINISHED"] * 2


@pytest.mark.slow
def test_sigterm_to_the_launching_process_stops_its_workers_and_their_children(tmp_path, export_cache):
    """SIGTERM to the launching process alone (as a scheduler sends it) of a joblib sweep: the loky workers, the
    variants' children and the loopback server all stop with it; nothing measured half is kept."""
    outputs = tmp_path / "outputs"
    sweep = Launched([*SWEEP, *JOBLIB, f"cache_dir={export_cache}", f"outputs={outputs}"], tmp_path)
    try:
        sweep.wait_for(r"\] validate: ")
        commands = [_command(p) for p in sweep.family]  # the loky workers, and a variant's child measuring
        assert any("loky" in c for c in commands) and any(re.search(r"runner\.isolate \d", c) for c in commands)
        sweep.proc.send_signal(signal.SIGTERM)
        rc = sweep.proc.wait(timeout=120)
    finally:
        sweep.clean_up()
    _, folder, kept = _stopped(sweep, rc, signal.SIGTERM)
    results = sorted(folder.glob("*/result.json"))
    assert kept == len(results) < 2
    (parent,), children = sweep_runs(f"sqlite:///{outputs}/mlflow.db")
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in children] == ["FINISHED"] * kept


def test_the_loopback_server_dies_with_a_killed_sweep(tmp_path):
    """`kill -9` of a joblib sweep: its loopback mlflow server (a session of its own) stops answering at once."""
    sweep = Launched([*SWEEP, *JOBLIB, f"outputs={tmp_path / 'outputs'}"], tmp_path)
    try:
        url = sweep.wait_for(r"parallel jobs log through (http://127\.0\.0\.1:\d+) ").group(1)
        assert healthy(url)
        sweep.proc.kill()
        assert sweep.proc.wait(timeout=10) == -signal.SIGKILL
        assert _until(lambda: not healthy(url), 10), f"{url} still answers 10 s after its sweep was killed"
    finally:
        sweep.clean_up()
