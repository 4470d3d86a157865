"""`runner [overrides]`: preflight every variant, open the sweep, let Hydra launch its jobs, summarise it.

This is the launching process. Hydra parses the command line itself (its flags, `-m`, the overrides) and runs
`job.task` under whichever launcher the command names. SIGINT or SIGTERM stops the sweep (`stopped`): the
variant being measured gets no result, the runs are closed as KILLED, and the command to resume is printed.
"""
from __future__ import annotations

import contextlib
import shlex
import signal
import sys

from runner import backends, config
from runner.config import BackendName, ConfigError, RunConfig
from runner.environment import quiet_defaults
from runner.isolate import STOP_SIGNALS, Interrupted
from runner.job import task
from runner.parent import Launch, kill_parent, open_sweep
from runner.preflight import CONF_DIR, MULTIRUN_FLAGS, USAGE_EXIT, preflight
from runner.summary import finish_sweep, shown
from runner.sweep import Sweep, job_records

HYDRA_ONLY = ("--help", "-h", "--hydra-help", "--info")  # with --cfg: Hydra answers, no sweep runs


def main(argv: list[str]) -> int:
    """The exit code; 128 + the signal's number where SIGINT or SIGTERM stopped the sweep."""
    with stop_on_signals():
        try:
            return _main(argv)
        except Interrupted as stop:  # while the sweep was checked or opened: no variant ran
            print(f"runner: stopped by {stop.name} before any variant ran", file=sys.stderr, flush=True)
            return 128 + stop.signum


def _main(argv: list[str]) -> int:
    quiet_defaults()
    config.register()
    if any(a in HYDRA_ONLY or a.startswith("--cfg") for a in argv):
        _hydra(argv)
        return 0
    try:
        variants = preflight(argv)
        launch = open_sweep(argv, variants)
    except ConfigError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    announce_backends(variants)
    try:
        return _launch(argv, launch)
    except Interrupted as stop:
        return stopped(launch.sweep, argv, stop)


def announce_backends(variants: list[RunConfig]) -> None:
    """Say once, up front, what `backend=auto` picked."""
    if any(v.backend.name == BackendName.auto for v in variants):
        print(backends.auto_choice(), flush=True)


def _launch(argv: list[str], launch: Launch) -> int:
    try:
        with launch.server as server:
            if server:
                print(f"runner: parallel jobs log through {server.url} (a loopback mlflow server over "
                      f"{server.sqlite_uri})", flush=True)
            _hydra([*argv, *launch.overrides])
    except SystemExit as exc:  # Hydra reports its own errors and exits; the summary below still runs
        if exc.code:
            print(f"runner: hydra exited with {exc.code}", file=sys.stderr)
    return finish_sweep(launch.sweep)


def _hydra(argv: list[str]) -> None:
    import hydra

    flags = [a for a in argv if a in MULTIRUN_FLAGS]  # Hydra's parser takes them only before the overrides
    sys.argv = [sys.argv[0], *flags, *(a for a in argv if a not in MULTIRUN_FLAGS)]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise Interrupted in this (the main) thread, even where the shell started runner with
    SIGINT ignored (`&`); a repeat while stopping is ignored. The handlers before are restored on leaving."""
    def handler(signum, frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    before = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


def stopped(sweep: Sweep, argv: list[str], stop: Interrupted) -> int:
    """After SIGINT or SIGTERM: close the sweep's runs as KILLED and print how to resume it. Returns 128 + the
    signal's number (130, 143), the shell's exit code for a command a signal ended."""
    kept = len(job_records(sweep.folder))
    problem = kill_parent(sweep) if sweep.tracking and sweep.parent_run_id else None
    parent = f"; sweep run {sweep.parent_run_id} closed as KILLED" if sweep.tracking and not problem else ""
    print(f"\nrunner: stopped by {stop.name}: {kept} of {sweep.total} variants have a result{parent}", flush=True)
    if problem:
        print(f"runner: the sweep's runs stay RUNNING in MLflow ({problem}); resuming closes them", flush=True)
    flags = [a for a in argv if a in MULTIRUN_FLAGS][:1]
    rest = [a for a in argv if a not in MULTIRUN_FLAGS and not a.startswith("resume=")]
    print(f"runner: resume with: python -m runner {shlex.join([*flags, *rest, f'resume={shown(sweep.folder)}'])}",
          flush=True)
    return 128 + stop.signum
