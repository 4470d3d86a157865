"""The scale-out proof in one JSON: wall time of the same sweep on 1 GPU and on every GPU, their ratio, and
the GPU each variant ran on (read back from the MLflow store). Usage: scale-summary.py DEST TRACKING_URI"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from runner.environment import environment
from runner.tags import VARIANT, query


def sweep(dest: Path, step: str, client: MlflowClient) -> dict:
    sweep_id = (dest / step / "sweep_id").read_text().strip()
    runs = client.search_runs([client.get_run(sweep_id).info.experiment_id], query(VARIANT, sweep_id))
    variants = [{"name": r.info.run_name, "status": r.data.tags["status"], "gpu_index": r.data.params.get("env.gpu.index"),
                 "gpu_uuid": r.data.params.get("env.gpu.uuid"), "build_s": r.data.metrics.get("build.build_s"),
                 "wall_s": (r.info.end_time - r.info.start_time) / 1000} for r in runs]
    return {"sweep_run": sweep_id, "wall_s": float((dest / step / "wall_s").read_text()),
            "command": (dest / step / "run.log").read_text().strip().splitlines()[-1].split(" wall: ", 1)[-1],
            "variants_ok": sum(v["status"] == "ok" for v in variants), "variants": len(variants),
            "distinct_gpus": len({v["gpu_uuid"] for v in variants}), "runs": variants}


def main(dest: str, uri: str) -> None:
    client, dest = MlflowClient(uri), Path(dest)
    one, every = sweep(dest, "scale-1", client), sweep(dest, "scale-all", client)
    print(json.dumps({"date": datetime.date.today().isoformat(), **environment(17),
                      "ratio_all_to_1": round(every["wall_s"] / one["wall_s"], 3),
                      "one_gpu": one, "all_gpus": every}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
