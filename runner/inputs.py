"""Checks of the files a config names, before any work: the weights and the images with their labels.

Each problem is a `ConfigError` of one line naming the key and the file (and the line, for labels).
The weights are read without unpickling them: a torch checkpoint is a zip archive whose `data.pkl`
names the classes it holds, and an ultralytics detector names a `*DetectionModel` of `ultralytics.nn.tasks`.
"""
from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

from runner import data
from runner.config import ConfigError, RunConfig
from runner.results import MODELS

ULTRALYTICS_MODELS = "ultralytics.nn.tasks"


def pickled_classes(payload: bytes) -> set[tuple[str, str]]:
    """(module, name) of every class a pickle refers to, found without running it."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(payload):
        if op.name in ("GLOBAL", "INST"):
            module, name = arg.split(" ", 1)
            found.add((module, name))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add((strings[-2], strings[-1]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def check_weights(path: str) -> None:
    """An ultralytics detection checkpoint, or ConfigError saying what the file is instead."""
    file = Path(path)
    expected = "expected an ultralytics detection checkpoint (.pt from training or export), or a model preset"
    if not file.is_file():
        raise ConfigError(f"model.weights: file not found: {path} (a .pt file, loaded as given: nothing is "
                          f"downloaded; or a preset: model={'|'.join(MODELS)})")
    if file.stat().st_size == 0:
        raise ConfigError(f"model.weights: {path} is empty; {expected}")
    if not zipfile.is_zipfile(file):
        raise ConfigError(f"model.weights: {path} is not a PyTorch checkpoint (not a zip archive); {expected}")
    try:
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            classes = pickled_classes(archive.read(pickles[0])) if pickles else set()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise ConfigError(f"model.weights: {path} is a damaged checkpoint ({exc}); {expected}") from None
    if not pickles:
        raise ConfigError(f"model.weights: {path} is a zip archive without data.pkl, not a torch.save "
                          f"checkpoint; {expected}")
    models = sorted(name for module, name in classes if module == ULTRALYTICS_MODELS and name.endswith("Model"))
    if not models:
        raise ConfigError(f"model.weights: {path} holds no ultralytics model (a bare state_dict?); {expected}")
    if not any(name.endswith("DetectionModel") for name in models):
        raise ConfigError(f"model.weights: {path} holds a {models[0]}, not a detection model; {expected}")


def check_inputs(configs: list[RunConfig]) -> None:
    """Check each distinct weights file and image folder of a sweep once. Raises ConfigError."""
    for weights in sorted({c.model.weights for c in configs}):
        check_weights(weights)
    for images, labels, limit in sorted({(c.data.images, c.data.labels, c.data.limit) for c in configs
                                         if c.data.images is not None}):
        data.select(images, labels, limit)
    for labels in sorted({c.data.labels for c in configs if c.data.images is None and c.data.labels is not None}):
        if not Path(labels).is_dir():
            raise ConfigError(f"data.labels: not a readable folder: {labels}")
