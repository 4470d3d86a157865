"""runner's pipelines beside the peer, from sweeps' results.json: p50 per stage, copies and throughput.

    python scripts/side-by-side.py results/gpu/<run>/shapes/results.json [...] > side-by-side.md
"""
import json
import sys

from markdown_table import print_table

STAGES = ("preprocess", "infer", "postprocess", "e2e", "h2d", "d2h", "compute")


def rows(path: str):
    for r in json.load(open(path)):
        bench = r.get("bench")
        if not bench:
            continue
        cell, settings = r["cell"], bench["settings"]
        p50 = {s: f"{bench[s]['p50']:.3f}" if bench.get(s) else "" for s in STAGES}
        name = "`YOLO(engine).predict`" if r["backend"] == "ultralytics" else "runner " + (
            cell["build"]["pipeline"] or "host pre/post")
        yield [name, settings.get("images"), *p50.values(),
               *(f"{bench['throughput'][k]:.0f}" if k in bench["throughput"] else ""
                 for k in ("opt_batch", "batch1_2streams")),
               "yes" if settings.get("cuda_graph") else "no"]


def main(paths: list[str]) -> None:
    header = ["pipeline", "images", *STAGES, "img/s opt batch", "img/s batch 1, 2 streams", "CUDA graph"]
    print_table(header, (row for path in paths for row in rows(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
