"""Hydra glue: check the whole sweep up front, run each variant isolated, track it, summarise.

`preflight` composes every variant of the command line before any work starts, so a bad value or a bad
file anywhere in the sweep exits 2 with one line. `task` is Hydra's job function; `SweepCallback`
opens the sweep's parent MLflow run and prints the summary table at the end.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import logging
import time
import typing
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner import backends, config, inputs
from runner.config import BackendName, ConfigError, RunConfig
from runner.isolate import run_isolated
from runner.pipeline import new_result, run_variant
from runner.report.frame import results_frame
from runner.results import VariantResult

log = logging.getLogger("runner")
CONF_DIR = config.conf_dir()
SESSION: dict = {}
SUMMARY = ["onnx_label", "build_label", "status", "failed_stage", "validation", "rel_l2", "det_f1", "map50_95",
           "infer_p50_ms", "e2e_p50_ms", "cuda_graph", "error"]
SUMMARY_NAMES = {"onnx_label": "onnx", "build_label": "build", "failed_stage": "stage"}


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b.c": value}, the shape of MLflow params."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


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


def preflight(argv: list[str]) -> list[RunConfig]:
    """Compose and check every variant the command line describes. Raises ConfigError."""
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        variants = [_compose(list(combo)) for combo in itertools.product(*choices)]
    inputs.check_inputs(variants)
    return variants


def open_tracking(tracking) -> None:
    """Open the MLflow store before any work, so an unreachable one is a config error. Raises ConfigError."""
    SESSION["tracker"] = None
    if not tracking.enabled:
        return
    from runner.track import Tracker, store_problem

    try:
        SESSION["tracker"] = Tracker(tracking.uri, tracking.experiment, tracking.artifact_root)
    except Exception as exc:  # MLflow's errors vary by store; the user needs the URI and the reason
        raise ConfigError(f"tracking.uri: cannot open {tracking.uri}: {store_problem(exc)}; start the server, or "
                          f"use the embedded store (tracking=sqlite)") from None


def announce_backends(variants: list[RunConfig]) -> None:
    """Say once, up front, what `backend=auto` picked."""
    if any(v.backend.name == BackendName.auto for v in variants):
        print(backends.auto_choice(), flush=True)


def task(cfg: DictConfig) -> dict:
    """Hydra job: one variant in its own process, then its MLflow child run."""
    run_cfg = to_run_config(cfg)
    backend, skip_reason = backends.resolve(run_cfg)
    mechanism = None if skip_reason else backend.precision_mechanism(run_cfg)
    result = new_result(run_cfg, backend.name, mechanism)
    SESSION["done"] = SESSION.get("done", 0) + 1
    log.info("[%d/%d] %s (%s)", SESSION["done"], SESSION.get("total", 1), result.name, backend.name)
    started_ms = int(time.time() * 1000)
    if skip_reason:
        result.status, result.error = "skipped", skip_reason
    else:
        result = run_isolated(run_variant, (run_cfg, backend.name), run_cfg.backend.timeout_s,
                              new_result(run_cfg, backend.name, mechanism, "failed"), log_prefix=f"  [{result.name}] ")
    log.info("  [%s] -> %s%s", result.name, result.status,
             f" at {result.failed_stage}: {result.first_error_line()}" if result.failed_stage
             else f": {result.error}" if result.status == "skipped" else "")
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    run_id = None
    if SESSION.get("tracker"):
        run_id = SESSION["tracker"].log_variant(SESSION["sweep_id"], result, flatten(plain), OmegaConf.to_yaml(plain),
                                                started_ms)
    return {"result": result.to_dict(), "mlflow_run_id": run_id}


def summary_table(results: list[VariantResult]) -> pd.DataFrame:
    frame = results_frame(results)
    table = frame[SUMMARY].rename(columns=SUMMARY_NAMES)
    table["error"] = [(e.splitlines()[0][:70] if e else "") for e in table["error"]]
    return table


def _shown(path: Path) -> Path:
    """`path` relative to the working directory where it lies below it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


class SweepCallback(Callback):
    """Opens the sweep's parent run, collects variant results, closes with a summary."""

    def _start(self, config: DictConfig) -> None:
        SESSION.update(results=[], done=0, sweep_id=None)
        tracker = SESSION.get("tracker")
        if tracker is None:
            print("runner: tracking disabled (tracking.enabled=false): results stay in the sweep folder", flush=True)
            return
        overrides = " ".join(config.hydra.overrides.task) if "hydra" in config else ""
        SESSION["sweep_id"] = tracker.start_sweep(
            f"sweep of {SESSION.get('total', 1)} variants",
            {"overrides": overrides or "(defaults)", "variants": SESSION.get("total", 1)})
        print(f"runner: sweep {SESSION['sweep_id']} -> {tracker.uri} (experiment '{tracker.experiment}')", flush=True)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._start(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._start(config)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if job_return.status == JobStatus.COMPLETED:
            SESSION["results"].append(job_return.return_value)
            SESSION["output_dir"] = Path(config.hydra.runtime.output_dir)

    def _end(self, folder: Path | None) -> None:
        returned = SESSION.get("results", [])
        results = [VariantResult.from_dict(r["result"]) for r in returned]
        table = summary_table(results)
        files = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            files = [folder / "summary.csv", folder / "results.json"]
            table.to_csv(files[0], index=False)
            files[1].write_text(json.dumps([{**r["result"], "mlflow_run_id": r["mlflow_run_id"]} for r in returned],
                                           indent=1, default=str))
        if SESSION["tracker"]:
            SESSION["tracker"].end_sweep(SESSION["sweep_id"], results, files)
        with pd.option_context("display.width", 200, "display.max_columns", 20,
                               "display.float_format", "{:.4g}".format):
            print("\n" + table.to_string(index=False) if len(table) else "no variant ran", flush=True)
        ok = sum(r.status == "ok" for r in results)
        sweep = f"; sweep run {SESSION['sweep_id']}" if SESSION.get("sweep_id") else ""
        where = f"; summary in {_shown(folder)}" if folder else ""
        print(f"\nrunner: {ok}/{len(results)} variants ok{sweep}{where}", flush=True)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._end(SESSION.get("output_dir"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        out = SESSION.get("output_dir")
        self._end(out.parent if out else None)
