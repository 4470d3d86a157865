"""Single-stream at batch 1 on one engine, both GPU ends: the chain as it runs (queued, one wait) against the same
ends waited for after each stage (pre, execute, post), alternating blocks of runs. Prints p50 ms per stage.
Usage: python3 scripts/one-wait.py ENGINE IMAGE [RUNS]"""
import sys
import time

import cv2
import numpy as np

from runner.backends.tensorrt.runtime import TrtRunner
from runner.prepost import Chain

engine, image, runs = sys.argv[1], cv2.imread(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2000
with TrtRunner(engine, cuda_graph=True) as runner:
    runner.set_shape((1, 3, 640, 640))
    runner.pin([image])
    chain, hw = Chain(runner.gpu_letterbox(), runner.gpu_score_filter(), queued=True), (640, 640)
    times = {"one wait": [], "a wait per stage": []}

    def staged():
        t0 = time.perf_counter()
        boxes = chain.pre(runner, [image], hw)
        t1 = time.perf_counter()
        infer = runner.execute()
        t2 = time.perf_counter()
        chain.post(runner, boxes)
        t3 = time.perf_counter()
        return {"preprocess": (t1 - t0) * 1e3, "infer": infer, "postprocess": (t3 - t2) * 1e3, "e2e": (t3 - t0) * 1e3}

    for block in range(2 * runs // 100):
        for _ in range(100):
            if block % 2:
                times["a wait per stage"].append(staged())
            else:
                times["one wait"].append(chain.run(runner, [image], hw)[1])
    for name, rows in times.items():
        rows = rows[len(rows) // 10:]  # the first tenth warms up
        print(f"{name}: p50 " + " / ".join(f"{s} {np.percentile([r[s] for r in rows], 50):.3f}"
                                          for s in ("preprocess", "infer", "postprocess", "e2e")) + f" ms ({len(rows)} runs)")
