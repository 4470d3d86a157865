"""The sweep, top to bottom: check it, open it, launch its jobs under any Hydra launcher, summarise it.

`main` runs in the launching process. `preflight` composes every variant of the command line before any
work starts, so a bad value or a bad file anywhere in the sweep exits 2 with one line. `open_sweep` makes
the sweep folder and the parent MLflow run and hands both to the jobs as config; for a parallel launcher
it serves an embedded sqlite store through a loopback `mlflow server`. `task` is the job: config in,
`result.json` and a child run out, with nothing shared with the launching process, so any launcher
(joblib's loky workers, SLURM, Ray) can run it. `finish_sweep` summarises from the job folders; `sync`
logs what a lost store missed. SIGINT or SIGTERM stops the sweep (`stopped`): the variant being measured
gets no result, the runs are closed as KILLED, and the command to resume is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import itertools
import json
import logging
import os
import shlex
import signal
import sys
import time
import traceback
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner import backends, cache, config, gpus, inputs
from runner.config import BackendName, ConfigError, RunConfig
from runner.isolate import STOP_SIGNALS, Interrupted, run_isolated
from runner.pipeline import new_result, run_variant
from runner.report.frame import results_frame
from runner.report.render import summary
from runner.results import VariantResult
from runner.sweep import JobRecord, Sweep, SweepError, find_folder, identity, job_records, new_folder

log = logging.getLogger("runner")
CONF_DIR = config.conf_dir()
USAGE_EXIT = 2
LOST_EXIT = 1
MULTIRUN_FLAGS = ("-m", "--multirun")
SERIAL_LAUNCHERS = ("basic",)
LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local", "ray")  # their jobs can reach 127.0.0.1 of this host
# Our launcher presets keep the plugins' names on purpose, so Hydra checks them against the plugins' schemas. It
# warns about that wherever it composes: here, and in the launcher's workers, which import this module first.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


def quiet_defaults() -> None:
    """Environment defaults of every runner process: offline, quiet, and an MLflow that fails in seconds."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the summary names the runs


def unknown_key(node: DictConfig, schema: type, prefix: str = "") -> str | None:
    """A one-line complaint about the first key of `node` that `schema` (a dataclass) does not have, or None.

    Hydra lets `+key=value` add keys even to a structured config, so a typo would run on defaults."""
    fields = {f.name for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            where = f"'{prefix.rstrip('.')}'" if prefix else "the config"
            return f"{prefix}{key}: not a key of {where}; {hint}allowed: {', '.join(sorted(fields))}"
        if dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            problem = unknown_key(node[key], hints[key], f"{prefix}{key}.")
            if problem:
                return problem
    return None


def to_run_config(cfg: DictConfig) -> RunConfig:
    """A composed config (no `hydra` node: Hydra drops it from the job's config) as the typed, fully resolved
    dataclass tree; raises ConfigError."""
    problem = unknown_key(cfg, RunConfig)
    if problem:
        raise ConfigError(problem)
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    config.check(run)
    return run


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    text = " ".join(str(getattr(exc, "msg", exc)).split("\n")[0].split())
    return f"{key}: {text}" if key else text


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides: list[str]) -> RunConfig:
    try:
        return to_run_config(compose(config_name="config", overrides=overrides))
    except MissingConfigException as exc:  # an unknown group option: name the group and its options
        for key, _, value in (o.lstrip("+~").partition("=") for o in overrides):
            if (CONF_DIR / key).is_dir() and f"'{key}/{value}'" in str(exc):
                raise ConfigError(f"{key}: unknown option '{value}'; allowed: {', '.join(_group_options(key))}") \
                    from None
        raise ConfigError(str(exc).splitlines()[0]) from None
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException):
            raise ConfigError(_omegaconf_message(cause)) from None
        raise ConfigError(" ".join(str(exc).split())) from None


def _sweep_values(override) -> list[str]:
    """The `key=value` lines a sweep override stands for; glob over a config group's options, list, range.
    Raises ConfigError where they are none, or one comes twice."""
    key = override.get_key_element()
    options = ""
    if isinstance(override.value(), Glob):
        if not (CONF_DIR / key).is_dir():
            raise ConfigError(f"{key}: glob() selects options of a config group; {key} is not one")
        values, options = override.value().filter(_group_options(key)), f"; options: {', '.join(_group_options(key))}"
    elif override.is_interval_sweep():
        raise ConfigError(f"{key}: interval() needs an optimizing sweeper (Optuna, Ax, Nevergrad); "
                          f"give a list (a,b) or range(start,stop,step)")
    else:
        values = [str(v) for v in override.sweep_string_iterator()]
    given = override.input_line.partition("=")[2]
    if not values:
        raise ConfigError(f"{key}: {given} selects no value, so the sweep would run nothing{options}")
    twice = next((v for v in values if values.count(v) > 1), None)
    if twice is not None:
        raise ConfigError(f"{key}: {twice} comes twice in {given}; give each value once")
    return [f"{key}={v}" for v in values]


