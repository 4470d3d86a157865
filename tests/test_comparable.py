"""Rows of one sweep measured alike: a static and a dynamic variant at 128 px on onnxruntime (the plumbing exports),
with a dynamic profile whose opt batch is 2, so that each variant's own opt shape would differ.

Both variants are timed at the static shape [bench.batch, 3, *imgsz], and say so in the summary, the table and
MLflow; the headline mAP50-95 is measured at that shape too, and the dynamic row's worst shape is its own column.
The offline scenario sweeps the batches each profile holds (static: 1; dynamic: 1 and 2, not 8), and its best batch
reaches results.json, MLflow, the summary and the table under the names `runner pick` reads; the server
scenario's latency and rates reach MLflow.
"""
from __future__ import annotations

import csv
import json

import pytest
from conftest import run_cli, sweep_runs

from runner.report import cli
from runner.results import VariantResult

STATIC_SHAPE = [1, 3, 128, 128]
SWEEP = ["-m", "shape=static,dynamic", "backend=onnxruntime", "model.imgsz=[128,128]", "profile.min=[1,3,64,64]",
         "profile.opt=[2,3,128,128]", "profile.max=[2,3,128,128]", "bench=quick", "data.limit=2",
         "bench.offline_batches=[1,2,8]", "bench.server_rate=50", "bench.server_queries=5"]
OFFLINE = {"static": ([1], {"2", "8"}), "dynamic": ([1, 2], {"8"})}  # batches run, batches skipped


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, export_cache):
    outputs = tmp_path_factory.mktemp("comparable")
    proc = run_cli([*SWEEP, f"cache_dir={export_cache}"], outputs, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    folder, = (outputs / "sweeps").iterdir()
    results = {r["cell"]["build"]["shape"]: VariantResult.from_dict(r)
               for r in json.loads((folder / "results.json").read_text())}
    _, runs = sweep_runs(f"sqlite:///{outputs}/mlflow.db")
    return {"outputs": outputs, "folder": folder, "results": results, "proc": proc,
            "runs": {r.data.tags["cell.build.shape"]: r for r in runs}}


def test_every_variant_is_timed_at_the_static_shape_and_says_so(sweep, capsys):
    results = sweep["results"]
    assert {mode: r.status for mode, r in results.items()} == {"static": "ok", "dynamic": "ok"}
    timed = {mode: r.bench.settings["shape"] for mode, r in results.items()}
    assert timed == {"static": STATIC_SHAPE, "dynamic": STATIC_SHAPE}  # not the dynamic opt [2, 3, 128, 128]
    for mode, result in results.items():
        run = sweep["runs"][mode]
        assert run.data.tags["timed_shape"] == "1x3x128x128"
        assert run.data.params["resolved.timed_shape"] == "1x3x128x128" and run.data.params["bench.batch"] == "1"
        assert run.data.metrics["bench.batch"] == 1
        assert run.data.metrics["bench.per_image.e2e_img_s"] == pytest.approx(1000 / result.bench.e2e.p50)
    with open(sweep["folder"] / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["timed_shape"] for r in rows] == ["1x3x128x128"] * 2
    assert {"e2e_ms_per_img", "e2e_img_s", "map50_95_worst"} <= rows[0].keys()
    assert "timed_shape" in sweep["proc"].stdout  # the terminal summary

    out = sweep["outputs"] / "report"
    assert cli.main(["table", "--tracking-uri", f"sqlite:///{sweep['outputs']}/mlflow.db", "--out", str(out)]) == 0
    with open(out / "table.csv") as f:
        details = list(csv.DictReader(f))
    assert [r["timed at"] for r in details] == ["1x3x128x128"] * 2
    assert [r["mAP at"] for r in details] == ["1x3x128x128"] * 2
    assert "e2e p50/img ms" in details[0] and "e2e img/s" in details[0]


def test_headline_map_is_at_the_static_shape_and_the_worst_shape_is_beside_it(sweep):
    static, dynamic = sweep["results"]["static"], sweep["results"]["dynamic"]
    at_static = [s for s in dynamic.validate.shapes.values() if s.shape == STATIC_SHAPE]
    assert at_static, "the static shape was not validated"  # it is not min, opt or max of the profile
    headline = at_static[0].map50_95
    assert dynamic.validate.headline_shape == STATIC_SHAPE
    assert dynamic.metrics()["val.map50_95"] == headline
    assert headline == pytest.approx(static.metrics()["val.map50_95"], abs=1e-3)  # same weights, same shape
    label, worst = min(dynamic.validate.shapes.items(), key=lambda item: item[1].map50_95)
    assert dynamic.metrics()["val.map50_95_worst"] == worst.map50_95
    assert sweep["runs"]["dynamic"].data.tags["map_worst_shape"] == f"{label} {'x'.join(map(str, worst.shape))}"
    assert static.metrics()["val.map50_95_worst"] == static.metrics()["val.map50_95"]  # one shape


def test_offline_runs_the_batches_each_profile_holds_and_is_recorded(sweep):
    with open(sweep["folder"] / "summary.csv") as f:
        rows = {r["build"]: r for r in csv.DictReader(f)}
    for mode, result in sweep["results"].items():
        bench, (batches, skipped) = result.bench, OFFLINE[mode]
        assert [p.batch for p in bench.offline] == batches and set(bench.offline_skipped) == skipped
        best = bench.offline_best()
        metrics = sweep["runs"][mode].data.metrics
        assert metrics["bench.offline.e2e_img_s"] == pytest.approx(best.e2e_img_s)
        assert metrics["bench.offline.engine_img_s"] == pytest.approx(best.engine_img_s)
        assert metrics["bench.offline.best_batch"] == best.batch
        for point in bench.offline:
            assert metrics[f"bench.offline.b{point.batch}.e2e_img_s"] == pytest.approx(point.e2e_img_s)
        assert bench.server.queries == 5
        assert metrics["bench.server.p99"] == pytest.approx(bench.server.latency.p99)
        assert metrics["bench.server.achieved_rate"] == pytest.approx(bench.server.achieved_rate)
        row = rows[result.cell.build.label]
        assert float(row["offline_e2e_img_s"]) == pytest.approx(best.e2e_img_s)
        assert float(row["offline_engine_img_s"]) == pytest.approx(best.engine_img_s)
        assert int(float(row["offline_batch"])) == best.batch
    assert "offline_e2e_img_s" in sweep["proc"].stdout  # the terminal summary
    out = sweep["outputs"] / "report-offline"
    assert cli.main(["table", "--tracking-uri", f"sqlite:///{sweep['outputs']}/mlflow.db", "--out", str(out)]) == 0
    with open(out / "table.csv") as f:
        details = list(csv.DictReader(f))
    assert all(float(r["offline e2e img/s"]) > 0 and float(r["offline engine img/s"]) > 0 for r in details)
