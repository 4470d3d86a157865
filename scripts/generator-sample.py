"""Six images of the held-out split with their label boxes (red circle, green rectangle, blue triangle), as one
picture to check the generator by eye.

    python scripts/generator-sample.py results/model/generator-v2.png
"""
import sys
from pathlib import Path

import cv2
import numpy as np

from runner.data import HELD_OUT_COUNT, load_samples

COLOURS = ((0, 0, 255), (0, 200, 0), (255, 0, 0))  # BGR per class


def main(out: Path, outputs: Path = Path("outputs")) -> None:
    samples, _ = load_samples(None, None, 6, outputs)  # the held-out split, generated on first use
    tiles = []
    for sample in samples:
        image = sample.image.copy()
        for c, (x0, y0, x1, y1) in zip(sample.gt_cls, sample.gt_boxes):
            cv2.rectangle(image, (int(x0), int(y0)), (int(x1), int(y1)), COLOURS[int(c)], 1)
        tiles.append(cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(out), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:])]))
    print(f"{out}: 6 of the {HELD_OUT_COUNT} held-out images with their labels")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
