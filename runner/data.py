"""Images (and YOLO labels where present) that a variant is validated and timed on.

`select` decides which files a run uses: the first `limit` readable images by name, with unreadable ones
skipped and named. It also parses their labels, so a malformed line, or a class id the model does not have, is
caught before any work starts. An image's label is found as ultralytics finds it (`labels_folder`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from runner import synthetic
from runner.config import ConfigError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
HELD_OUT_SEED = 1  # the split runner.train validates the shipped models on
HELD_OUT_COUNT = 64
CALIBRATION_SEED, CALIBRATION_COUNT = 2, 64  # INT8 calibration images, apart from training and held-out ones
GENERATED = f"shapes-v{synthetic.VERSION}"  # the generated data's folder under <outputs>/data
COORD_SLACK = 1e-3  # normalised coordinates a rounding step outside [0, 1] are accepted


@dataclass
class Sample:
    name: str
    image: np.ndarray  # BGR uint8
    gt_cls: np.ndarray | None = None  # (n,)
    gt_boxes: np.ndarray | None = None  # (n, 4) xyxy pixels


@dataclass
class Selection:
    """The images a run uses, the ones it skipped because they could not be decoded, and their labels."""
    folder: Path
    labels: Path  # where each image's `<stem>.txt` is looked for
    files: list[Path]
    skipped: list[str] = field(default_factory=list)

    def label_of(self, image: Path) -> Path | None:
        label = self.labels / f"{image.stem}.txt"
        return label if label.is_file() else None

    @property
    def note(self) -> str | None:
        """What a row must say when none of the images has a label: mAP is not measured."""
        if any(self.label_of(p) for p in self.files):
            return None
        return f"no labels: mAP not measured (no <image>.txt in {self.labels})"


def labels_folder(images: Path) -> Path:
    """Where ultralytics looks for the labels of an images folder: the path's last `/images/` component made
    `/labels/` (its `img2label_paths`), or the images folder itself where the path has none."""
    from ultralytics.data.utils import img2label_paths

    return Path(img2label_paths([images.absolute() / "image.jpg"])[0]).parent


def class_names(images_dir: str | None, names: list[str] | None) -> list[str] | None:
    """The class names of the data's labels by id: the generated data's, or those given (data.names); None:
    unknown."""
    return list(synthetic.CLASSES) if images_dir is None else list(names) if names else None


def names_mismatch(model_names: list[str], data_names: list[str] | None) -> str | None:
    """One line where the model's class names and the data's differ (its mAP compares class ids), else None."""
    if not model_names or not data_names or list(model_names) == list(data_names):
        return None
    return (f"class names differ: the model has {_listed(model_names)}, the data {_listed(data_names)}; mAP "
            f"compares class ids")


def _listed(names: list[str], shown: int = 4) -> str:
    more = f", … ({len(names)})" if len(names) > shown else ""
    return ", ".join(f"{i} {n}" for i, n in enumerate(names[:shown])) + more


def _generated_split(root: Path, split: str, count: int, seed: int) -> Path:
    """The images folder of a generated split under `root`, generated once."""
    images = root / "images" / split
    if not (images.is_dir() and len(list(images.iterdir())) >= count):
        synthetic.write_split(root, split, count, seed)
    return images


def held_out_split(root: Path) -> Path:
    """The default model's held-out split, generated once under `root`."""
    return _generated_split(root, "val", HELD_OUT_COUNT, HELD_OUT_SEED)


def calibration_split(root: Path, count: int = CALIBRATION_COUNT) -> Path:
    """The generated INT8 calibration split, at least `count` images (its own seed: apart from the training and
    held-out images; image i is the same whatever the count)."""
    return _generated_split(root, "calib", max(count, CALIBRATION_COUNT), CALIBRATION_SEED)


