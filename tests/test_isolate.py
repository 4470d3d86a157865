"""Process isolation with real spawned children: crashes and timeouts become the variant's result."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import isolate_targets as targets
from conftest import REPO, TESTS
from runner.isolate import Interrupted, run_isolated


def base():
    return targets.result("failed")


def test_result_of_a_healthy_child_is_returned_as_is():
    result = run_isolated(targets.succeed, (21,), 60, base())
    assert result.status == "ok"
    assert result.timings["export"] == 21.0
    assert result.failed_stage is None and result.error is None
    assert result.environment["pid"] != os.getpid()  # it really ran in another process


def test_runner_records_reach_the_parent_and_the_rest_only_the_job_log(caplog, capfd, tmp_path):
    job_log = tmp_path / "runner.log"
    handler = logging.FileHandler(job_log)  # as Hydra's job logging has it, beside its console handler
    logging.getLogger().addHandler(handler)
    caplog.set_level("INFO")
    try:
        assert run_isolated(targets.say_everything, (3,), 60, base(), log_prefix="  [v] ").status == "ok"
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("runner.export", "INFO", "  [v] export: 3 done")]  # what the console gets
    console = capfd.readouterr()
    logged = job_log.read_text()
    for line in ("[some.library][WARNING] a library warning", "a library's Python warning", "a library's print",
                 "[E:native] a C++ logger's line"):
        assert line in logged and line not in console.out + console.err, (line, logged)
    assert "export: 3 done" in logged  # runner's own lines too, through the parent's handler
    assert "chatter" not in logged  # other libraries' INFO stays in the child


def test_a_result_sent_counts_though_the_child_lingers_at_exit(monkeypatch):
    monkeypatch.setattr("runner.isolate.EXIT_S", 1)
    start = time.monotonic()
    result = run_isolated(targets.succeed_then_linger, (7,), 60, base())
    assert result.status == "ok" and result.timings["export"] == 7.0, result.error
    assert time.monotonic() - start < 30


def test_segfault_names_the_stage_and_keeps_the_partial_result():
    result = run_isolated(targets.segfault_in_build, (), 60, base())
    assert result.status == "failed"
    assert result.failed_stage == "build"
    assert result.error == "crash: child process killed by SIGSEGV in stage 'build'"
    # published before the crash: survives it
    assert result.started_at == "exported" and result.timings == {"export": 1.5}


def test_abort_is_sigabrt_on_the_base_result():
    result = run_isolated(targets.abort_in_validate, (), 60, base())
    assert result.status == "failed"
    assert result.failed_stage == "validate"
    assert "SIGABRT" in result.error
    assert result.started_at is None and result.timings == {}  # nothing published: the base carries it


def test_timeout_kills_the_child_and_keeps_the_partial_result(tmp_path):
    start = time.monotonic()
    result = run_isolated(targets.sleep_in_bench, (60,), 3, base())
    elapsed = time.monotonic() - start
    assert result.status == "failed"
    assert result.failed_stage == "bench"
    assert "timeout" in result.error
    assert "stage 'bench'" in result.error and "backend.timeout_s" in result.error
    assert result.started_at == "before-bench"
    assert elapsed < 30, f"the timeout of 3 s took {elapsed:.1f} s"


def test_timed_out_child_is_gone(tmp_path):
    pid_file = tmp_path / "pid"
    result = run_isolated(targets.report_pid_then_sleep, (str(pid_file),), 3, base())
    assert result.failed_stage == "build" and "timeout" in result.error
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"the timed-out child {pid} is still alive")


def test_exception_in_child_is_a_failed_result_with_its_message_and_traceback():
    result = run_isolated(targets.raise_in_export, (), 60, base())
    assert result.status == "failed"
    assert result.failed_stage == "export"
    assert result.error == "ValueError: bad weights: unexpected key 'model'"
    assert "Traceback" in result.error_detail and "raise_in_export" in result.error_detail


def test_nonzero_exit_is_reported_with_its_code():
    result = run_isolated(targets.exit_nonzero, (), 60, base())
    assert result.status == "failed"
    assert result.failed_stage == "build"
    assert "exited with code 3" in result.error


def test_isolation_works_inside_a_daemonic_worker():
    """joblib's loky workers and Ray actors are daemonic: they may not start multiprocessing children, and
    runner.isolate's subprocess child is none."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=targets.isolate_in_daemonic_worker, args=(queue,), daemon=True)
    worker.start()
    try:
        daemonic, worker_pid, status, child_pid, error, refused = queue.get(timeout=120)
    finally:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()
    assert daemonic is True and worker_pid == worker.pid
    assert "daemonic processes are not allowed to have children" in refused  # the trap this avoids
    assert status == "ok", error
    assert child_pid not in (None, os.getpid(), worker_pid)  # ran in a third process
    assert worker.exitcode == 0


def _gone(pid: int) -> bool:
    """True when `pid` no longer runs: no such process, or a zombie (dead, not yet reaped by its new parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state in ("Z", "X")


def test_the_variant_child_dies_with_its_parent(tmp_path):
    """`kill -9` of the process that runs a variant leaves no orphan measuring on (PR_SET_PDEATHSIG)."""
    pid_file = tmp_path / "child.pid"
    script = ("import sys, isolate_targets as t\n"
              "from runner.isolate import run_isolated\n"
              f"run_isolated(t.report_pid_then_sleep, ({str(pid_file)!r},), 120, t.result('failed'))\n"
              "print('run_isolated returned', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert parent.poll() is None, f"the parent ended before its child started:\n{parent.stdout.read()}"
            assert time.monotonic() < deadline, "the child never wrote its pid"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert child != parent.pid
        assert "runner.isolate" in Path(f"/proc/{child}/cmdline").read_text()  # the variant's child, running
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        assert parent.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while not _gone(child):
            assert time.monotonic() < deadline, f"the child {child} still runs 5 s after its parent was killed"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)  # leave nothing behind, even when the test fails
        parent.stdout.close()


def test_env_reaches_the_child_and_only_the_child(monkeypatch):
    monkeypatch.delenv("RUNNER_TEST_VAR", raising=False)
    result = run_isolated(targets.report_env, ("RUNNER_TEST_VAR",), 60, base(), env={"RUNNER_TEST_VAR": "gpu-3"})
    assert result.status == "ok", result.error
    assert result.environment["var"] == "gpu-3"
    assert "RUNNER_TEST_VAR" not in os.environ  # the parent's environment is left as it was
    result = run_isolated(targets.report_env, ("RUNNER_TEST_VAR",), 60, base())
    assert result.environment["var"] is None  # nothing carried over from the last child


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_child_stopped_by_a_signal_is_no_result(tmp_path, sig):
    """Ctrl-C reaches the variant's child too: it stops at once, and that is no verdict on the variant."""
    pid_file = tmp_path / "child.pid"

    def signal_the_child():
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), sig)

    threading.Thread(target=signal_the_child, daemon=True).start()
    with pytest.raises(Interrupted) as stopped:
        run_isolated(targets.report_pid_then_sleep, (str(pid_file),), 60, base())
    assert stopped.value.signum == sig
