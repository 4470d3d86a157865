"""Six images of the held-out split with their label boxes (red circle, green rectangle, blue triangle), as one
picture to check the generator by eye.

    python scripts/generator-sample.py results/model/generator-v2.png
"""
import sys
from pathlib import Path

import cv2
import numpy as np

from runner.data import GENERATED, HELD_OUT_COUNT, held_out_split

COLOURS = ((0, 0, 255), (0, 200, 0), (255, 0, 0))  # BGR per class


def main(out: Path, root: Path = Path("outputs/data") / GENERATED) -> None:
    held_out_split(root)
    tiles = []
    for index in range(6):
        image = cv2.imread(str(root / "images" / "val" / f"val_{index:04d}.jpg"))
        h, w = image.shape[:2]
        for line in (root / "labels" / "val" / f"val_{index:04d}.txt").read_text().splitlines():
            c, x, y, bw, bh = (float(v) for v in line.split())
            cv2.rectangle(image, (int((x - bw / 2) * w), int((y - bh / 2) * h)),
                          (int((x + bw / 2) * w), int((y + bh / 2) * h)), COLOURS[int(c)], 1)
        tiles.append(cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(out), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:])]))
    print(f"{out}: 6 of the {HELD_OUT_COUNT} held-out images with their labels")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