def _check_multirun(argv: list[str], parsed: list) -> None:
    """Refuse a sweep value without -m: Hydra's single run would fail on it after the run folder is made."""
    swept = next((o.input_line for o in parsed if o.is_sweep_override()), None)
    if swept and not any(a in MULTIRUN_FLAGS for a in argv):
        raise ConfigError(f"{swept} is a sweep: add -m (runner -m {' '.join(argv)})")


def variant_id(run: RunConfig) -> str:
    """`sweep.identity` of a composed variant: the `config_id` its job gives its result."""
    return identity(OmegaConf.to_container(OmegaConf.structured(run), resolve=True, enum_to_str=True))


def _check_distinct(combos: list[tuple[str, ...]], variants: list[RunConfig]) -> None:
    """Refuse two combinations of values that compose one variant: its second job would find the first's
    result, and the sweep could never have a result for each of its variants."""
    seen: dict[str, tuple[str, ...]] = {}
    for combo, variant in zip(combos, variants):
        first = seen.setdefault(variant_id(variant), combo)
        if first is not combo:
            one, other = (" ".join(o for o in a if o not in b) for a, b in ((first, combo), (combo, first)))
            raise ConfigError(f"sweep: {one} and {other} make the same variant; keep one of them")


def preflight(argv: list[str]) -> list[RunConfig]:
    """Compose and check every variant the command line describes. Raises ConfigError."""
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    _check_multirun(argv, parsed)
    choices = [_sweep_values(o) if o.is_sweep_override() else [o.input_line] for o in parsed]
    combos = list(itertools.product(*choices))
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        variants = [_compose(list(combo)) for combo in combos]
    _check_distinct(combos, variants)
    inputs.check_inputs(variants)
    return variants


def announce_backends(variants: list[RunConfig]) -> None:
    """Say once, up front, what `backend=auto` picked."""
    if any(v.backend.name == BackendName.auto for v in variants):
        print(backends.auto_choice(), flush=True)


