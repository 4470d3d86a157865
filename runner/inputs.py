"""Checks of the files a config names, before any work: the weights and the images with their labels.

Each problem is a `ConfigError` of one line naming the key and the file (and the line, for labels).
The weights are unpickled by `runner.checkpoint`'s allow-list before anything loads them: an ultralytics
detector holds a `*DetectionModel` of `ultralytics.nn.tasks`, and nothing that runs code.
"""
from __future__ import annotations

from pathlib import Path

from runner import checkpoint, data
from runner.config import MODELS, ConfigError, RunConfig

def check_weights(path: str) -> None:
    """An ultralytics detection checkpoint that refers to nothing outside runner's allow-list (see
    `runner.checkpoint`), or ConfigError saying what the file is instead."""
    if not Path(path).is_file():
        raise ConfigError(f"model.weights: file not found: {path} (a .pt file, loaded as given: nothing is "
                          f"downloaded; or a preset: model={'|'.join(MODELS)})")
    checkpoint.verify(path)


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
