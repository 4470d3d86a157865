"""The sweep's parent, in the launching process: its folder and `sweep.json`, its MLflow parent run, and the
loopback server parallel jobs log through; opened before the first job, closed after the last.

Jobs learn what was opened from the `sweep` overrides added to their config (`sweep.Sweep.job_overrides`), since
a job on another host cannot read the sweep folder. An embedded sqlite store is served through a loopback
`mlflow server` when jobs run in parallel, so one process writes it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from runner.config import ConfigError, RunConfig, TrackingConfig
from runner.preflight import MULTIRUN_FLAGS, hydra_value, launcher_of
from runner.results import VariantResult
from runner.sweep import Sweep, SweepError, find_folder, new_folder, variant_id

SERIAL_LAUNCHERS = ("basic",)


@dataclass
class Launch:
    """What the launching process set up: the sweep (folder, parent run), the overrides it adds for Hydra (where
    the job folders go, what each job must know of the sweep), and the loopback tracking server, if any."""
    sweep: Sweep
    overrides: list[str]
    server: contextlib.AbstractContextManager


def open_sweep(argv: list[str], variants: list[RunConfig]) -> Launch:
    """Make (or, with `resume=`, reopen) the sweep folder and its parent run. Raises ConfigError before making
    anything where the store cannot be opened or a resumed sweep measured other variants."""
    first, multirun = variants[0], any(a in MULTIRUN_FLAGS for a in argv)
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    root = Path(first.outputs) / ("sweeps" if multirun else "runs")
    ids, command = [variant_id(v) for v in variants], [a for a in argv if a not in MULTIRUN_FLAGS]
    try:
        sweep = _reopened(find_folder(root, first.resume), command, ids) if first.resume else None
        tracker = _open_tracker(first.tracking) if first.tracking.enabled else None
        if sweep is None:
            given = hydra_value(argv, dir_key)
            folder = Path(given) if given else new_folder(root)
            folder.mkdir(parents=True, exist_ok=True)
            sweep = Sweep(folder, len(variants), command)
    except SweepError as exc:
        raise ConfigError(f"resume: {exc}") from None
    sweep.total, sweep.variants = len(variants), ids
    sweep.tracking, sweep.server_uri, server = None, None, contextlib.nullcontext()
    if tracker:
        _start_parent(tracker, sweep)
        sweep.tracking = first.tracking
        server = _shared_store(first.tracking.uri, launcher_of(argv), sweep)
    else:
        print("runner: tracking disabled (tracking.enabled=false): results stay in the sweep folder", flush=True)
    sweep.write()
    return Launch(sweep, [f"{dir_key}={sweep.folder}", *sweep.job_overrides()], server)


def _start_parent(tracker, sweep: Sweep) -> None:
    """Start the sweep's parent run, or resume it (closing the runs a kill left RUNNING)."""
    if sweep.parent_run_id:
        closed = tracker.reopen_sweep(sweep.parent_run_id)
        print(f"runner: resuming sweep {sweep.folder} (run {sweep.parent_run_id}); {closed} run(s) a kill left "
              f"RUNNING closed as KILLED", flush=True)
    else:
        sweep.parent_run_id = tracker.start_sweep(
            f"sweep of {sweep.total} variants", {"overrides": " ".join(sweep.overrides) or "(defaults)",
                                                 "variants": sweep.total, "folder": str(sweep.folder)})
    print(f"runner: sweep {sweep.parent_run_id} -> {tracker.uri} (experiment '{tracker.experiment}')", flush=True)


def _reopened(folder: Path, command: list[str], ids: list[str]) -> Sweep:
    """The sweep in `folder`, where this command composes the variants it measured, in the same order (a
    sweep.json made before the variants were kept: where it gives the same overrides). Raises SweepError."""
    sweep = Sweep.read(folder)
    asked = [a for a in command if not a.startswith("resume=")]
    if sweep.variants == ids or (sweep.variants is None and sweep.overrides == asked):
        return sweep
    ran = " ".join(sweep.overrides) or "(defaults)"
    if sweep.overrides == asked:  # the same words, composed otherwise: conf/ or the defaults changed since
        raise SweepError(f"sweep {folder} ran `{ran}`, which now makes other variants (the config changed "
                         f"since); start a new sweep without resume=")
    raise SweepError(f"sweep {folder} ran `{ran}`; this command asks `{' '.join(asked) or '(defaults)'}`: give "
                     f"the same overrides to resume it")


def _open_tracker(tracking: TrackingConfig):
    """The sweep's Tracker on the store the user named; an unreachable store is a ConfigError."""
    from runner.track import Tracker, store_problem

    try:
        return Tracker.of(tracking)
    except Exception as exc:  # MLflow's errors vary by store; the user needs the URI and the reason
        raise ConfigError(f"tracking.uri: cannot open {tracking.uri}: {store_problem(exc)}; start the server, or "
                          f"use the embedded store (tracking=sqlite)") from None


def _shared_store(uri: str, launcher: str, sweep: Sweep) -> contextlib.AbstractContextManager:
    """A loopback server over a sqlite store when jobs run in parallel (its URL in `sweep.server_uri`)."""
    from runner.track import LoopbackServer, sqlite_path

    if sqlite_path(uri) is None or launcher in SERIAL_LAUNCHERS:
        return contextlib.nullcontext()
    server = LoopbackServer(uri, sweep.folder)
    sweep.server_uri = server.url
    return server


def end_parent(sweep: Sweep, results: list[VariantResult], files: list[Path]) -> str | None:
    """Close the sweep's parent run with its counts and summary files; the reason where the store is gone (the
    summary files are written: `runner sync` catches up)."""
    return _on_parent(sweep, lambda tracker: tracker.end_sweep(sweep.parent_run_id, results, sweep.total, files))


def kill_parent(sweep: Sweep) -> str | None:
    """Close a stopped sweep's parent run, and its variant runs caught RUNNING, as KILLED; the reason where the
    store is gone (resume= or `runner sync` closes them later)."""
    return _on_parent(sweep, lambda tracker: tracker.kill_sweep(sweep.parent_run_id))


def _on_parent(sweep: Sweep, call) -> str | None:
    """`call(tracker)` on the sweep's store; None, or why the store could not be used."""
    from runner.track import Tracker, store_problem

    try:
        call(Tracker.of(sweep.tracking))
    except Exception as exc:  # MLflow's errors vary by store
        return store_problem(exc)
    return None
