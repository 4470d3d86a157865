"""The launch order of a sweep: longest expected build first, whatever order the command line types. An
explicit backend=tensorrt without TensorRT skips each variant at once with the reason, so the real sweeper and
launcher run 8 jobs in seconds; the job folders' numbers are Hydra's launch order."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import ASSETS
from runner.config import (BackendConfig, BackendName, Device, ModelConfig, Precision, PrecisionConfig,
                           PreprocessConfig, RunConfig)
from runner.sweep import RESULT_FILE, JobRecord
from runner.sweeper import expected_cost, launch_order

FAST = ["backend=tensorrt", "tracking.enabled=false", "data.limit=2"]


def launched(runner_main, outputs: Path, sweep: list[str]) -> list[tuple[str, str, object]]:
    """(model, precision, builder level) of each job, in launch order."""
    proc = runner_main(["-m", *sweep, *FAST, f"outputs={outputs}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = (outputs / "sweeps").iterdir()
    jobs = [JobRecord.read(p) for p in sorted(folder.glob(f"*/{RESULT_FILE}"), key=lambda p: int(p.parent.name))]
    assert json.loads((folder / "sweep.json").read_text())["variants"] == [j.config_id for j in jobs]  # job order
    configs = [j.config for j in jobs]
    return [(c["model"]["name"] or Path(c["model"]["weights"]).stem, c["precision"]["name"],
             c["backend"]["builder_optimization_level"]) for c in configs]


def test_two_typed_orders_launch_alike_longest_build_first(tmp_path, runner_main):
    typed = launched(runner_main, tmp_path / "a", ["precision=fp32,fp16", "model=yolo11n,yolov8n",
                                                   "backend.builder_optimization_level=0,null"])
    reversed_ = launched(runner_main, tmp_path / "b", ["backend.builder_optimization_level=null,0",
                                                       "model=yolov8n,yolo11n", "precision=fp16,fp32"])
    assert typed == reversed_
    assert [precision for _, precision, _ in typed] == ["fp16"] * 4 + ["fp32"] * 4
    assert [level for _, _, level in typed[:4]] == [None, None, 0, 0]  # TensorRT's default level (3) before 0
    assert [model for model, _, _ in typed[:2]] == ["yolov8n", "yolo11n"]  # the larger weights file first


def test_int8_is_expected_to_build_longest():
    def cost(precision: Precision) -> tuple:
        return expected_cost(RunConfig(model=ModelConfig(weights=str(ASSETS / "yolov8n.pt")),
                                       precision=PrecisionConfig(name=precision)))

    assert cost(Precision.int8) > cost(Precision.fp16) > cost(Precision.fp32)


def test_jobs_that_reuse_a_build_launch_after_every_distinct_build():
    """The peer runs TensorRT's engine, and pre/post on the host runs the same engine: their jobs come after the
    builds, so two parallel slots build fp16 and int8 side by side; onnxruntime builds nothing TensorRT does."""
    def run(precision: str, backend: str, pre: str = "auto") -> RunConfig:
        return RunConfig(model=ModelConfig(weights=str(ASSETS / "yolov8n.pt")),
                         precision=PrecisionConfig(name=Precision(precision)),
                         backend=BackendConfig(name=BackendName(backend)), preprocess=PreprocessConfig(Device(pre)))

    jobs = [(run(p, b), [f"precision={p}", f"backend={b}"]) for p in ("fp16", "int8")
            for b in ("tensorrt", "ultralytics")]
    jobs.append((run("fp16", "tensorrt", "cpu"), ["precision=fp16", "backend=tensorrt", "preprocess=cpu"]))
    jobs.append((run("fp16", "onnxruntime"), ["precision=fp16", "backend=onnxruntime"]))
    order = [(r.precision.name.value, r.backend.name.value, r.preprocess.device.value)
             for r, _ in (jobs[i] for i in launch_order(jobs))]
    assert order == [("int8", "tensorrt", "auto"), ("fp16", "onnxruntime", "auto"), ("fp16", "tensorrt", "auto"),
                     ("int8", "ultralytics", "auto"), ("fp16", "tensorrt", "cpu"), ("fp16", "ultralytics", "auto")]
