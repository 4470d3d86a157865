"""Generated detection data: coloured shapes with exact boxes, in YOLO dataset layout.

Three classes (circle, rectangle, triangle) on noisy gradient backgrounds of varied sizes,
so letterboxing sees portrait, landscape and square images. Deterministic for a given seed.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "rectangle", "triangle")
IMAGE_SIZES = ((640, 480), (480, 640), (640, 640), (800, 600), (512, 384))  # (w, h)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)[:, None]
    ramp = (c0 * (1 - t) + c1 * t).astype(np.float32)
    img = np.broadcast_to(ramp[None] if ramp.shape[0] == w else ramp[:, None], (h, w, 3)).copy()
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(rng: np.random.Generator, img: np.ndarray, cls: int, cx: int, cy: int, r: int) -> tuple:
    color = tuple(int(v) for v in rng.integers(0, 256, 3))
    if cls == 0:
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
        return cx - r, cy - r, cx + r, cy + r
    if cls == 1:
        rw, rh = int(r * rng.uniform(0.6, 1.0)), int(r * rng.uniform(0.6, 1.0))
        cv2.rectangle(img, (cx - rw, cy - rh), (cx + rw, cy + rh), color, -1)
        return cx - rw, cy - rh, cx + rw, cy + rh
    angle = rng.uniform(0, 2 * np.pi)
    pts = np.array([(cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
                    for k in range(3)], dtype=np.int32)
    cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    return int(x0), int(y0), int(x1), int(y1)


def make_image(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One image and its labels as (cls, cx, cy, w, h), normalised to the image size."""
    w, h = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    img = _background(rng, w, h)
    labels, placed = [], []
    for _ in range(rng.integers(1, 7)):
        r = int(rng.uniform(0.04, 0.16) * min(w, h))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        if any(abs(cx - px) < r + pr and abs(cy - py) < r + pr for px, py, pr in placed):
            continue
        placed.append((cx, cy, r))
        cls = int(rng.integers(len(CLASSES)))
        x0, y0, x1, y1 = _draw(rng, img, cls, cx, cy, r)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        labels.append((cls, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h))
    return img, labels


def write_split(root: Path, split: str, count: int, seed: int) -> Path:
    """Write `count` images and YOLO label files under root/images/split and root/labels/split."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img, boxes = make_image(rng)
        cv2.imwrite(str(images / f"{split}_{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (labels / f"{split}_{i:04d}.txt").write_text(
            "".join(f"{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in boxes))
    return images


def make_dataset(root: Path, train: int = 1024, val: int = 64, seed: int = 0) -> Path:
    """Create the train and held-out val splits plus data.yaml; returns the yaml path. Idempotent."""
    root = Path(root)
    yaml_path = root / "data.yaml"
    if yaml_path.exists():
        return yaml_path
    write_split(root, "train", train, seed)
    write_split(root, "val", val, seed + 1)
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES))
    yaml_path.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return yaml_path
