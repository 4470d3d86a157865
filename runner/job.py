"""The Hydra job: one variant, config in; `result.json` in the job folder, a child run, and the record handed
back to the launching process out.

Nothing is shared with the launching process but the job's config and its return value, so any launcher
(joblib's loky workers, SLURM, Ray on other hosts) can run it: Hydra composes the job's config once into the
typed `RunConfig`, and what the launching process opened (the parent run, the count, the loopback server) comes
in as its `sweep` keys. The job folder may lie on another host's disk: `resume=` keeps what this host's copy of
the sweep folder holds. A job never raises over its variant: a failure is the variant's result, so no launcher
aborts the sweep over one variant.
"""
from __future__ import annotations

import logging
import socket
import time
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner import backends, gpus
from runner.config import RunConfig, to_plain, to_run_config
from runner.environment import quiet_defaults
from runner.isolate import run_isolated
from runner.sweep import JobRecord, identity, job_config, job_records
from runner.variant import new_result, run_variant

log = logging.getLogger("runner")


def task(cfg: DictConfig) -> dict:
    """Measure the variant (or keep the sweep's earlier result of it), then log it; returns its record
    (`JobRecord.to_dict`) for the launching process."""
    quiet_defaults()
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else job_dir
    run = job_config(to_run_config(cfg))
    progress = f"[{(hydra_cfg.job.num if multirun else 0) + 1}/{run.sweep.total}]"
    plain = to_plain(run)
    config_id = identity(plain)
    record = next((r for r in job_records(sweep_dir) if r.config_id == config_id), None)
    if record:
        log.info("%s %s: kept from %s, not measured again", progress, record.result.name, record.folder)
    else:
        record = measure(run, JobRecord(job_dir, new_result(run, "-", None), config_id, plain), progress)
    if run.tracking.enabled and run.sweep.parent_run_id and not record.logged:
        track(run, record)
    return record.to_dict()


def measure(run: RunConfig, record: JobRecord, progress: str) -> JobRecord:
    """Run the variant in its child process on a GPU of its own; its result.json is written before returning."""
    record.started_ms, record.ran_in = int(time.time() * 1000), f"{socket.gethostname()}:{record.folder.resolve()}"
    try:
        backend, skip_reason = backends.resolve(run)
        available = backends.unavailable(backend.name) is None  # skipped as not applying: it can still say how
        mechanism = backend.precision_mechanism(run) if available else None
        variant, resolved = backends.resolve_auto(run, backend)
        result = new_result(variant, backend.name, mechanism, "skipped" if skip_reason else "failed", resolved)
        log.info("%s %s (%s)", progress, result.name, backend.name)
        if skip_reason:
            result.error = skip_reason
        else:
            with gpus.claim(run.backend.gpus) as (gpu, env):
                result = run_isolated(run_variant, (run, backend.name), run.backend.timeout_s, result,
                                      log_prefix=f"  [{result.name}] ", env=env)
            if gpu:
                result.environment.update(gpu.environment())
    except Exception as exc:  # a bug before or around the child: the variant's result, with its traceback
        result = new_result(run, "-", None, "failed")
        result.failed_stage, result.error, result.error_detail = "start", f"{type(exc).__name__}: {exc}", \
            traceback.format_exc()
    build = result.build
    pins = (f", but TensorRT ignored {len(build.pins_ignored)} precision pins" if build and build.pins_ignored
            else f", but {len(build.pinned)} precision pins not checked" if build and build.pins_unchecked else "")
    log.info("  [%s] -> %s%s", result.name, result.status,
             f" at {result.failed_stage}: {result.first_error_line()}" if result.failed_stage
             else f": {result.error}" if result.status == "skipped" else pins)
    record.result, record.ended_ms = result, int(time.time() * 1000)
    record.write()
    return record


def track(run: RunConfig, record: JobRecord) -> None:
    """Log `record` as a child run of the sweep; where the store is gone, keep it marked as not yet logged."""
    from runner.track import Tracker, store_problem

    tracking = run.tracking
    try:
        tracker = Tracker.of(tracking)
        record.mlflow_run_id, record.tracking_error = tracker.log_variant(run.sweep.parent_run_id, record), None
    except Exception as exc:  # the measured result must outlive any tracking failure
        record.tracking_error = store_problem(exc)
        log.warning("  [%s] not logged to %s (%s); kept in %s/result.json for `runner sync`", record.result.name,
                    tracking.uri, record.tracking_error, record.folder)
    record.write()