def _hydra_value(argv: list[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    return found[-1] if found else None


def _open_tracker(tracking):
    """The sweep's Tracker on the store the user named; an unreachable store is a ConfigError."""
    from runner.track import Tracker, store_problem

    try:
        return Tracker(tracking.uri, tracking.experiment, tracking.artifact_root)
    except Exception as exc:  # MLflow's errors vary by store; the user needs the URI and the reason
        raise ConfigError(f"tracking.uri: cannot open {tracking.uri}: {store_problem(exc)}; start the server, or "
                          f"use the embedded store (tracking=sqlite)") from None


@dataclass
class Launch:
    """What the launching process set up: the sweep (folder, parent run), the jobs' extra overrides, and the
    loopback tracking server, if any."""
    sweep: Sweep
    overrides: list[str]
    server: contextlib.AbstractContextManager


def open_sweep(argv: list[str], variants: list[RunConfig]) -> Launch:
    """Make (or, with `resume=`, reopen) the sweep folder and its parent run. Raises ConfigError before
    making anything where the folders cannot be written, the store cannot be opened, or a resumed sweep
    measured other variants."""
    first, multirun = variants[0], any(a in MULTIRUN_FLAGS for a in argv)
    launcher = _hydra_value(argv, "hydra/launcher") or "basic"
    _check_shared_store(first.tracking, launcher)
    _check_writable(variants)
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    root = Path(first.outputs) / ("sweeps" if multirun else "runs")
    ids, command = [variant_id(v) for v in variants], [a for a in argv if a not in MULTIRUN_FLAGS]
    try:
        sweep = _reopened(find_folder(root, first.resume), command, ids) if first.resume else None
        tracker = _open_tracker(first.tracking) if first.tracking.enabled else None
        if sweep is None:
            given = _hydra_value(argv, dir_key)
            folder = Path(given) if given else new_folder(root)
            folder.mkdir(parents=True, exist_ok=True)
            sweep = Sweep(folder, len(variants), command)
    except SweepError as exc:
        raise ConfigError(f"resume: {exc}") from None
    overrides, server = [f"{dir_key}={sweep.folder}", f"sweep.total={len(variants)}"], contextlib.nullcontext()
    if tracker:
        if sweep.parent_run_id:
            closed = tracker.reopen_sweep(sweep.parent_run_id)
            print(f"runner: resuming sweep {sweep.folder} (run {sweep.parent_run_id}); {closed} run(s) a kill left "
                  f"RUNNING closed as KILLED", flush=True)
        else:
            sweep.parent_run_id = tracker.start_sweep(
                f"sweep of {len(variants)} variants", {"overrides": " ".join(sweep.overrides) or "(defaults)",
                                                       "variants": len(variants), "folder": str(sweep.folder)})
        print(f"runner: sweep {sweep.parent_run_id} -> {tracker.uri} (experiment '{tracker.experiment}')", flush=True)
        overrides.append(f"sweep.parent_run_id={sweep.parent_run_id}")
        server = _shared_store(first.tracking.uri, launcher, sweep.folder, overrides)
    else:
        print("runner: tracking disabled (tracking.enabled=false): results stay in the sweep folder", flush=True)
    sweep.total, sweep.variants = len(variants), ids
    sweep.tracking = dataclasses.asdict(first.tracking) if first.tracking.enabled else None
    sweep.write()
    return Launch(sweep, overrides, server)


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


def _check_writable(variants: list[RunConfig]) -> None:
    """Refuse an `outputs` or `cache_dir` that runner could not write, before anything is made."""
    for key, folder in dict.fromkeys((k, getattr(v, k)) for v in variants for k in ("outputs", "cache_dir")):
        problem = cache.unwritable(folder)
        if problem:
            raise ConfigError(f"{key}: cannot make {folder}: {problem}; give a folder you can write ({key}=DIR)")


def _check_shared_store(tracking, launcher: str) -> None:
    """Refuse, before anything is made, an embedded store that jobs on other hosts would have to share."""
    from runner.track import sqlite_path

    if tracking.enabled and sqlite_path(tracking.uri) and launcher not in LOCAL_LAUNCHERS:
        raise ConfigError(f"tracking: jobs of hydra/launcher={launcher} run on other hosts and cannot share the "
                          f"embedded store {tracking.uri}; use tracking=server tracking.uri=http://<host>:<port>")


def _shared_store(uri: str, launcher: str, folder: Path, overrides: list[str]) -> contextlib.AbstractContextManager:
    """A loopback server over a sqlite store when jobs run in parallel (appending its URI to `overrides`)."""
    from runner.track import LoopbackServer, sqlite_path

    if sqlite_path(uri) is None or launcher in SERIAL_LAUNCHERS:
        return contextlib.nullcontext()
    server = LoopbackServer(uri, folder)
    overrides.append(f"tracking.uri={server.url}")
    return server


def task(cfg: DictConfig) -> str:
    """Hydra job: one variant, config in; `result.json` in the job folder and a child run out. Never raises:
    a failure is the variant's result, so no launcher aborts the sweep over one variant."""
    quiet_defaults()
    run_cfg = to_run_config(cfg)
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else job_dir
    progress = f"[{(hydra_cfg.job.num if multirun else 0) + 1}/{run_cfg.sweep.total}]"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config_id = identity(plain)
    record = next((r for r in job_records(sweep_dir) if r.config_id == config_id), None)
    if record:
        log.info("%s %s: kept from %s, not measured again", progress, record.result.name, record.folder)
    else:
        record = measure(run_cfg, JobRecord(job_dir, new_result(run_cfg, "-", None), config_id, plain), progress)
    if run_cfg.tracking.enabled and run_cfg.sweep.parent_run_id and not record.logged:
        track(run_cfg, record)
    return record.result.status


def measure(run_cfg: RunConfig, record: JobRecord, progress: str) -> JobRecord:
    """Run the variant in its child process on a GPU of its own; its result.json is written before returning."""
    record.started_ms = int(time.time() * 1000)
    try:
        backend, skip_reason = backends.resolve(run_cfg)
        available = backends.unavailable(backend.name) is None  # skipped as not applying: it can still say how
        mechanism = backend.precision_mechanism(run_cfg) if available else None
        result = new_result(run_cfg, backend.name, mechanism, "skipped" if skip_reason else "failed")
        log.info("%s %s (%s)", progress, result.name, backend.name)
        if skip_reason:
            result.error = skip_reason
        else:
            with gpus.claim(run_cfg.backend.gpus) as (gpu, env):
                result = run_isolated(run_variant, (run_cfg, backend.name), run_cfg.backend.timeout_s, result,
                                      log_prefix=f"  [{result.name}] ", env=env)
            if gpu:
                result.environment.update(gpu.environment())
    except Exception as exc:  # a bug before or around the child: the variant's result, with its traceback
        result = new_result(run_cfg, "-", None, "failed")
        result.failed_stage, result.error, result.error_detail = "start", f"{type(exc).__name__}: {exc}", \
            traceback.format_exc()
    log.info("  [%s] -> %s%s", result.name, result.status,
             f" at {result.failed_stage}: {result.first_error_line()}" if result.failed_stage
             else f": {result.error}" if result.status == "skipped" else "")
    record.result, record.ended_ms = result, int(time.time() * 1000)
    record.write()
    return record


def track(run_cfg: RunConfig, record: JobRecord) -> None:
    """Log `record` as a child run of the sweep; where the store is gone, keep it marked as not yet logged."""
    from runner.track import Tracker, store_problem

    tracking = run_cfg.tracking
    try:
        tracker = Tracker(tracking.uri, tracking.experiment, tracking.artifact_root)
        record.mlflow_run_id, record.tracking_error = tracker.log_variant(run_cfg.sweep.parent_run_id, record), None
    except Exception as exc:  # the measured result must outlive any tracking failure
        record.tracking_error = store_problem(exc)
        log.warning("  [%s] not logged to %s (%s); kept in %s/result.json for `runner sync`", record.result.name,
                    tracking.uri, record.tracking_error, record.folder)
    record.write()


def summary_table(results: list[VariantResult]) -> pd.DataFrame:
    return summary(results_frame(results))


def _end_parent(sweep: Sweep, records: list[JobRecord], files: list[Path]) -> str | None:
    """Close the sweep's parent run with its counts and summary files; the reason where the store is gone."""
    from runner.track import Tracker, store_problem

    tracking = sweep.tracking
    try:
        Tracker(tracking["uri"], tracking["experiment"], tracking["artifact_root"]).end_sweep(
            sweep.parent_run_id, [r.result for r in records], sweep.total, files)
    except Exception as exc:  # the summary files are written; the store can catch up with `runner sync`
        return store_problem(exc)
    return None


def _kill_parent(sweep: Sweep) -> str | None:
    """Close a stopped sweep's parent run, and its variant runs caught RUNNING, as KILLED; the reason where the
    store is gone."""
    from runner.track import Tracker, store_problem

    tracking = sweep.tracking
    try:
        Tracker(tracking["uri"], tracking["experiment"], tracking["artifact_root"]).kill_sweep(sweep.parent_run_id)
    except Exception as exc:  # resume= or `runner sync` closes them later
        return store_problem(exc)
    return None


def stopped(sweep: Sweep, argv: list[str], stop: Interrupted) -> int:
    """After SIGINT or SIGTERM: close the sweep's runs as KILLED and print how to resume it. Returns 128 + the
    signal's number (130, 143), the shell's exit code for a command a signal ended."""
    kept = len(job_records(sweep.folder))
    problem = _kill_parent(sweep) if sweep.tracking and sweep.parent_run_id else None
    parent = f"; sweep run {sweep.parent_run_id} closed as KILLED" if sweep.tracking and not problem else ""
    print(f"\nrunner: stopped by {stop.name}: {kept} of {sweep.total} variants have a result{parent}", flush=True)
    if problem:
        print(f"runner: the sweep's runs stay RUNNING in MLflow ({problem}); resuming closes them", flush=True)
    flags = [a for a in argv if a in MULTIRUN_FLAGS][:1]
    rest = [a for a in argv if a not in MULTIRUN_FLAGS and not a.startswith("resume=")]
    print(f"runner: resume with: python -m runner {shlex.join([*flags, *rest, f'resume={_shown(sweep.folder)}'])}",
          flush=True)
    return 128 + stop.signum


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


def finish_sweep(sweep: Sweep) -> int:
    """Summarise a sweep from its job folders: terminal table, summary.csv, results.json, the parent run.
    Returns the exit code: 0 when every variant has a result, else 1."""
    records = job_records(sweep.folder)
    table = summary_table([r.result for r in records])
    files = [sweep.folder / "summary.csv", sweep.folder / "results.json"]
    table.to_csv(files[0], index=False)
    files[1].write_text(json.dumps([{**r.result.to_dict(), "mlflow_run_id": r.mlflow_run_id} for r in records],
                                   indent=1, default=str))
    tracked = bool(sweep.tracking and sweep.parent_run_id)
    problem = _end_parent(sweep, records, files) if tracked else None
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print("\n" + table.to_string(index=False) if len(table) else "no variant ran", flush=True)
    ok = sum(r.result.status == "ok" for r in records)
    parent = f"; sweep run {sweep.parent_run_id}" if sweep.parent_run_id else ""
    print(f"\nrunner: {ok}/{len(records)} variants ok{parent}; summary in {_shown(sweep.folder)}", flush=True)
    unlogged = sum(not r.logged for r in records) if tracked else 0
    if problem or unlogged:
        print(f"runner: {unlogged} result(s) not yet in MLflow ({problem or 'see the jobs log'}); once the store is "
              f"back: runner sync --sweep {_shown(sweep.folder)}", flush=True)
    if len(records) < sweep.total:
        print(f"runner: incomplete sweep: {len(records)} of {sweep.total} variants have a result; run the rest "
              f"with the same command and resume={_shown(sweep.folder)}", flush=True)
        return LOST_EXIT
    return 0


def _shown(path: Path) -> Path:
    """`path` relative to the working directory where it lies below it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def sync(argv: list[str]) -> int:
    """`runner sync --sweep DIR|latest`: log every result of a sweep folder that its MLflow store lacks."""
    from runner.track import Tracker, store_problem

    parser = argparse.ArgumentParser(prog="runner sync",
                                     description="Log every result of a sweep folder that its MLflow store lacks; "
                                                 "safe to run twice.")
    parser.add_argument("--sweep", default="latest", help="a sweep folder, or 'latest' (the default)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="where 'latest' is looked for")
    parser.add_argument("--tracking-uri", help="the store, where it moved (default: the sweep's own)")
    args = parser.parse_args(argv)
    try:
        sweep = Sweep.read(find_folder(args.outputs / "sweeps", args.sweep))
    except SweepError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    if not (sweep.tracking and sweep.parent_run_id):
        print(f"runner: error: sweep {sweep.folder} ran with tracking disabled; nothing to sync", file=sys.stderr)
        return USAGE_EXIT
    tracking = {**sweep.tracking, **({"uri": args.tracking_uri} if args.tracking_uri else {})}
    try:
        tracker = Tracker(tracking["uri"], tracking["experiment"], tracking["artifact_root"])
    except Exception as exc:  # MLflow's errors vary by store
        print(f"runner: error: cannot open {tracking['uri']}: {store_problem(exc)}", file=sys.stderr)
        return USAGE_EXIT
    sweep.tracking = tracking
    records = job_records(sweep.folder)
    added, refused = 0, 0
    for record in records:
        was = record.mlflow_run_id
        try:
            record.mlflow_run_id, record.tracking_error = tracker.log_variant(sweep.parent_run_id, record), None
        except Exception as exc:  # one result the store refuses must not keep the others out
            record.mlflow_run_id, record.tracking_error = None, store_problem(exc)
            print(f"runner: warning: {record.result.name} not logged: {record.tracking_error}", file=sys.stderr)
        record.write()
        added += was is None and record.logged
        refused += not record.logged
    print(f"runner: sync of {sweep.folder}: {added} run(s) logged, {len(records) - added - refused} already there"
          + (f", {refused} not logged" if refused else ""), flush=True)
    return finish_sweep(sweep) or (LOST_EXIT if refused else 0)


def main(argv: list[str]) -> int:
    """`runner [overrides]`: check the sweep, open it, launch it through Hydra, summarise it. The exit code;
    128 + the signal's number where SIGINT or SIGTERM stopped it."""
    with stop_on_signals():
        try:
            return _main(argv)
        except Interrupted as stop:  # while the sweep was checked or opened: no variant ran
            print(f"runner: stopped by {stop.name} before any variant ran", file=sys.stderr, flush=True)
            return 128 + stop.signum


def _main(argv: list[str]) -> int:
    quiet_defaults()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store-creation chatter is not the user's news
    config.register()
    if any(a in ("--help", "-h", "--hydra-help", "--info") or a.startswith("--cfg") for a in argv):
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
