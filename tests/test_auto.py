"""`auto`, the default of preprocess, postprocess and bench.cuda_graph, on a real sweep: resolved per variant on its
backend and recorded as resolved, beside what was asked, in results.json, MLflow and the summary. Here (no
TensorRT) onnxruntime resolves it to the host path, the same path as `cpu`: the rows still tell them apart."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from conftest import PLUMBING, UNTIMED, run_cli, sweep_runs
from runner.report.frame import runs_frame
from runner.results import VariantResult

AUTO_HOST = "pre cpu, post cpu, graph n/a"  # what auto becomes on onnxruntime
CPU_ASKED = "post cpu, graph n/a"  # preprocess=cpu asked explicitly; the rest left to auto


def test_a_sweep_over_cpu_and_auto_gives_two_rows_told_apart(tmp_path, export_cache):
    outputs = tmp_path / "outputs"
    proc = run_cli(["-m", "preprocess=cpu,auto", "backend=onnxruntime", *PLUMBING, *UNTIMED, f"cache_dir={export_cache}"],
                   outputs, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "runner: 2/2 variants ok" in proc.stdout
    sweep = Path(proc.stdout.rstrip().splitlines()[-1].split("summary in ", 1)[1])
    if not sweep.is_absolute():
        sweep = Path(__file__).resolve().parent.parent / sweep

    results = [VariantResult.from_dict(r) for r in json.loads((sweep / "results.json").read_text())]
    resolved = sorted((r.resolved.preprocess, r.resolved.postprocess, r.resolved.cuda_graph, tuple(r.resolved.auto))
                      for r in results)
    built = ("half_input", "int8_input", "head_maps")  # auto too, off on onnxruntime (no engine of runner's to take
    #   them)
    assert resolved == [("cpu", "cpu", None, ("postprocess", "cuda_graph", *built)),
                        ("cpu", "cpu", None, ("preprocess", "postprocess", "cuda_graph", *built))]
    assert not any(r.resolved.half_input or r.resolved.int8_input or r.resolved.head_maps for r in results)
    assert all(r.bench.settings["preprocess"] == "host letterbox (float upload)" for r in results)  # what ran

    summary = pd.read_csv(sweep / "summary.csv", keep_default_na=False)
    assert sorted(summary["auto"]) == [CPU_ASKED, AUTO_HOST]
    assert len(summary.drop_duplicates(["build", "auto"])) == 2
    assert AUTO_HOST in proc.stdout and CPU_ASKED in proc.stdout  # the terminal summary

    _, children = sweep_runs(f"sqlite:///{outputs}/mlflow.db")
    asked = {c.data.params["preprocess.device"]: c for c in children}
    assert set(asked) == {"cpu", "auto"}
    for child in children:
        params = child.data.params
        assert (params["resolved.preprocess"], params["resolved.postprocess"], params["resolved.cuda_graph"]) == \
            ("cpu", "cpu", "n/a")
        assert (params["postprocess.device"], params["bench.cuda_graph"]) == ("auto", "auto")
    assert (asked["auto"].data.tags["auto"], asked["cpu"].data.tags["auto"]) == (AUTO_HOST, CPU_ASKED)
    assert sorted(runs_frame(children)["auto"]) == [CPU_ASKED, AUTO_HOST]  # `runner table` reads it back
