"""Preflight: every variant of the command line composed, typed and checked before any work starts.

A bad value, a bad file, a folder that cannot be written, a store jobs could not share or a GPU pool that is
not ours, anywhere in the sweep, is a `ConfigError` of one line naming the key (exit 2), and nothing is made.
The weights are unpickled by `runner.checkpoint`'s allow-list before anything loads them: an ultralytics
detector holds a `*DetectionModel` of `ultralytics.nn.tasks`, and nothing that runs code.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from runner import cache, checkpoint, config, data, gpus
from runner.config import (DETR_MODELS, MODELS, ConfigError, Precision, RunConfig, ShapeMode, TrackingConfig,
                           omegaconf_message, to_run_config)
from runner.results import first_line
from runner.sweep import variant_id
from runner.sweeper import launch_order
from runner.validate import off_stride

CONF_DIR = config.conf_dir()
USAGE_EXIT = 2  # a command line refused in preflight
MULTIRUN_FLAGS = ("-m", "--multirun")
SEARCHPATH = "hydra.searchpath="  # Hydra's folders of more config-group options, e.g. [file://DIR]
LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local", "ray")  # their jobs run on this host


def hydra_value(argv: list[str], key: str) -> str | None:
    """The last `key=value` of the command line's value, or None."""
    found = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    return found[-1] if found else None


def launcher_of(argv: list[str]) -> str:
    """The Hydra launcher the command line picks."""
    return hydra_value(argv, "hydra/launcher") or "basic"


def jobs_stay_here(argv: list[str]) -> bool:
    """Whether the command line's launcher runs every job on this host: Ray joining a cluster
    (`hydra.launcher.ray.init.address` set) does not."""
    if launcher_of(argv) == "ray":
        return hydra_value(argv, "hydra.launcher.ray.init.address") in (None, "null")
    return launcher_of(argv) in LOCAL_LAUNCHERS


def preflight(argv: list[str]) -> list[RunConfig]:
    """Compose and check every variant the command line describes, and what they need, then say what will not be
    checked (`cautions`). Raises ConfigError."""
    variants = compose_variants(argv)
    names = check_files(variants)
    local = jobs_stay_here(argv)
    _check_shared_store(variants[0].tracking, launcher_of(argv), local)
    _check_writable(variants)
    if local:
        _check_gpu_pool()
    for line in cautions(variants, names):
        print(f"runner: warning: {line}", flush=True)
    return variants


def cautions(variants: list[RunConfig], names: dict[str, list[str]]) -> list[str]:
    """One line for each thing the sweep will run but cannot check: a model whose class names are not the data's,
    a profile bound off the stride (built, never validated)."""
    lines = []
    for v in variants:
        mismatch = data.names_mismatch(names[v.model.weights], data.class_names(v.data.images, v.data.names))
        if mismatch:
            lines.append(f"{v.model.label}: {mismatch}")
        for bound in ("min", "max"):
            shape = list(getattr(v.shape, bound))
            if v.shape.mode == ShapeMode.dynamic and off_stride(shape, v.model.stride):
                lines.append(f"profile {v.profile.name}: {bound} {shape}: {off_stride(shape, v.model.stride)}: "
                             f"built, but not validated there (the row's note names it)")
    return list(dict.fromkeys(lines))


def compose_variants(argv: list[str]) -> list[RunConfig]:
    """Every variant of the command line's sweep, typed, in job order: runner's sweeper launches the longest
    expected build first, the jobs that reuse a build after them (`sweeper.launch_order`). Raises ConfigError."""
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    searchpath = [a for a in argv if a.startswith(SEARCHPATH)]  # config groups of the user's own (sensitivity's)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(" ".join(str(exc).split()) + _quoting_hint(overrides)) from None
    _check_multirun(argv, parsed)
    choices = [_sweep_values(o) if o.is_sweep_override() else [o.input_line] for o in parsed]
    combos = list(itertools.product(*choices))
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        variants = [_compose([*searchpath, *combo]) for combo in combos]
    _check_distinct(combos, variants)
    return [variants[i] for i in launch_order(list(zip(variants, combos)))]


def _quoting_hint(overrides: list[str]) -> str:
    """How to quote the first override whose value Hydra's lexer cannot read unquoted (non-ASCII, a space...)."""
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            OverridesParser.create().parse_overrides([override])
        except OverrideParseException:
            return f"; quote the value for Hydra and the shell: '{key}=\"{value}\"'" if value else ""
    return ""


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
        raise ConfigError(first_line(str(exc))) from None
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException):
            raise ConfigError(omegaconf_message(cause)) from None
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