def calibration_files(images_dir: str | None, calibration_dir: str | None, validated: int, limit: int,
                      outputs: Path) -> list[Path]:
    """Exactly `limit` INT8 calibration images, never one that validation uses. Raises ConfigError.

    `calibration_dir` set: its first `limit` readable images (those of the validated folder excepted).
    Else, with `images_dir` set: that folder's images past the first `validated`; else the generated split."""
    if calibration_dir is None and images_dir is None:
        return select(calibration_split(outputs / "data" / GENERATED, limit), None, limit).files
    folder = calibration_dir or images_dir
    validation = {p.resolve() for p in select(images_dir or held_out_split(outputs / "data" / GENERATED), None,
                                              validated).files}
    files = [p for p in select(folder, None, limit + validated).files if p.resolve() not in validation][:limit]
    if len(files) < limit:
        raise ConfigError(f"precision.calibration_images={limit}: {folder} has {len(files)} images apart from the "
                          f"{len(validation)} validated on; lower it, or set precision.calibration_source to a "
                          f"folder of other images")
    return files


def parse_labels(path: Path, classes: int | None = None) -> np.ndarray:
    """(n, 5) rows `class cx cy w h` (normalised) of a YOLO label file, each class id below `classes` (the model's
    class count) where given. Raises ConfigError naming file and line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = None
        try:
            values = [float(f) for f in fields]
        except ValueError:
            values, problem = [], "not numbers"
        if not problem and len(values) != 5:
            problem = f"{len(values)} numbers" + (" (a segmentation polygon?)" if len(values) > 5 else "")
        elif not problem and (values[0] < 0 or values[0] != int(values[0])):
            problem = f"class {fields[0]} is not a non-negative integer"
        elif not problem and classes is not None and values[0] >= classes:
            problem = f"class {int(values[0])} is not one of the model's {classes} classes (0 to {classes - 1})"
        elif not problem and not all(math.isfinite(v) and -COORD_SLACK <= v <= 1 + COORD_SLACK for v in values[1:]):
            problem = "coordinates outside [0, 1] (labels must be normalised)"
        if problem:
            raise ConfigError(f"data.labels: {path} line {number}: expected 'class cx cy w h', "
                              f"got '{line.strip()[:80]}': {problem}")
        rows.append(values)
    return np.asarray(rows, np.float64).reshape(-1, 5)


def read_labels(path: Path, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, xyxy pixel boxes) of a YOLO label file (checked by `select`) for an image of h x w."""
    rows = parse_labels(path)
    cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
    return rows[:, 0].astype(np.float32), np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)


def select(images_dir: str | Path, labels_dir: str | None, limit: int, classes: int | None = None) -> Selection:
    """The first `limit` readable images of a folder, with their labels checked (class ids below `classes`, where
    given). Raises ConfigError."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise ConfigError(f"data.images: not a readable folder: {images_dir}")
    try:
        candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise ConfigError(f"data.images: not a readable folder: {images_dir} ({exc.strerror})") from None
    if not candidates:
        raise ConfigError(f"data.images: no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    if labels_dir is not None and not Path(labels_dir).is_dir():
        raise ConfigError(f"data.labels: not a readable folder: {labels_dir}")
    selection = Selection(folder, Path(labels_dir) if labels_dir else labels_folder(folder), [])
    for path in candidates:
        if len(selection.files) == limit:
            break
        if cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
            selection.skipped.append(path.name)
            continue
        selection.files.append(path)
        if label := selection.label_of(path):
            parse_labels(label, classes)
    if not selection.files:
        raise ConfigError(f"data.images: none of the {len(candidates)} images in {images_dir} could be decoded")
    return selection


def load_samples(images_dir: str | None, labels_dir: str | None, limit: int, outputs: Path,
                 classes: int | None = None) -> tuple[list[Sample], Selection]:
    """(samples, the selection they come from). The default held-out split is generated on first use. Raises
    ConfigError (a label of a class id the model does not have)."""
    selection = select(images_dir or held_out_split(outputs / "data" / GENERATED), labels_dir, limit, classes)
    if selection.skipped:
        log.warning("data: skipped %d unreadable image(s): %s", len(selection.skipped), ", ".join(selection.skipped))
    if selection.note:
        log.warning("data: %s", selection.note)
    samples = []
    for path in selection.files:
        image = cv2.imread(str(path))
        label = selection.label_of(path)
        gt = read_labels(label, *image.shape[:2]) if label else (None, None)
        samples.append(Sample(path.name, image, *gt))
    return samples, selection
