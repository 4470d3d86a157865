"""Configuration: every bad input is one line on stderr and exit 2, before any work; good ones compose.

The CLI cases run the real `python -m runner` in a subprocess with a throw-away `outputs=` folder,
then check that nothing was started: no MLflow store, no Hydra run folder, no export cache.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, mlflow_run_count, run_cli
from runner.config import ConfigError
from runner.launcher import CONF_DIR, preflight

USAGE_EXIT = 2

# (overrides, the key the line must name, what the line must say is allowed / expected)
BAD_INPUTS = {
    "profile-min-gt-opt": (["profile.min=[1,3,700,640]"], "profile", r"min must be <= opt"),
    "profile-opt-gt-max": (["profile.opt=[1,3,700,640]"], "profile", r"opt must be <= max"),
    "profile-opt-gt-max-dynamic": (["shape=dynamic", "profile.max=[1,3,600,640]"], "profile", r"opt must be <= max"),
    "profile-wrong-rank": (["profile.opt=[1,3,640]"], "profile.opt", r"expected 4 dims \[N, 3, H, W\]"),
    "profile-zero-dim": (["profile.min=[1,3,0,640]"], "profile.min", r"every dim must be a positive integer"),
    "imgsz-not-stride": (["model.imgsz=[650,640]"], "model.imgsz", r"multiples of the stride 32"),
    "static-shape-not-stride": (["shape.opt=[1,3,650,640]"], "shape.opt", r"multiples of the stride 32"),
    "static-min-ne-max": (["shape.max=[1,3,1280,1280]"], "shape", r"min = opt = max.*shape=dynamic"),
    "unknown-precision": (["precision=fp8"], "precision", r"unknown option 'fp8'; allowed: fp16, fp32"),
    "unknown-export": (["export=onnx2"], "export", r"unknown option 'onnx2'; allowed: torch, ultralytics"),
    "missing-weights": (["model.weights=/nonexistent.pt"], "model.weights",
                        r"file not found: /nonexistent\.pt \(a \.pt file, or null"),
    "missing-images": (["data.images=/nonexistent"], "data.images", r"not a readable folder: /nonexistent"),
    "zero-iters": (["bench.iters=0"], "bench.iters", r"must be a positive integer, got 0"),
    "non-integer-iters": (["bench.iters=abc"], "bench.iters", r"could not be converted to Integer"),
    "unknown-key": (["nosuchkey=1"], "nosuchkey", r"not in 'RunConfig'"),
    "bad-value-mid-sweep": (["-m", "precision=fp32,fp8"], "precision", r"unknown option 'fp8'; allowed: fp16, fp32"),
    "bad-value-mid-sweep-3x2": (["-m", "export=ultralytics,torch", "precision=fp32,fp8,fp16"], "precision",
                                r"unknown option 'fp8'; allowed: fp16, fp32"),
}


def assert_nothing_started(outputs: Path) -> None:
    assert mlflow_run_count(outputs / "mlflow.db") == 0
    assert not (outputs / "mlflow.db").exists(), "the MLflow store was created for a rejected config"
    for folder in ("runs", "sweeps", "cache", "mlartifacts", "data"):
        assert not (outputs / folder).exists(), f"{folder}/ was written for a rejected config"


@pytest.mark.parametrize("overrides,key,allowed", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_exits_2_with_one_line(tmp_path, overrides, key, allowed):
    outputs = tmp_path / "outputs"
    proc = run_cli(overrides, outputs, timeout=120)
    assert proc.returncode == USAGE_EXIT, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith(f"runner: error: {key}:"), line
    assert re.search(allowed, line), line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "export:" not in proc.stdout and "HYDRA" not in proc.stdout, proc.stdout
    assert_nothing_started(outputs)


def test_images_path_that_is_a_file_is_rejected(tmp_path):
    not_a_folder = tmp_path / "images.txt"
    not_a_folder.write_text("not images")
    outputs = tmp_path / "outputs"
    proc = run_cli([f"data.images={not_a_folder}"], outputs, timeout=120)
    assert proc.returncode == USAGE_EXIT
    assert proc.stderr.strip().splitlines() == [f"runner: error: data.images: not a readable folder: {not_a_folder}"]
    assert_nothing_started(outputs)


def test_preflight_raises_config_error_in_process():
    with pytest.raises(ConfigError, match=r"^bench\.iters: must be a positive integer, got 0$"):
        preflight(["bench.iters=0"])
    with pytest.raises(ConfigError, match=r"^shape: a static shape needs min = opt = max"):
        preflight(["shape.max=[1,3,1280,1280]"])


def test_seed_profile_dynamic_is_accepted():
    """min H = 1 is the user's experiment: preflight lets it through; the backend gives the verdict."""
    variants = preflight(["shape=dynamic", "profile=seed"])
    assert len(variants) == 1
    cfg = variants[0]
    assert cfg.shape.mode.value == "dynamic"
    assert cfg.profile.name == "seed"
    assert list(cfg.shape.min) == [1, 3, 1, 640]
    assert list(cfg.shape.opt) == [1, 3, 480, 640]
    assert list(cfg.shape.max) == [1, 3, 640, 640]


def test_static_shape_follows_imgsz():
    cfg, = preflight(["model.imgsz=[480,640]"])
    assert list(cfg.shape.min) == list(cfg.shape.opt) == list(cfg.shape.max) == [1, 3, 480, 640]


def test_sweep_expands_to_every_combination():
    variants = preflight(["-m", "export=ultralytics,torch", "precision=fp32,fp16", "shape=static,dynamic"])
    assert len(variants) == 8
    combos = {(v.export.tool.value, v.precision.name.value, v.shape.mode.value) for v in variants}
    assert combos == {(t, p, s) for t in ("ultralytics", "torch") for p in ("fp32", "fp16")
                      for s in ("static", "dynamic")}
    for v in variants:
        if v.shape.mode.value == "static":
            assert list(v.shape.min) == list(v.shape.max) == [1, 3, 640, 640]
        else:  # the default profile
            assert (list(v.shape.min), list(v.shape.max)) == ([1, 3, 320, 320], [1, 3, 640, 640])


def test_tracking_uri_follows_outputs(tmp_path):
    cfg, = preflight([f"outputs={tmp_path}"])
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.cache_dir == f"{tmp_path}/cache"


GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml"))


def _has_interpolation(value) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    return False


def test_every_group_is_covered():
    assert CONF_DIR == REPO / "conf"
    groups = {g for g, _ in GROUP_OPTIONS}
    assert groups >= {"backend", "bench", "data", "export", "model", "precision", "profile", "shape", "tracking",
                      "validate"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group, option):
    """Each conf/<group>/<option>.yaml composes onto the schema, passes the checks, and its values arrive."""
    cfg, = preflight([f"{group}={option}"])
    composed = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False)
    # The group's keys land under the group name, except where the schema names the node differently.
    node = composed[group]
    for key, value in raw.items():
        if _has_interpolation(value):
            continue
        assert node[key] == value, f"{group}={option}: {key} composed as {node[key]!r}, the yaml says {value!r}"
