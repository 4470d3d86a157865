"""runner's Hydra sweeper (`hydra/sweeper: runner`, registered by `config.register`): Hydra's basic sweeper,
launching the longest variants first and writing what each job hands back into this host's sweep folder.

Hydra launches jobs in command-line order, so the tail of a parallel sweep would depend on how it was typed.
This sweeper expands the sweep as the basic sweeper does, composes each job's config once, and launches by
expected build cost, longest first (`expected_cost`); ties go by the job's overrides, sorted, so two typed
orders launch alike. A job whose build an earlier job makes (the peer on TensorRT's engine, the same engine with
other pre/post) launches after every distinct build (`launch_order`), so a parallel launcher builds side by side
rather than giving a slot to a job that would only wait on another's build. Hydra numbers jobs (and their
folders) in launch order; `resume=` matches variants by identity, never by number.

A job may run on a host that does not share this disk. Its record comes back as its return value, and the
launching process writes it into its own sweep folder, in the folder named as the job's was where it ran.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict

from runner.config import (ENGINE_BACKENDS, BackendConfig, BackendName, BenchConfig, PostprocessConfig, Precision,
                           PreprocessConfig, RunConfig, ValidateConfig, to_plain, to_run_config)
from runner.sweep import JobRecord, identity

log = logging.getLogger("runner")

PRECISION_COST = {Precision.int8: 2, Precision.fp16: 1, Precision.fp32: 0}  # calibration; fp16 tactics as well
DEFAULT_LEVEL = 3  # TensorRT's builder optimization level where backend.builder_optimization_level is null


def expected_cost(run: RunConfig) -> tuple[int, int, int]:
    """How long the variant's build should take, as a sort key, most telling first: its precision, its builder
    optimization level, the size of its weights file."""
    level = run.backend.builder_optimization_level
    weights = Path(run.model.weights)
    return (PRECISION_COST[run.precision.name], DEFAULT_LEVEL if level is None else level,
            weights.stat().st_size if weights.is_file() else 0)


def launch_key(run: RunConfig, overrides) -> tuple:
    """Where a job goes in the launch order: longest expected build first, then by its overrides, sorted, which
    orders alike however the command line typed them."""
    return tuple(-c for c in expected_cost(run)), sorted(overrides)


def build_of(run: RunConfig) -> str:
    """What the job builds before it runs anything, as an `identity`: its config less what only runs, checks or
    times the build, the backends that run a TensorRT engine (`ENGINE_BACKENDS`) all named tensorrt. Jobs of one
    such identity share their build: the first makes it, the others find it in the cache."""
    engine = run.backend.name in ENGINE_BACKENDS
    backend = dataclasses.replace(run.backend, name=BackendName.tensorrt if engine else run.backend.name,
                                  timeout_s=BackendConfig.timeout_s, gpus=BackendConfig.gpus)
    return identity(to_plain(dataclasses.replace(run, backend=backend, preprocess=PreprocessConfig(),
                                                 postprocess=PostprocessConfig(), validate=ValidateConfig(),
                                                 bench=BenchConfig())))


def launch_order(jobs: Sequence[tuple[RunConfig, Sequence[str]]]) -> list[int]:
    """The indices of `jobs` (run config, overrides) in launch order: every distinct build (`build_of`) by
    `launch_key`, then the jobs whose build one before them makes, in the same order."""
    ranked = sorted(range(len(jobs)), key=lambda i: launch_key(*jobs[i]))
    builds, first, after = set(), [], []
    for i in ranked:
        build = build_of(jobs[i][0])
        (after if build in builds else first).append(i)
        builds.add(build)
    return first + after


class CostOrderSweeper(Sweeper):
    """Every job of the command line's sweep in one batch, in `launch_order`. It subclasses Hydra's
    `Sweeper`, not its basic sweeper: Hydra's plugin scan executes the basic sweeper's module again, so a
    subclass of it would no longer be one."""

    def __init__(self) -> None:
        self.config = self.hydra_context = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
        jobs = [jobs[i] for i in launch_order([(self._compose(job), job) for job in jobs])]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = self.launcher.launch(jobs, initial_job_idx=0)
        for ret in returns:
            keep(ret, sweep_dir)
        for ret in returns:
            ret.return_value  # raises where a job raised, as Hydra's basic sweeper does
        return [returns]

    def _compose(self, job: list[str]) -> RunConfig:
        """The job's typed config; composing it checks it, as Hydra's basic sweeper does before launching."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
        with open_dict(cfg):
            del cfg["hydra"]
        return to_run_config(cfg)


def keep(ret: JobReturn, sweep_dir: Path) -> None:
    """Write the record a job returned into its job folder under `sweep_dir`; a job that raised has none (the
    sweeper reports it)."""
    if ret.status != JobStatus.COMPLETED or not isinstance(ret.return_value, dict):
        return
    folder = sweep_dir / Path(ret.hydra_cfg.hydra.runtime.output_dir).name
    record = JobRecord.from_dict(ret.return_value, folder)
    if record is None:
        log.warning("job %s handed back no record runner can read", folder.name)
        return
    folder.mkdir(parents=True, exist_ok=True)
    record.write()

