"""Generated detection data: coloured shapes with exact boxes, in YOLO dataset layout.

Three classes (circle, rectangle, triangle) on images of varied sizes, so letterboxing sees portrait, landscape
and square images. Hard enough that lost precision shows in mAP:
- 4 to 20 objects per image, half of them small (6 to 16 px);
- overlap: objects may cover parts of earlier ones; a box is the tight box of what stays visible, and an object
  with less than `MIN_VISIBLE` of itself visible is not labelled;
- clutter: textured gradients, distractor shapes of no class (ellipses, stars, crosses, rings), lines drawn over
  the objects;
- low contrast objects, and per image: noise, blur, a global contrast cut and JPEG quality.
Deterministic for a given seed. `VERSION` names the generator in the folder a split is generated into.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import cv2
import numpy as np

from runner.metrics import box_iou

VERSION = 2  # 1: up to six large, separated shapes, on which the models scored mAP50-95 0.99
CLASSES = ("circle", "rectangle", "triangle")
IMAGE_SIZES = ((640, 480), (480, 640), (640, 640), (800, 600), (512, 384))  # (w, h)
OBJECTS = (4, 21)  # per image, [low, high)
SMALL_SHARE, SMALL_RADIUS = 0.5, (3, 9)  # boxes of 6 to 16 px
MAX_OVERLAP = 0.4  # IoU of a new object's box with any placed one
MIN_VISIBLE = 0.3
CLUTTER = (3, 12)  # distractor shapes per image
LINES = (0, 6)  # lines drawn over everything


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A gradient with low-frequency texture and pixel noise."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)[:, None]
    ramp = (c0 * (1 - t) + c1 * t).astype(np.float32)
    img = np.broadcast_to(ramp[None] if ramp.shape[0] == w else ramp[:, None], (h, w, 3)).copy()
    texture = cv2.resize(rng.normal(0, 25, (h // 32 + 1, w // 32 + 1, 3)).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_CUBIC)
    img += texture + rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_points(rng: np.random.Generator, cls: int, cx: int, cy: int, r: int) -> np.ndarray | None:
    """The polygon of a rectangle or triangle (None for a circle)."""
    if cls == 1:
        rw, rh = max(int(r * rng.uniform(0.6, 1.0)), 2), max(int(r * rng.uniform(0.6, 1.0)), 2)
        return np.array([(cx - rw, cy - rh), (cx + rw, cy - rh), (cx + rw, cy + rh), (cx - rw, cy + rh)], np.int32)
    if cls == 2:
        angle = rng.uniform(0, 2 * np.pi)
        return np.array([(cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
                         for k in range(3)], dtype=np.int32)
    return None


def _fill(canvas: np.ndarray, cx: int, cy: int, r: int, points, value, antialias: bool) -> None:
    line = cv2.LINE_AA if antialias else cv2.LINE_8
    if points is None:
        cv2.circle(canvas, (cx, cy), r, value, -1, line)
    else:
        cv2.fillPoly(canvas, [points], value, line)


def _distractor(rng: np.random.Generator, img: np.ndarray, owner: np.ndarray) -> None:
    """A shape of no class: an elongated ellipse, a star, a cross or a ring; it hides what it covers."""
    h, w = img.shape[:2]
    r = int(rng.uniform(0.02, 0.1) * min(w, h)) + 3
    cx, cy, t = int(rng.integers(0, w)), int(rng.integers(0, h)), max(r // 4, 1)
    kind, angle, colour = int(rng.integers(4)), float(rng.uniform(0, 180)), _colour(rng)
    for canvas, value, line in ((img, colour, cv2.LINE_AA), (owner, -1, cv2.LINE_8)):
        if kind == 0:
            cv2.ellipse(canvas, (cx, cy), (r, t), angle, 0, 360, value, -1, line)
        elif kind == 1:
            angles = np.arange(10) * np.pi / 5 + np.radians(angle)
            radii = np.where(np.arange(10) % 2, r * 0.4, r)
            star = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
            cv2.fillPoly(canvas, [star], value, line)
        elif kind == 2:
            cv2.rectangle(canvas, (cx - r, cy - t), (cx + r, cy + t), value, -1, line)
            cv2.rectangle(canvas, (cx - t, cy - r), (cx + t, cy + r), value, -1, line)
        else:
            cv2.circle(canvas, (cx, cy), r, value, max(r // 5, 1), line)


def _line(rng: np.random.Generator, img: np.ndarray, owner: np.ndarray) -> None:
    h, w = img.shape[:2]
    p0, p1 = (int(rng.integers(0, w)), int(rng.integers(0, h))), (int(rng.integers(0, w)), int(rng.integers(0, h)))
    thickness = int(rng.integers(1, 4))
    cv2.line(img, p0, p1, _colour(rng), thickness, cv2.LINE_AA)
    cv2.line(owner, p0, p1, -1, thickness)


def _object_colour(rng: np.random.Generator, img: np.ndarray, cx: int, cy: int, r: int) -> tuple[int, int, int]:
    """A random colour, or (30 % of the time) one close to the background around the object."""
    if rng.random() >= 0.3:
        return _colour(rng)
    patch = img[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1].reshape(-1, 3).mean(0)
    offset = rng.choice((-1, 1), 3) * rng.uniform(20, 45, 3)
    return tuple(int(v) for v in np.clip(patch + offset, 0, 255))


def _photometric(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Per image: a contrast cut, blur and noise, each on some images only."""
    out = img.astype(np.float32)
    if rng.random() < 0.3:
        alpha = rng.uniform(0.45, 0.8)
        out = out.mean() + alpha * (out - out.mean())
    if rng.random() < 0.4:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.6, 1.6))
    if rng.random() < 0.5:
        out += rng.normal(0, rng.uniform(4, 16), out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_image(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One image and its labels as (cls, cx, cy, w, h), normalised to the image size."""
    w, h = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    img = _background(rng, w, h)
    owner = np.full((h, w), -1, np.int32)  # which object each pixel shows; -1: none
    for _ in range(rng.integers(*CLUTTER)):
        _distractor(rng, img, owner)
    objects, boxes = [], []
    for _ in range(rng.integers(*OBJECTS)):
        small = rng.random() < SMALL_SHARE
        r = int(rng.integers(*SMALL_RADIUS)) if small else int(rng.uniform(0.03, 0.14) * min(w, h))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        box = np.array([[cx - r, cy - r, cx + r, cy + r]], np.float64)
        if boxes and box_iou(box, np.array(boxes)).max() > MAX_OVERLAP:
            continue
        cls = int(rng.integers(len(CLASSES)))
        points = _shape_points(rng, cls, cx, cy, r)
        _fill(img, cx, cy, r, points, _object_colour(rng, img, cx, cy, r), antialias=True)
        _fill(owner, cx, cy, r, points, len(objects), antialias=False)
        objects.append(cls)
        boxes.append(box[0])
    for _ in range(rng.integers(*LINES)):
        _line(rng, img, owner)
    return _photometric(rng, img), _visible_labels(owner, objects, boxes, w, h)


def _visible_labels(owner: np.ndarray, objects: list[int], boxes: list[np.ndarray], w: int, h: int) -> list[tuple]:
    """The tight box of each object's visible pixels; objects mostly hidden are left out."""
    labels = []
    for index, (cls, box) in enumerate(zip(objects, boxes)):
        left, top = max(int(box[0]) - 1, 0), max(int(box[1]) - 1, 0)
        ys, xs = np.nonzero(owner[top:int(box[3]) + 2, left:int(box[2]) + 2] == index)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = xs.min() + left, ys.min() + top, xs.max() + 1 + left, ys.max() + 1 + top
        if len(xs) < MIN_VISIBLE * (x1 - x0) * (y1 - y0) or min(x1 - x0, y1 - y0) < 4:
            continue
        labels.append((cls, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h))
    return labels


def _write_image(root: Path, split: str, seed: int, index: int) -> None:
    rng = np.random.default_rng((seed, index))  # each image its own stream: any order, any number of workers
    img, boxes = make_image(rng)
    name = f"{split}_{index:04d}"
    quality = int(rng.integers(60, 96))
    cv2.imwrite(str(root / "images" / split / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    (root / "labels" / split / f"{name}.txt").write_text(
        "".join(f"{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in boxes))


def write_split(root: Path, split: str, count: int, seed: int, workers: int = 1) -> Path:
    """Write `count` images and YOLO label files under root/images/split and root/labels/split."""
    for kind in ("images", "labels"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    jobs = [(root, split, seed, i) for i in range(count)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(_write_image, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_image(*job)
    return root / "images" / split


def make_dataset(root: Path, train: int = 2000, val: int = 64, seed: int = 0, workers: int = 1) -> Path:
    """Create the train and held-out val splits plus data.yaml; returns the yaml path. Idempotent."""
    root = Path(root)
    yaml_path = root / "data.yaml"
    if yaml_path.exists():
        return yaml_path
    write_split(root, "train", train, seed, workers)
    write_split(root, "val", val, seed + 1, workers)
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES))
    yaml_path.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return yaml_path
