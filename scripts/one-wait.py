"""Single-stream at batch 1 on one engine, both GPU ends: the chain as it runs (queued, one wait) against the same
ends waited for after each stage (pre, execute, post), alternating blocks of runs. Prints p50 ms per stage.
Usage: python3 scripts/one-wait.py ENGINE IMAGE [RUNS]"""
import dataclasses
import sys

import cv2
import numpy as np

from runner.backends.tensorrt.runtime import TrtRunner
from runner.prepost import Chain

engine, image, runs = sys.argv[1], cv2.imread(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2000
with TrtRunner(engine, cuda_graph=True) as runner:
    runner.set_shape((1, 3, 640, 640))
    runner.pin([image])
    chain, hw = Chain(runner.gpu_letterbox(), runner.gpu_score_filter(), queued=True), (640, 640)
    chains = {"one wait": chain, "a wait per stage": dataclasses.replace(chain, queued=False)}
    times = {name: [] for name in chains}
    for block in range(2 * runs // 100):
        name = list(chains)[block % 2]
        for _ in range(100):
            times[name].append(chains[name].run(runner, [image], hw)[1])
    for name, rows in times.items():
        rows = rows[len(rows) // 10:]  # the first tenth warms up
        print(f"{name}: p50 " + " / ".join(f"{s} {np.percentile([r[s] for r in rows], 50):.3f}"
                                          for s in ("preprocess", "infer", "postprocess", "e2e")) + f" ms ({len(rows)} runs)")
