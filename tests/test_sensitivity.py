"""`runner sensitivity` on the tiny 128-px yolov8n: the graph edit that keeps nodes in float, a search that ranks and
stops at its limit or budget and writes a precision config that composes, and its refusals."""
from __future__ import annotations

import json
import shlex
from fnmatch import fnmatchcase

import numpy as np
import onnx
import pytest
import yaml

from conftest import REPO, SMALL_IMGSZ, export_spec
from runner.data import select
from runner.export import export_onnx
from runner.preflight import compose_variants
from runner.quantize import QUANTIZED_OPS, CalibrationSet, quantize_qdq, quantized_nodes
from runner.quantize import keep_in_float, qdq_pairs

USAGE_EXIT = 2
TINY = ["model.imgsz=[128,128]", "data.limit=8"]


def outputs_of(model: onnx.ModelProto | str, blob: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: blob})[0]


def reading_pairs(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Those of the `names` nodes with an input behind a Quantize/Dequantize pair, in graph order."""
    pairs = qdq_pairs(model)
    return [n.name for n in model.graph.node if n.name in names and set(n.input) & set(pairs)]


@pytest.fixture(scope="module")
def tiny_qdq(export_cache, held_out_images):
    """(fp32 reference, its Q/DQ int8 ONNX) of yolov8n at 128 px, calibrated on 4 held-out images."""
    # dynamic, as test_scenarios exports it: one export for both
    reference = export_onnx(export_spec("ultralytics", dynamic=True, imgsz=SMALL_IMGSZ), export_cache)
    files = tuple(select(held_out_images, None, 4).files)
    return reference, quantize_qdq(reference, CalibrationSet(files, (1, 3, *SMALL_IMGSZ)), "minmax", export_cache,
                                   keep_float=[])


def test_keeping_nodes_in_float_rewires_them_past_their_pairs(tiny_qdq):
    """Every node kept in float gives back the fp32 model's outputs; one Conv kept reads float inputs, the other
    quantized nodes keep their pairs."""
    reference, qdq = tiny_qdq
    model = onnx.load(qdq.path)
    quantized = quantized_nodes(onnx.load(reference.path), QUANTIZED_OPS, [])
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert set(convs) <= set(quantized)
    assert quantized == reading_pairs(model, quantized)  # every node the quantizer chose reads a pair
    blob = np.random.default_rng(0).random((1, 3, *SMALL_IMGSZ), np.float32)
    fp32, int8 = outputs_of(reference.path, blob), outputs_of(model, blob)
    assert np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32) > 1e-3  # quantization moves the outputs
    every = keep_in_float(model, {n.name for n in model.graph.node})
    assert not [n for n in every.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    np.testing.assert_allclose(outputs_of(every, blob), fp32, rtol=1e-5, atol=1e-5)
    one = keep_in_float(model, {convs[3]})
    node = next(n for n in one.graph.node if n.name == convs[3])
    assert not set(node.input) & set(qdq_pairs(one))
    assert reading_pairs(one, quantized) == [name for name in quantized if name != convs[3]]
    assert not np.array_equal(outputs_of(one, blob), int8)


@pytest.mark.slow  # ~10 s of searching at 128 px, more on a loaded host
def test_search_ranks_stops_and_writes_a_config_that_composes(tmp_path, runner_main, held_out_images):
    """Ranked by mAP recovered, greedy to the limit or the budget (a progress line per evaluation), and the config
    written holds exactly the layers reported: `runner --cfg job` and the printed sweep compose it."""
    out, budget = tmp_path / "found", 25
    said = runner_main(["sensitivity", *TINY, f"data.images={held_out_images}", f"outputs={tmp_path}",
                        "--group", "block", "--images", "4", "--limit", "0.0001", "--max-evals", str(budget),
                        "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert said.returncode in (0, 1), said.stdout + said.stderr
    result = json.loads((out / "sensitivity.json").read_text())
    ranked = result["ranked"]
    # yolov8n's 21 blocks with quantized nodes; none of the nodes the preset keeps in float is searched
    assert len(ranked) == 21 and all(r["name"].startswith("/model.") for r in ranked)
    pins = yaml.safe_load((REPO / "conf" / "precision" / "int8_qdq.yaml").read_text())["keep_float"]
    assert not [n for r in ranked for n in r["nodes"] if any(fnmatchcase(n, p) for p in pins)]
    assert [(-r["recovered"], r["alone_float"]["rel_l2"]) for r in ranked] == \
        sorted((-r["recovered"], r["alone_float"]["rel_l2"]) for r in ranked)
    progress = [line for line in said.stdout.splitlines() if line.startswith("sensitivity: [")]
    taken, pruned = result["taken"], [r["name"] for r in ranked if r["pruned"]]
    assert sum(" rank " in line for line in progress) == 21
    assert sum(" keep " in line for line in progress) == len(taken)
    assert len(progress) == 21 + len(taken) + sum(" prune on " in line for line in progress)
    assert result["kept"] == [name for name in taken if name not in pruned]
    reference = {result["images"]: result["reference_map50_95"],
                 result["confirm_images"]: result["confirmed_reference_map50_95"]}
    drops = [reference[r["kept_images"]] - r["kept_map50_95"] for r in ranked[:len(taken)]]
    if result["stopped_by"] == "limit":
        assert (drops or [result["reference_map50_95"] - result["quantized"]["map50_95"]])[-1] <= 0.0001
        assert all(d > 0.0001 for d in drops[:-1])
    else:
        assert result["stopped_by"] == "budget: evals" and result["evals"] == budget
    assert taken == [r["name"] for r in ranked[:len(taken)]]
    config = yaml.safe_load((out / "precision" / "int8_qdq_pinned.yaml").read_text())
    assert config["keep_float"] == result["keep_float"] == pins + [f"{name}*" for name in result["kept"]]
    for name in result["kept"]:
        assert f"| `{name}` |" in said.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.data.tags["runner.kind"] == "sensitivity" and run.data.metrics["drop"] == pytest.approx(result["drop"])
    assert json.loads(run.data.params["keep_float"]) == result["keep_float"]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "sensitivity")) == \
        ["sensitivity/int8_qdq_pinned.yaml", "sensitivity/sensitivity.csv", "sensitivity/sensitivity.json"]

    composed = runner_main(["--cfg", "job", f"hydra.searchpath=[file://{out}]", "precision=int8_qdq_pinned"])
    precision = yaml.safe_load(composed.stdout)["precision"]
    assert precision["int8_mode"] == "qdq" and precision["keep_float"] == result["keep_float"]
    sweep = [line.split("sweep it: ")[1] for line in said.stdout.splitlines() if "sweep it: " in line]
    if not result["kept"]:  # the two would be one variant
        assert not sweep and "no layer kept beyond precision.keep_float" in said.stdout
        return
    variants = compose_variants(shlex.split(sweep[0])[3:])
    assert sorted(list(v.precision.keep_float) for v in variants) == sorted([pins, result["keep_float"]])


def test_the_kept_table_shows_each_steps_tensorrt_latency_where_it_was_timed():
    """As the H200 run printed it (results/gpu/2026-12-01-h200-trt8.6.0-sensitivity-latency); without --latency the
    column is left out."""
    from runner.sensitivity import Layer, Outcome, Score, kept_table

    kept = [Layer("/model.22/dfl/conv/Conv", "Conv", ["/model.22/dfl/conv/Conv"], "/model.22/dfl/conv/Conv*",
                  recovered=0.0117, kept_map50_95=0.7078, kept_images=16, latency_ms=0.433)]
    outcome = Outcome("yolov8n", 0.01, 16, 64, "percentile", 0.7186, Score(0.6961, 0.04), kept, [kept[0].name], [],
                      Score(0.7078, 0.04), 0.7328, latency_ms=0.439)
    assert kept_table(outcome).splitlines() == [
        "| layer kept in float | op | recovers alone (mAP50-95) | mAP50-95 after keeping | drop | infer p50 ms |",
        "|---|---|---|---|---|---|",
        "| (none: all quantized) | | | 0.6961 on 16 | 0.0225 | 0.439 |",
        "| `/model.22/dfl/conv/Conv` | Conv | +0.0117 | 0.7078 on 16 | 0.0108 | 0.433 |"]
    outcome.latency_ms = None
    assert kept_table(outcome).splitlines()[0].endswith("| drop |")


def test_pruning_puts_back_in_int8_each_layer_the_rest_do_not_need():
    """As the H200 run of yolo11n met it (results/gpu/2026-12-01-h200-trt8.6.0-sensitivity-prune): the greedy took
    /model.4/ on 16 images, then /model.8/ (which moved nothing) and /model.23/ on 64. First taken first, each goes
    back to int8 where the rest stay within the limit; the budget stops it; the table shows both steps."""
    from runner.sensitivity import Layer, Outcome, Score, kept_table, prune

    steps = (("/model.4/", 0.0162, 0.6856, 16, 0.603), ("/model.8/", 0.0138, 0.6649, 64, 0.648),
             ("/model.23/", 0.0137, 0.6785, 64, 0.721))  # greedy order: recovered alone, mAP after, images, p50 ms
    a, b, c = (Layer(n, "Conv", [n], f"{n}*", recovered=r, kept_map50_95=m, kept_images=k, latency_ms=ms)
               for n, r, m, k, ms in steps)
    maps = {("/model.8/", "/model.23/"): 0.6730, ("/model.23/",): 0.6726, (): 0.6590}  # fp32 0.6788 on 64
    tried = []

    def score_of(rest):
        tried.append(tuple(la.name for la in rest))
        return Score(maps[tried[-1]], 0.02)

    assert prune([a, b, c], score_of, 0.6788, 0.01, lambda: None) == [c]
    assert tried == [("/model.8/", "/model.23/"), ("/model.23/",), ()]  # without /model.23/: 0.0199, kept
    assert (a.pruned.map50_95, b.pruned.map50_95, c.pruned) == (0.6730, 0.6726, None)
    a.pruned_latency_ms, b.pruned_latency_ms = 0.696, 0.674
    outcome = Outcome("yolo11n", 0.01, 16, 64, "percentile", 0.6825, Score(0.6694, 0.03), [a, b, c], [c.name],
                      [c.pattern], Score(0.6856, 0.02), 0.6788, taken=[a.name, b.name, c.name], latency_ms=0.609)
    assert kept_table(outcome).splitlines()[3:] == [
        "| `/model.4/` | Conv | +0.0162 | 0.6856 on 16 | -0.0031 | 0.603 |",
        "| `/model.8/` | Conv | +0.0138 | 0.6649 on 64 | 0.0139 | 0.648 |",
        "| `/model.23/` | Conv | +0.0137 | 0.6785 on 64 | 0.0003 | 0.721 |",
        "| pruned: `/model.4/` back in int8 | Conv | +0.0162 | 0.6730 on 64 | 0.0058 | 0.696 |",
        "| pruned: `/model.8/` back in int8 | Conv | +0.0138 | 0.6726 on 64 | 0.0062 | 0.674 |"]

    for la in (a, b, c):
        la.pruned = None
    tried.clear()
    assert prune([a, b, c], score_of, 0.6788, 0.01, lambda: "budget: evals" if tried else None) == [b, c]


@pytest.mark.parametrize("args, says", [
    (["--limit", "1.5"], "--limit: an mAP50-95 drop below 1"),
    (["precision=fp16"], "precision: the search makes a Q/DQ int8 model"),
    (["model=yolov8n,yolo11n"], "2 variants: the search takes one"),
    (["--images", "9"], "--images 9: more than data.limit=8"),
    (["--weights", "missing.pt"], "model.weights: file not found: missing.pt"),
    (["--max-evals", "0"], "runner sensitivity: argument --max-evals: '0' is not a whole number above 0"),
])
def test_bad_arguments_are_refused_in_one_line_before_work(tmp_path, runner_main, args, says):
    said = runner_main(["sensitivity", *TINY, f"outputs={tmp_path / 'out'}", "--images", "4", *args])
    assert said.returncode == USAGE_EXIT, said.stdout + said.stderr
    (line,) = said.stderr.strip().splitlines()
    assert line.startswith(f"runner: error: {says}") and not said.stdout
    assert not (tmp_path / "out").exists()


def test_preflight_composes_a_precision_option_from_hydra_searchpath(tmp_path):
    """The sweep `runner sensitivity` prints names its config by `hydra.searchpath`, which preflight must see too."""
    (tmp_path / "precision").mkdir()
    (tmp_path / "precision" / "mine.yaml").write_text("name: int8\nint8_mode: qdq\nkeep_float: ['/model.22/*']\n")
    variants = compose_variants(["-m", f"hydra.searchpath=[file://{tmp_path}]", "precision=fp32,mine"])
    assert [list(v.precision.keep_float) for v in variants] == [["/model.22/*"], []]
