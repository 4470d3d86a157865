"""Process isolation with real spawned children: crashes and timeouts become the variant's result."""
from __future__ import annotations

import os
import time

import isolate_targets as targets
from runner.isolate import run_isolated


def base():
    return targets.result("failed")


def test_result_of_a_healthy_child_is_returned_as_is():
    result = run_isolated(targets.succeed, (21,), 60, base())
    assert result.status == "ok"
    assert result.timings["export"] == 21.0
    assert result.failed_stage is None and result.error is None
    assert result.environment["pid"] != os.getpid()  # it really ran in another process


def test_child_log_records_reach_the_parent_with_the_prefix(caplog):
    caplog.set_level("INFO")
    run_isolated(targets.succeed, (3,), 60, base(), log_prefix="  [v] ")
    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("runner.export", "INFO", "  [v] export: 3 done") in said
    assert ("some.library", "WARNING", "  [v] a library warning") in said
    assert not any("chatter" in message for _, _, message in said)  # other libraries' INFO stays in the child


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
