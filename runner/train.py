"""Train the shipped models: an ultralytics detector family (nc=3) on generated shapes.

    python -m runner.train --arch yolo11n --device 0 --epochs 100

This is the script that made every `runner/assets/<arch>.pt` (the `conf/model/` presets). The architecture
comes from ultralytics' own yaml (`yolo11n` -> yolo11n.yaml, scale n), or for rtdetr-n from
`runner/assets/rtdetr-n.yaml`. `--resume` continues a run cut short (by a time limit) from its last epoch. It works offline (no hub downloads)
on a CPU too, only slower. It prints mAP50 / mAP50-95 on the held-out split and writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from runner.config import ASSETS, DETR_MODELS, MODELS
from runner.synthetic import VERSION, make_dataset


def architecture(arch: str) -> str:
    """The ultralytics model yaml of a preset: yolov5nu is yolov5n.yaml, which ultralytics builds with its
    anchor-free (u) head."""
    if arch in DETR_MODELS:
        return str(ASSETS / f"{arch}.yaml")
    return "yolov5n.yaml" if arch == "yolov5nu" else f"{arch}.yaml"


def train(arch: str, data_root: Path, out: Path, epochs: int, imgsz: int, batch: int, device: str,
          workers: int, resume: bool = False, hours: float | None = None, init: Path | None = None
          ) -> tuple[dict, Path]:
    """Train `arch` (or resume its last epoch), copy its best weights to `out`; returns its held-out figures and
    its per-epoch CSV. `hours` bounds the whole training (ultralytics fits the epochs to it, across resumes);
    `init` starts every layer whose name and shape match from those weights (rtdetr-n: the yolov8n backbone)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    # ultralytics logs training to MLflow where it is installed: keep that store, artifacts too, beside the runs
    os.environ.setdefault("MLFLOW_TRACKING_URI", (data_root / "train" / "mlruns").resolve().as_uri())
    from ultralytics import RTDETR, YOLO

    family = RTDETR if arch in DETR_MODELS else YOLO
    data_yaml = make_dataset(data_root, workers=max(workers, 1))
    start = time.perf_counter()
    last = data_root / "train" / arch / "weights" / "last.pt"
    if resume and last.exists():
        model = family(str(last))
        model.train(resume=True)
    else:
        model = family(architecture(arch))
        if init:
            model.load(str(init))
        model.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device=device, workers=workers,
                    project=str((data_root / "train").resolve()), name=arch, exist_ok=True, plots=False, amp=False,
                    seed=0, deterministic=True, close_mosaic=max(epochs // 6, 1), patience=0, time=hours)
    best = Path(model.trainer.best)
    metrics = family(str(best)).val(data=str(data_yaml), imgsz=imgsz, batch=batch, device=device, plots=False,
                                  project=str((data_root / "train").resolve()), name=f"{arch}-val", exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, out)
    summary = {"arch": arch, "yaml": Path(architecture(arch)).name, "weights": out.name, "generator": VERSION,
               "train_images": len(list((data_root / "images" / "train").iterdir())), "epochs": model.trainer.epochs,
               "resumed": resume, "init": init.name if init else None, "imgsz": imgsz,
               "device": device, "train_s": round(time.perf_counter() - start, 1),
               "map50": float(metrics.box.map50), "map50_95": float(metrics.box.map),
               "per_class_map50_95": {metrics.names[int(c)]: float(v) for c, v in
                                      zip(metrics.box.ap_class_index, metrics.box.maps[metrics.box.ap_class_index])}}
    print(f"{arch}: held-out split: mAP50={summary['map50']:.3f} mAP50-95={summary['map50_95']:.3f} -> {out}")
    return summary, Path(model.trainer.save_dir) / "results.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=MODELS + DETR_MODELS, default="yolov8n")
    parser.add_argument("--data-root", type=Path, default=Path(f"outputs/data/shapes-v{VERSION}"))
    parser.add_argument("--out", type=Path, help="default: runner/assets/<arch>.pt")
    parser.add_argument("--summary", type=Path, help="write the figures as JSON here")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--resume", action="store_true", help="continue the run under --data-root from last.pt")
    parser.add_argument("--hours", type=float, help="train for this long in all (ultralytics' time), not --epochs")
    parser.add_argument("--init", type=Path, help="weights to start the matching layers from (e.g. a backbone)")
    args = parser.parse_args()
    summary, per_epoch = train(args.arch, args.data_root, args.out or ASSETS / f"{args.arch}.pt", args.epochs,
                               args.imgsz, args.batch, args.device, args.workers, args.resume, args.hours, args.init)
    if args.summary:  # the figures, and the per-epoch losses and metrics beside them
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(per_epoch, args.summary.with_suffix(".csv"))
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