def _check_distinct(combos: list[tuple[str, ...]], variants: list[RunConfig]) -> None:
    """Refuse two combinations of values that compose one variant: its second job would find the first's
    result, and the sweep could never have a result for each of its variants."""
    seen: dict[str, tuple[str, ...]] = {}
    for combo, variant in zip(combos, variants):
        first = seen.setdefault(variant_id(variant), combo)
        if first is not combo:
            one, other = (" ".join(o for o in a if o not in b) for a, b in ((first, combo), (combo, first)))
            raise ConfigError(f"sweep: {one} and {other} make the same variant; keep one of them")


def check_weights(path: str) -> list[str]:
    """The class names of an ultralytics detection checkpoint that refers to nothing outside runner's allow-list
    (see `runner.checkpoint`), or ConfigError saying what the file is instead."""
    if not Path(path).is_file():
        raise ConfigError(f"model.weights: file not found: {path} (a .pt file, loaded as given: nothing is "
                          f"downloaded; or a preset: model={'|'.join(MODELS + DETR_MODELS)})")
    return checkpoint.verify(path).names


def check_files(configs: list[RunConfig]) -> dict[str, list[str]]:
    """Each distinct weights file and image folder of a sweep, checked once (the labels' line, where one is
    wrong or has a class id the model lacks). Returns each weights file's class names. Raises ConfigError."""
    names = {weights: check_weights(weights) for weights in sorted({c.model.weights for c in configs})}
    for images, labels, limit, weights in sorted({(c.data.images, c.data.labels, c.data.limit, c.model.weights)
                                                  for c in configs if c.data.images is not None}):
        data.select(images, labels, limit, len(names[weights]) or None)
    for c in configs:
        _check_generated_classes(c, names[c.model.weights])
    for images, source, limit, count in sorted({(c.data.images, c.precision.calibration_source, c.data.limit,
                                                 c.precision.calibration_images) for c in configs
                                                if c.precision.name == Precision.int8
                                                and (c.data.images or c.precision.calibration_source)}):
        data.calibration_files(images, source, limit, count, Path(configs[0].outputs))  # enough images apart
    for labels in sorted({c.data.labels for c in configs if c.data.images is None and c.data.labels is not None}):
        if not Path(labels).is_dir():
            raise ConfigError(f"data.labels: not a readable folder: {labels}")
    return names


def _check_generated_classes(c: RunConfig, names: list[str]) -> None:
    """Refuse the generated data for a model with fewer classes than its labels have."""
    generated = data.class_names(None, None)
    if c.data.images is None and names and len(names) < len(generated):
        raise ConfigError(f"data: the generated data's labels have {len(generated)} classes "
                          f"({', '.join(generated)}), model {c.model.label} has {len(names)} ({', '.join(names)}); "
                          f"give data.images of its classes (YOLO labels as ultralytics finds them), or data=bus to "
                          f"time it without labels")


def _check_shared_store(tracking: TrackingConfig, launcher: str, local: bool) -> None:
    """Refuse an embedded store that jobs on other hosts would have to share."""
    from runner.track import sqlite_path

    if tracking.enabled and sqlite_path(tracking.uri) and not local:
        raise ConfigError(f"tracking: jobs of hydra/launcher={launcher} run on other hosts and cannot share the "
                          f"embedded store {tracking.uri}; use tracking=server tracking.uri=http://<host>:<port>")


def _check_writable(variants: list[RunConfig]) -> None:
    """Refuse an `outputs` or `cache_dir` that runner could not write."""
    for key, folder in dict.fromkeys((k, getattr(v, k)) for v in variants for k in ("outputs", "cache_dir")):
        problem = cache.unwritable(folder)
        if problem:
            raise ConfigError(f"{key}: cannot make {folder}: {problem}; give a folder you can write ({key}=DIR)")


def _check_gpu_pool() -> None:
    """Refuse a GPU pool whose lock folder is not ours, where this host's jobs will take GPU locks."""
    try:
        gpus.check_pool()
    except gpus.PoolError as exc:
        raise ConfigError(f"backend.gpus: the GPU pool's lock folder {exc}") from None
