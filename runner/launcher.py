"""Hydra glue: check the whole sweep up front, run each variant isolated, track it, summarise.

`preflight` composes every variant of the command line before any work starts, so a bad value
anywhere in the sweep exits 2 with one line. `task` is Hydra's job function; `SweepCallback`
opens the sweep's parent MLflow run and prints the summary table at the end.
"""
from __future__ import annotations

import itertools
import json
import time
from functools import lru_cache
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

from runner import config
from runner.config import BackendName, ConfigError, RunConfig
from runner.isolate import run_isolated
from runner.pipeline import labels, run_variant, skeleton

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SESSION: dict = {}


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


def to_run_config(cfg: DictConfig) -> RunConfig:
    """A composed config (no `hydra` node: Hydra drops it from the job's config) as the typed, fully resolved
    dataclass tree; raises ConfigError."""
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
        return [_compose(list(combo)) for combo in itertools.product(*choices)]


def open_tracking(tracking) -> None:
    """Open the MLflow store before any work, so an unreachable one is a config error. Raises ConfigError."""
    SESSION["tracker"] = None
    if not tracking.enabled:
        return
    from runner.track import Tracker

    try:
        SESSION["tracker"] = Tracker(tracking.uri, tracking.experiment, tracking.artifact_root)
    except Exception as exc:  # MLflow's errors vary by store; the user needs the URI and the reason
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"tracking.uri: cannot open {tracking.uri}: {reason}; start the server, or use the "
                          f"embedded store (tracking=sqlite)") from None


@lru_cache(maxsize=None)
def tensorrt_status() -> tuple[bool, str]:
    from runner import trt_compat

    ok, reason = trt_compat.trt_available()
    if ok:
        ok, reason = trt_compat.cuda_gpu_available()
    return ok, reason


def resolve_backend(requested: BackendName) -> tuple[str, str]:
    """(backend to run, reason it is skipped or '')."""
    ok, reason = tensorrt_status()
    if requested == BackendName.auto:
        return (BackendName.tensorrt.value if ok else BackendName.onnxruntime.value), ""
    if requested == BackendName.tensorrt and not ok:
        return BackendName.tensorrt.value, reason
    return requested.value, ""


def announce_backends(variants: list[RunConfig]) -> None:
    """Say once, up front, what `backend=auto` picked."""
    if any(v.backend.name == BackendName.auto for v in variants):
        ok, reason = tensorrt_status()
        print(f"runner: backend=auto -> {'tensorrt' if ok else 'onnxruntime'}"
              + ("" if ok else f" (TensorRT unavailable: {reason}; each variant's ONNX is tested with onnxruntime)"),
              flush=True)


class Progress:
    """Prints a variant's stage messages (picklable, so the child process can use it)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, message: str) -> None:
        print(f"  {self.prefix} {message}", flush=True)


def task(cfg: DictConfig) -> dict:
    """Hydra job: one variant in its own process, then its MLflow child run."""
    run_cfg = to_run_config(cfg)
    backend, skip_reason = resolve_backend(run_cfg.backend.name)
    name = labels(run_cfg, backend, run_cfg.precision.name.value)["name"]
    SESSION["done"] = SESSION.get("done", 0) + 1
    print(f"[{SESSION['done']}/{SESSION.get('total', 1)}] {name} ({backend})", flush=True)
    started_ms = int(time.time() * 1000)
    if skip_reason:
        result = skeleton(run_cfg, backend, "skipped", skip_reason)
    else:
        result = run_isolated(run_variant, (run_cfg, backend, Progress(f"[{name}]")), run_cfg.backend.timeout_s,
                              skeleton(run_cfg, backend, "failed"))
    print(f"  [{name}] -> {result['status']}" + (f" at {result['failed_stage']}: {result['error'].splitlines()[0]}"
                                                 if result.get("failed_stage") else ""), flush=True)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if SESSION.get("tracker"):
        result["mlflow_run_id"] = SESSION["tracker"].log_variant(
            SESSION["sweep_id"], result, flatten(plain), OmegaConf.to_yaml(plain), started_ms)
    return result


def summary_table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        val, bench = r.get("stages", {}).get("validate", {}), r.get("stages", {}).get("bench", {})
        rows.append({"onnx": r.get("onnx_label"), "build": r.get("build_label"), "status": r["status"],
                     "stage": r.get("failed_stage") or "", "rel_l2": val.get("rel_l2"), "det_f1": val.get("det_f1"),
                     "map50_95": val.get("map50_95"), "infer_p50_ms": bench.get("infer", {}).get("p50"),
                     "e2e_p50_ms": bench.get("e2e", {}).get("p50"),
                     "cuda_graph": bench.get("settings", {}).get("cuda_graph"),
                     "error": (r.get("error") or "").splitlines()[0][:70] if r.get("error") else ""})
    return pd.DataFrame(rows)


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
        results = SESSION.get("results", [])
        table = summary_table(results)
        files = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            files = [folder / "summary.csv", folder / "results.json"]
            table.to_csv(files[0], index=False)
            files[1].write_text(json.dumps(results, indent=1, default=str))
        if SESSION["tracker"]:
            SESSION["tracker"].end_sweep(SESSION["sweep_id"], results, files)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
            print("\n" + table.to_string(index=False) if len(table) else "no variant ran", flush=True)
        ok = sum(r["status"] == "ok" for r in results)
        sweep = f"; sweep run {SESSION['sweep_id']}" if SESSION.get("sweep_id") else ""
        where = f"; summary in {folder}" if folder else ""
        print(f"\nrunner: {ok}/{len(results)} variants ok{sweep}{where}", flush=True)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._end(SESSION.get("output_dir"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        out = SESSION.get("output_dir")
        self._end(out.parent if out else None)
