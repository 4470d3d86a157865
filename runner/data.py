"""Images (and YOLO labels where present) that a variant is validated and timed on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runner import synthetic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
HELD_OUT_SEED = 1  # the split train_default.py validated on
HELD_OUT_COUNT = 64


@dataclass
class Sample:
    name: str
    image: np.ndarray  # BGR uint8
    gt_cls: np.ndarray | None = None  # (n,)
    gt_boxes: np.ndarray | None = None  # (n, 4) xyxy pixels


def held_out_split(root: Path) -> Path:
    """The default model's held-out split, generated once under `root`."""
    images = root / "images" / "val"
    if not (images.is_dir() and len(list(images.iterdir())) == HELD_OUT_COUNT):
        synthetic.write_split(root, "val", HELD_OUT_COUNT, HELD_OUT_SEED)
    return images


def read_labels(path: Path, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, ndmin=2, dtype=np.float64) if path.stat().st_size else np.zeros((0, 5))
    cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
    return rows[:, 0].astype(np.float32), np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)


def load_samples(images_dir: str | None, labels_dir: str | None, limit: int, outputs: Path) -> list[Sample]:
    """Up to `limit` images, sorted by name; labels from `labels_dir` or the YOLO sibling images->labels."""
    folder = Path(images_dir) if images_dir else held_out_split(outputs / "data" / "shapes")
    labels = Path(labels_dir) if labels_dir else Path(str(folder).replace("images", "labels", 1))
    samples = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]:
        image = cv2.imread(str(path))
        if image is None:
            continue
        label = labels / f"{path.stem}.txt"
        gt = read_labels(label, *image.shape[:2]) if labels != folder and label.is_file() else (None, None)
        samples.append(Sample(path.name, image, *gt))
    if not samples:
        raise FileNotFoundError(f"data.images: no readable images in {folder}")
    return samples
