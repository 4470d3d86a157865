"""Configuration: every bad input is one line on stderr and exit 2, before any work; good ones compose.

The CLI cases run `runner` in this process (`runner.__main__.main`: a subprocess would prove nothing more) with a
throw-away `outputs=` folder, then check that nothing was started: no MLflow store, no Hydra run folder, no export
cache.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import DEFAULT_WEIGHTS, PLUMBING, REPO, UNTIMED, mlflow_run_count, run_cli, sweep_runs
from runner.config import ConfigError
from runner.heads import DECODED
from runner.preflight import CONF_DIR, preflight

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
    "dynamic-opt-not-stride": (["shape=dynamic", "profile.opt=[1,3,500,640]"], "shape.opt",
                               r"H and W must be multiples of the stride 32, got \[1, 3, 500, 640\] \(profile.opt\)"),
    "imgsz-int-not-stride": (["model.imgsz=650"], "model.imgsz", r"\[H, W\] or one int for both.*got 650$"),
    "static-min-ne-max": (["shape.max=[1,3,1280,1280]"], "shape", r"min = opt = max.*shape=dynamic"),
    "unknown-precision": (["precision=fp8"], "precision", r"unknown option 'fp8'; allowed: fp16, fp32"),
    "unknown-export": (["export=onnx2"], "export", r"unknown option 'onnx2'; allowed: dynamo, torch, ultralytics"),
    "missing-weights": (["model.weights=/nonexistent.pt"], "model.weights",
                        r"file not found: /nonexistent\.pt \(a \.pt file, loaded as given: nothing is downloaded"),
    "missing-images": (["data.images=/nonexistent"], "data.images", r"not a readable folder: /nonexistent"),
    "zero-iters": (["bench.iters=0"], "bench.iters", r"must be a positive integer, got 0"),
    "zero-batch": (["bench.batch=0"], "bench.batch", r"must be a positive integer, got 0"),
    "cuda-graph-not-a-switch": (["bench.cuda_graph=sometimes"], "bench.cuda_graph",
                                r"true, false or auto, got 'sometimes'"),
    "cuda-graph-a-number": (["bench.cuda_graph=1"], "bench.cuda_graph", r"true, false or auto, got 1$"),
    "timed-batch-outside-static": (["bench.batch=2"], "bench.batch",
                                   r"timed at .* = \[2, 3, 640, 640\], outside shape=static \[1, 3, 640, 640\]"),
    "timed-imgsz-outside-dynamic": (["shape=dynamic", "model.imgsz=[704,704]"], "model.imgsz",
                                    r"timed at .* = \[1, 3, 704, 704\], outside shape=dynamic \[1, 3, 320, 320\]"),
    "non-integer-iters": (["bench.iters=abc"], "bench.iters", r"could not be converted to Integer"),
    "unknown-key": (["nosuchkey=1"], "nosuchkey", r"not in 'RunConfig'"),
    "added-key": (["+foo=1"], "foo", r"not a key of the config; allowed: backend, bench, build, cache_dir"),
    "added-key-typo": (["+bench.iter=5"], "bench.iter", r"not a key of 'bench'; did you mean bench\.iters\? "
                                                        r"allowed: batch, cuda_graph, iters, layers_batch, "
                                                        r"min_timed_s, offline_batches, offline_images, "
                                                        r"offline_overlap, server_queries, server_rate, warmup, "
                                                        r"warmup_s$"),
    "negative-warmup-seconds": (["bench.warmup_s=-0.5"], "bench.warmup_s", r"must be >= 0, got -0\.5$"),
    "endless-timed-seconds": (["bench.min_timed_s=inf"], "bench.min_timed_s", r"must be finite, got inf$"),
    "nan-warmup-seconds": (["bench.warmup_s=nan"], "bench.warmup_s", r"must be finite, got nan$"),
    "zero-offline-batch": (["bench.offline_batches=[0,8]"], "bench.offline_batches",
                           r"a list of positive batch sizes such as \[1,8,32\] \(\[\] for none\), got \[0, 8\]"),
    "zero-layers-batch": (["bench.layers_batch=0"], "bench.layers_batch",
                          r"a positive batch size \(null: the timed shape's\), got 0"),
    "zero-server-rate": (["bench.server_rate=0"], "bench.server_rate",
                         r"images/s, a positive number \(null: no server scenario\), got 0"),
    "negative-atol": (["validate.fp32.atol=-1"], "validate.fp32.atol", r"must be >= 0, got -1\.0"),
    "f1-above-one": (["validate.fp16.min_det_f1=1.5"], "validate.fp16.min_det_f1", r"must be in \[0, 1\], got 1\.5"),
    "zero-conf": (["validate.conf=0"], "validate.conf", r"must be in \(0, 1\], got 0\.0"),
    "unknown-build": (["build=trtexec"], "build", r"unknown option 'trtexec'; allowed: tensorrt_api, ultralytics"),
    "bad-value-mid-sweep": (["-m", "precision=fp32,fp8"], "precision", r"unknown option 'fp8'; allowed: fp16, fp32"),
    "bad-value-mid-sweep-3x2": (["-m", "export=ultralytics,torch", "precision=fp32,fp8,fp16"], "precision",
                                r"unknown option 'fp8'; allowed: fp16, fp32"),
}


@pytest.fixture
def cli(runner_main):
    """cli(args, outputs) -> CompletedProcess of `runner <args> outputs=<outputs>`, run in this process."""
    return lambda args, outputs: runner_main([*args, f"outputs={outputs}"])


def assert_nothing_started(outputs: Path) -> None:
    assert mlflow_run_count(outputs / "mlflow.db") == 0
    assert not (outputs / "mlflow.db").exists(), "the MLflow store was created for a rejected config"
    for folder in ("runs", "sweeps", "cache", "mlartifacts", "data"):
        assert not (outputs / folder).exists(), f"{folder}/ was written for a rejected config"


@pytest.mark.parametrize("overrides,key,allowed", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_exits_2_with_one_line(cli, tmp_path, overrides, key, allowed):
    outputs = tmp_path / "outputs"
    proc = cli(overrides, outputs)
    assert proc.returncode == USAGE_EXIT, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith(f"runner: error: {key}:"), line
    assert re.search(allowed, line), line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "export:" not in proc.stdout and "HYDRA" not in proc.stdout, proc.stdout
    assert_nothing_started(outputs)


def assert_one_line_exit_2(proc, outputs: Path, expected: str) -> None:
    assert proc.returncode == USAGE_EXIT, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [expected]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert_nothing_started(outputs)


CHECKPOINT = "expected an ultralytics detection checkpoint (.pt from training or export), or a model preset"


def test_empty_weights_file_is_named_before_any_work(cli, tmp_path):
    empty = tmp_path / "best.pt"
    empty.touch()
    proc = cli([f"model.weights={empty}"], tmp_path / "outputs")
    assert_one_line_exit_2(proc, tmp_path / "outputs", f"runner: error: model.weights: {empty} is empty; {CHECKPOINT}")


def test_weights_that_are_not_a_checkpoint_are_named(cli, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    proc = cli([f"model.weights={text}"], tmp_path / "outputs")
    assert_one_line_exit_2(proc, tmp_path / "outputs", f"runner: error: model.weights: {text} is not a PyTorch "
                                                       f"checkpoint (not a zip archive); {CHECKPOINT}")


def test_a_bare_state_dict_is_not_an_ultralytics_model(cli, tmp_path):
    import torch

    state = tmp_path / "state.pt"
    torch.save({"conv.weight": torch.zeros(2, 3)}, state)
    proc = cli([f"model.weights={state}"], tmp_path / "outputs")
    assert_one_line_exit_2(proc, tmp_path / "outputs", f"runner: error: model.weights: {state} holds no ultralytics "
                                                       f"model (a bare state_dict?); {CHECKPOINT}")


def test_a_segmentation_checkpoint_is_not_a_detector(cli, tmp_path):
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    seg = tmp_path / "seg.pt"
    torch.save({"model": SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)}, seg)
    proc = cli([f"model.weights={seg}"], tmp_path / "outputs")
    assert_one_line_exit_2(proc, tmp_path / "outputs", f"runner: error: model.weights: {seg} holds a "
                                                       f"SegmentationModel (task segment, head Segment); {DECODED}")


def test_a_checkpoint_that_would_run_code_is_refused_before_any_work(cli, tmp_path):
    """Its `os.system` is named, never run: no marker file, no run folder (more cases: test_checkpoint.py)."""
    from test_checkpoint import REFUSED, Shell, with_extra

    marker = tmp_path / "marker"
    bad = with_extra(tmp_path / "best.pt", Shell(marker))
    proc = cli([f"model.weights={bad}", "data.limit=2", "bench=quick"], tmp_path / "outputs")
    assert_one_line_exit_2(proc, tmp_path / "outputs", f"runner: error: model.weights: {bad} refers to "
                                                       f"posix.system, {REFUSED}")
    assert not marker.exists()


def test_a_renamed_checkpoint_is_accepted_as_given(tmp_path):
    renamed = tmp_path / "weights.checkpoint"
    renamed.write_bytes(DEFAULT_WEIGHTS.read_bytes())
    cfg, = preflight([f"model.weights={renamed}"])
    assert cfg.model.weights == str(renamed)


def test_empty_image_folder_is_named(cli, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here")
    proc = cli([f"data.images={folder}"], tmp_path / "outputs")
    assert_one_line_exit_2(proc, tmp_path / "outputs", f"runner: error: data.images: no images (.bmp, .jpeg, .jpg, "
                                                       f".png, .webp) in {folder}")


def small_dataset(root: Path, images: int = 3) -> Path:
    """A YOLO layout root/images/val + root/labels/val with grey images and one good label each."""
    import cv2
    import numpy as np

    folder, labels = root / "images" / "val", root / "labels" / "val"
    folder.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(images):
        cv2.imwrite(str(folder / f"im{i}.jpg"), np.full((96, 128, 3), 60 + 40 * i, np.uint8))
        (labels / f"im{i}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    return folder


@pytest.mark.parametrize("line,problem", [
    ("1 0.5 abc 0.1 0.2", "not numbers"),
    ("0 0.5 0.5 0.2", "4 numbers"),
    ("0 0.1 0.1 0.2 0.1 0.3 0.3 0.1 0.2", "9 numbers (a segmentation polygon?)"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 is not a non-negative integer"),
    ("0 50 60 20 20", "coordinates outside [0, 1] (labels must be normalised)"),
])
def test_malformed_label_line_is_named_with_file_and_line(cli, tmp_path, line, problem):
    folder = small_dataset(tmp_path / "ds")
    label = tmp_path / "ds" / "labels" / "val" / "im1.txt"
    label.write_text(f"0 0.5 0.5 0.2 0.2\n\n{line}\n")
    proc = cli([f"data.images={folder}"], tmp_path / "outputs")
    assert_one_line_exit_2(proc, tmp_path / "outputs", f"runner: error: data.labels: {label} line 3: expected "
                                                       f"'class cx cy w h', got '{line}': {problem}")


def test_a_corrupt_image_is_skipped_said_and_counted(tmp_path, export_cache):
    folder = small_dataset(tmp_path / "ds")
    (folder / "im0.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a JPEG")
    outputs = tmp_path / "outputs"
    proc = run_cli([*PLUMBING, "backend=onnxruntime", f"data.images={folder}", *UNTIMED, f"cache_dir={export_cache}"],
                   outputs, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: skipped 1 unreadable image(s): im0.jpg" in proc.stdout
    assert "on 2 images" in proc.stdout  # the limit is met with the next readable images
    _, (child,) = sweep_runs(f"sqlite:///{outputs}/mlflow.db")
    assert child.data.metrics["data.skipped_images"] == 1 and child.data.metrics["data.images"] == 2


def test_images_path_that_is_a_file_is_rejected(cli, tmp_path):
    not_a_folder = tmp_path / "images.txt"
    not_a_folder.write_text("not images")
    outputs = tmp_path / "outputs"
    proc = cli([f"data.images={not_a_folder}"], outputs)
    assert proc.returncode == USAGE_EXIT
    assert proc.stderr.strip().splitlines() == [f"runner: error: data.images: not a readable folder: {not_a_folder}"]
    assert_nothing_started(outputs)


def test_preflight_raises_config_error_in_process():
    with pytest.raises(ConfigError, match=r"^bench\.iters: must be a positive integer, got 0$"):
        preflight(["bench.iters=0"])
    with pytest.raises(ConfigError, match=r"^shape: a static shape needs min = opt = max"):
        preflight(["shape.max=[1,3,1280,1280]"])


@pytest.mark.parametrize("key, example", [("keep_float", "'*/dfl/*'"), ("pin_int8", "'*/Conv'"),
                                          ("pin_int8_float_out", "'*cv2.*.2/Conv'")])
def test_an_empty_layer_pattern_is_refused_naming_the_key(key, example):
    with pytest.raises(ConfigError, match=rf"^precision\.{key}: a list of fnmatch patterns on ONNX node names such as "
                                          rf"{re.escape(example)}, got \[''\]$"):
        preflight(["precision=int8", f"precision.{key}=['']"])


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


def test_a_square_imgsz_int_is_h_and_w_as_ultralytics_takes_it():
    cfg, = preflight(["model.imgsz=320"])
    assert cfg.model.imgsz == [320, 320] and list(cfg.shape.opt) == [1, 3, 320, 320]


def test_an_unquoted_unicode_path_gets_the_quoting_hint(cli, tmp_path):
    proc = cli(["data.images=/data/données/images"], tmp_path / "outputs")
    assert proc.returncode == USAGE_EXIT and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.strip().endswith("""quote the value for Hydra and the shell: 'data.images="/data/données/images"'""")
    assert_nothing_started(tmp_path / "outputs")


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
    assert CONF_DIR == REPO / "conf"  # in a checkout; a wheel carries it as runner/conf (test_install.py)
    groups = {g for g, _ in GROUP_OPTIONS}
    assert groups == {"backend", "bench", "build", "data", "export", "model", "postprocess", "precision",
                      "preprocess", "profile", "shape", "tracking", "validate"}


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


def test_help_lists_the_subcommands_and_every_config_group(cli, tmp_path):
    proc = cli(["--help"], tmp_path / "outputs")
    assert proc.returncode == 0, proc.stderr
    for command in ("runner table", "runner baseline", "runner check", "runner pick", "runner -m"):
        assert command in proc.stdout
    for group, option in GROUP_OPTIONS:
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{group}: "))
        assert option in line.split(": ", 1)[1].split(", "), (group, option, line)


LAUNCHER_DIR = CONF_DIR / "hydra" / "launcher"
LAUNCHERS = sorted(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))
LAUNCHER_CLASSES = {  # the plugin each preset names; ray's plugin is an extra that CI does not install
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "ray": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}


def test_every_launcher_preset_is_known():
    assert LAUNCHERS == sorted(LAUNCHER_CLASSES)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_preset_composes(name):
    """hydra/launcher=<name> composes with the runner's config, and names its plugin's launcher class."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    import runner.config

    runner.config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(runner.config.conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    raw = OmegaConf.to_container(OmegaConf.load(LAUNCHER_DIR / f"{name}.yaml"), resolve=False)
    target = cfg.hydra.launcher._target_
    assert target == raw["_target_"] == LAUNCHER_CLASSES[name]
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    for key, value in raw.items():  # the preset's own values arrive, not the plugin's defaults
        assert launcher[key] == value, f"hydra.launcher.{key}: composed {launcher[key]!r}, the yaml says {value!r}"
    if name != "ray":
        cls = get_class(target)
        assert issubclass(cls, Launcher) and f"{cls.__module__}.{cls.__name__}" == target


def assert_one_error_line(proc, outputs: Path, start: str) -> str:
    """Exit 2 with exactly one stderr line, which starts with `start`; no job wrote a result."""
    assert proc.returncode == USAGE_EXIT, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("runner: error: ") and lines[0].startswith(start), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(outputs.glob("**/result.json")), "a job ran for a rejected command line"
    return lines[0]


@pytest.mark.parametrize("value", ["foo", "[]"])
def test_bad_gpus_value_exits_2_naming_backend_gpus(cli, tmp_path, value):
    outputs = tmp_path / "outputs"
    proc = cli([f"backend.gpus={value}"], outputs)
    line = assert_one_error_line(proc, outputs, "runner: error: backend.gpus:")
    assert "'auto' or a list of GPU indices" in line
    assert_nothing_started(outputs)


def test_resume_of_a_folder_that_is_no_sweep_exits_2(cli, tmp_path):
    outputs = tmp_path / "outputs"
    proc = cli(["resume=/nonexistent/folder"], outputs)
    line = assert_one_error_line(proc, outputs, "runner: error: resume:")
    assert "/nonexistent/folder is not a sweep folder" in line
    assert_nothing_started(outputs)


def test_resume_latest_without_any_sweep_exits_2(cli, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    proc = cli(["-m", "precision=fp32,fp16", "resume=latest"], outputs)
    line = assert_one_error_line(proc, outputs, "runner: error: resume:")
    assert f"no sweep under {outputs / 'sweeps'}" in line
    assert_nothing_started(outputs)
    assert list(outputs.iterdir()) == []


def test_other_host_launcher_with_the_embedded_store_exits_2(cli, tmp_path):
    """SLURM jobs run on other hosts: the default sqlite store cannot be shared with them."""
    outputs = tmp_path / "outputs"
    proc = cli(["-m", "precision=fp32,fp16", "hydra/launcher=submitit_slurm"], outputs)
    line = assert_one_error_line(proc, outputs, "runner: error: ")
    assert "cannot share the embedded store" in line and "tracking=server" in line
    assert "submitit_slurm" in line


def test_other_host_launcher_refused_before_any_mlflow_run(cli, tmp_path):
    """The refusal comes before the sweep is opened: no parent run left RUNNING, no empty sweep folder."""
    outputs = tmp_path / "outputs"
    proc = cli(["-m", "precision=fp32,fp16", "hydra/launcher=submitit_slurm"], outputs)
    assert proc.returncode == USAGE_EXIT, proc.stdout + proc.stderr
    left = [f"{mlflow_run_count(outputs / 'mlflow.db')} MLflow run(s)" if (outputs / "mlflow.db").exists() else "",
            f"sweep folder(s) {sorted(p.name for p in (outputs / 'sweeps').iterdir())}"
            if (outputs / "sweeps").exists() else "",
            "a parent run announced on stdout" if "runner: sweep " in proc.stdout else ""]
    assert not any(left), f"the refused sweep left: {', '.join(filter(None, left))}\n{proc.stdout}{proc.stderr}"
    assert_nothing_started(outputs)


def test_sync_without_any_sweep_exits_2_with_one_line(tmp_path, runner_main):
    outputs = tmp_path / "empty"
    outputs.mkdir()
    proc = runner_main(["sync", "--sweep", "latest", "--outputs", str(outputs)])
    assert proc.returncode == USAGE_EXIT, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [f"runner: error: no sweep under {outputs / 'sweeps'} to resume or sync"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list(outputs.iterdir()) == []


def test_help_names_the_launchers_resume_and_sync(cli, tmp_path):
    proc = cli(["--help"], tmp_path / "outputs")
    assert proc.returncode == 0, proc.stderr
    for text in ("hydra/launcher=joblib", "resume=", "runner sync"):
        assert text in proc.stdout, text
    assert not (tmp_path / "outputs").exists()
