"""Train the embedded default model: yolov8n (nc=3) on generated shapes.

    python -m runner.train_default --device 0 --epochs 100

This is the script that made `runner/assets/shapes_yolov8n.pt`. It works offline (no hub
downloads) on a CPU too, only slower. It prints mAP50 / mAP50-95 on the held-out split.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from runner.synthetic import make_dataset

DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "shapes_yolov8n.pt"


def train(data_root: Path, out: Path, epochs: int, imgsz: int, batch: int, device: str, workers: int) -> dict:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    data_yaml = make_dataset(data_root)
    model = YOLO("yolov8n.yaml")
    model.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device=device, workers=workers,
                project=str(data_root / "train"), name="run", exist_ok=True, plots=False, amp=False,
                seed=0, deterministic=True, close_mosaic=max(epochs // 6, 1), patience=0)
    best = Path(model.trainer.best)
    metrics = YOLO(str(best)).val(data=str(data_yaml), imgsz=imgsz, batch=batch, device=device, plots=False,
                                  project=str(data_root / "train"), name="val", exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, out)
    summary = {"weights": str(out), "map50": float(metrics.box.map50), "map50_95": float(metrics.box.map)}
    print(f"held-out split: mAP50={summary['map50']:.3f} mAP50-95={summary['map50_95']:.3f} -> {out}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("outputs/data/shapes"))
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    train(args.data_root, args.out, args.epochs, args.imgsz, args.batch, args.device, args.workers)


if __name__ == "__main__":
    main()
