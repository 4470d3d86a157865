"""Engine forensics without TensorRT: the engine inspector's JSON joined with per-layer times (`runner.forensics`),
the layer profile in the bench stage, the result and MLflow, and `runner layers` setting two variants side by side.

`INSPECTOR` is written in TensorRT 8.6's own form: a raw \\x1e between the ONNX nodes of a fused layer's Metadata
(which a strict JSON parser refuses), "Format/Datatype" texts as 8.6 words them, a reformat TensorRT inserted and
an unfused Quantize layer of a Q/DQ engine."""
import json
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from runner import forensics
from runner.backends.onnxruntime import OrtRunner
from runner.bench import layer_profile, layers_shape
from runner.report import cli, layers
from runner.report.frame import read_results, results_frame
from runner.results import VariantResult
from runner.sweep import JobRecord
from runner.track import Tracker

GPU_MODELS = Path(__file__).parents[1] / "results/gpu/2026-11-30-h200x2-trt8.6.0-models/models/results.json"
CONV = "/model.0/conv/Conv + PWN(PWN(/model.0/act/Sigmoid), PWN(/model.0/act/Mul))"
INSPECTOR = ('{"Layers": [{"Name": "Reformatting CopyNode for Input Tensor 0 to ' + CONV + '", "LayerType": "Reformat",'
             ' "Inputs": [{"Name": "images", "Format/Datatype": "Row major linear FP32"}],'
             ' "Outputs": [{"Name": "images copy", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],'
             ' "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticValue": "0x00000000000003e8"},'
             ' {"Name": "' + CONV + '", "LayerType": "CaskConvolution",'
             ' "Inputs": [{"Name": "images copy", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],'
             ' "Outputs": [{"Name": "/model.0/act/Mul_output_0", "Format/Datatype": "Thirty-two wide channel vectorized'
             ' row major Int8 format"}], "Metadata": "[ONNX Layer: /model.0/conv/Conv]\x1e[ONNX Layer: /model.0/act/'
             'Sigmoid]\x1e[ONNX Layer: /model.0/act/Mul]", "TacticName": "sm90_xmma_fprop_implicit_gemm_f16f16",'
             ' "TacticValue": "0x1"},'
             ' {"Name": "/model.1/conv/Conv_quantize", "LayerType": "Reformat", "Origin": "QDQ",'
             ' "Inputs": [{"Name": "a", "Format/Datatype": "Row major linear FP16 format"}],'
             ' "Outputs": [{"Name": "b", "Format/Datatype": "Row major Int8 format"}], "TacticValue": "0x2"},'
             ' {"Name": "/model.22/Concat_3", "LayerType": "NoOp", "Inputs": [], "Outputs": []}]}')
TIMES = {f"Reformatting CopyNode for Input Tensor 0 to {CONV}": 0.02, CONV: 0.3, "/model.1/conv/Conv_quantize": 0.05,
         "a layer the inspector did not list": 0.01}


@pytest.fixture
def inspector(tmp_path) -> Path:
    path = tmp_path / "engine.layers.json"
    path.write_text(INSPECTOR)
    return path


def test_precisions_read_from_tensorrt_format_texts():
    texts = {"Row major linear FP32": "fp32", "Channel major FP16 format where channel % 8 == 0": "fp16",
             "Thirty-two wide channel vectorized row major Int8 format": "int8", "Row major linear Int32": "int32",
             "Row major linear BFloat16 format": "bf16", "Channel major UInt8 format": "uint8", "Half": "fp16",
             "Row major linear BOOL": "bool", "Unknown format": "unknown"}
    assert {text: forensics.precision({"Format/Datatype": text}) for text in texts} == texts


def test_the_inspector_and_the_times_join_into_one_table(inspector):
    with pytest.raises(json.JSONDecodeError):
        json.loads(INSPECTOR)  # 8.6's raw control characters: only a non-strict parse reads it
    profile = forensics.join(forensics.read_layers(inspector), TIMES, [1, 3, 640, 640], 50)
    rows = {r.name: r for r in profile.rows}
    copy, conv, quantize = rows[next(iter(TIMES))], rows[CONV], rows["/model.1/conv/Conv_quantize"]
    assert (copy.type, copy.input_precision, copy.precision, copy.reformat, copy.onnx_nodes) == (
        "Reformat", "fp32", "fp16", True, [])  # a reformat does not hold the layer its name says it feeds
    assert (conv.precision, conv.input_precision, conv.tactic, conv.reformat, conv.ms) == (
        "int8", "fp16", "sm90_xmma_fprop_implicit_gemm_f16f16", False, 0.3)
    assert conv.onnx_nodes == ["/model.0/conv/Conv", "/model.0/act/Sigmoid", "/model.0/act/Mul"]
    assert quantize.reformat and (quantize.input_precision, quantize.precision) == ("fp16", "int8")
    assert rows["/model.22/Concat_3"].ms is None and rows["/model.22/Concat_3"].precision == "unknown"
    assert rows["a layer the inspector did not list"].type == "unknown" and profile.unmatched == 1
    assert profile.total_ms == pytest.approx(0.38)
    assert profile.by("precision") == {"int8": (pytest.approx(0.35), 2), "fp16": (0.02, 1),
                                       "unknown": (pytest.approx(0.01), 2)}
    metrics = profile.metrics()
    assert metrics["layers.reformats"] == 2 and metrics["layers.reformat_ms"] == pytest.approx(0.07)
    assert (metrics["layers.unprofiled"], metrics["layers.unmatched"], metrics["layers.int8.count"]) == (1, 1, 2)


def test_names_only_inspector_gives_unknown_types(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"Layers": [CONV, "Reformatting CopyNode for Output Tensor 0 to x"]}))
    rows = forensics.join(forensics.read_layers(path), {CONV: 0.5}, [1, 3, 64, 64], 3).rows
    assert [(r.type, r.precision, r.reformat) for r in rows] == [("unknown", "unknown", False),
                                                                ("unknown", "unknown", True)]
    assert rows[0].onnx_nodes == ["/model.0/conv/Conv", "/model.0/act/Sigmoid", "/model.0/act/Mul"]


class ProfilingRunner:
    """A runtime with a per-layer profiler, standing in for TensorRT's (absent here): `times` as it reports them,
    or the error it raises; `layers`, its inspector's at the profiled shape, or None (the build's JSON stands in)."""

    def __init__(self, times, layers=None):
        self.times, self.layers = times, layers

    def layer_info(self, shape):
        return self.layers

    def layer_times(self, shape, iters):
        if isinstance(self.times, Exception):
            raise self.times
        return self.times


def test_the_bench_profiles_layers_where_the_runtime_can_and_says_why_not(inspector, tmp_path):
    profile, note = layer_profile(ProfilingRunner(TIMES), [1, 3, 640, 640], 20, str(inspector))
    assert note is None and profile.runs == 20 and len(profile.rows) == 5
    assert layer_profile(OrtRunner("unopened.onnx"), [1, 3, 64, 64], 20, None) == (None, None)  # nothing, silently
    failed = layer_profile(ProfilingRunner(RuntimeError("enqueue failed\nmore")), [1, 3, 64, 64], 20, str(inspector))
    assert failed == (None, "not profiled: RuntimeError: enqueue failed")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert layer_profile(ProfilingRunner(TIMES), [1, 3, 64, 64], 20, str(broken))[1].startswith(
        "not profiled: JSONDecodeError")
    profile, note = layer_profile(ProfilingRunner(TIMES), [1, 3, 64, 64], 20, None)
    assert len(profile.rows) == 4 and note.startswith("no engine inspector JSON")
    at_shape = forensics.read_layers(inspector)  # the runtime's inspector at the shape, before the build's JSON
    profile, note = layer_profile(ProfilingRunner(TIMES, at_shape), [1, 3, 64, 64], 20, str(broken))
    assert note is None and len(profile.rows) == 5


def test_layers_are_profiled_at_the_timed_shape_or_at_bench_layers_batch_where_the_profile_holds_it():
    timed, profile = [1, 3, 640, 640], [[1, 3, 640, 640], [32, 3, 640, 640], [64, 3, 640, 640]]
    assert layers_shape(timed, None, profile) == (timed, None)
    assert layers_shape(timed, 32, profile) == ([32, 3, 640, 640], None)
    assert layers_shape(timed, 128, profile) == (
        None, "not profiled: bench.layers_batch=128 is outside the built profile's batches 1..64")


def profiled(result: VariantResult, inspector: Path, scale: float) -> VariantResult:
    """`result` with a layer profile: the test inspector's layers, every time times `scale`."""
    result.bench.layers = forensics.join(forensics.read_layers(inspector),
                                         {k: v * scale for k, v in TIMES.items()}, result.bench.shape, 20)
    return result


@pytest.fixture
def sweep(tmp_path, inspector) -> Path:
    """The committed GPU sweep's results, its two yolov8n TensorRT variants (#2 dynamic, #3 static) profiled."""
    results = read_results(GPU_MODELS)
    profiled(results[2], inspector, 1.0)
    profiled(results[3], inspector, 2.0)
    path = tmp_path / "sweep" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps([r.to_dict() for r in results]))
    return path


def test_a_profile_travels_in_the_result_and_its_metrics(sweep):
    result = read_results(sweep)[3]
    assert VariantResult.from_dict(result.to_dict()) == result and len(result.bench.layers.rows) == 5
    metrics = result.metrics()
    assert metrics["layers.total_ms"] == pytest.approx(0.76) and metrics["layers.fp16.ms"] == pytest.approx(0.04)
    details = results_frame(read_results(sweep))  # the details table (`runner table`) shows the profiled ones
    assert details.loc[details["build_label"] == "trt st fp16", "layers_ms"].notna().sum() == 1
    assert details["reformats"].max() == 2 and details["layers_ms"].max() == pytest.approx(0.76)


def test_layers_sets_two_variants_side_by_side(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["layers", "--results", str(sweep), "yolov8n | ul st fp32 | trt st fp16", "2", "--top", "2",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "A: yolov8n | ul st fp32 | trt st fp16" in printed and "#3 and #2 side by side" in printed
    assert {p.name for p in out.iterdir()} == set(layers.FILES)
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "layers.md").read_text()
    assert "|A|1x3x640x640|20|0.760|5|0.700 (2)|0.040 (1)|0.020 (2)|0.140 (2)|" in page  # int8, fp16, unknown
    assert f"|Reformatting CopyNode for Input Tensor 0 to {CONV}|reformat|0.0400|fp32|fp16|" in page  # precisions
    assert f"|1|{CONV}|CaskConvolution|int8|0.6000|78.9%|{CONV} (int8, 0.3000 ms)|" in page  # what it became in B
    assert "<img src='data:image/png;base64," in (out / "layers.html").read_text()


def test_layers_names_variants_of_one_cell_by_the_settings_the_table_shows(sweep, tmp_path, capsys):
    """Two variants of one cell, told apart by a setting: each named by it, as the table labels them."""
    static = json.loads(sweep.read_text())[3]
    rows = [{**static, "config": {"backend": {"fold_split_concat": fold}}} for fold in (False, True)]
    path = tmp_path / "two" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rows))
    out = tmp_path / "report"
    assert cli.main(["layers", "--results", str(path), "fold_split_concat=true", "fold_split_concat=false",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "A: yolov8n | ul st fp32 | trt st fp16 backend.fold_split_concat=True" in printed
    assert "#1 and #0 side by side" in printed


def test_layers_sets_variants_of_two_sweeps_side_by_side(sweep, tmp_path, capsys):
    """A variant of one sweep beside one of another (fp16 swept apart from the int8 variants), numbered in sweep
    then job order."""
    rows = json.loads(sweep.read_text())
    other = tmp_path / "other" / "results.json"
    other.parent.mkdir()
    other.write_text(json.dumps([rows[3]]))
    (tmp_path / "first").mkdir()
    first = tmp_path / "first" / "results.json"
    first.write_text(json.dumps(rows[:3]))
    out = tmp_path / "report"
    assert cli.main(["layers", "--results", str(first), "--results", str(other), "3", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Layers of sweep first+other: A against B" in printed and "#3 and #2 side by side" in printed
    assert "A: yolov8n | ul st fp32 | trt st fp16" in printed


def test_layers_refuses_in_one_line(sweep, tmp_path, capsys):
    def refused(*args) -> str:
        assert cli.main(["layers", "--results", str(sweep), *args, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    assert "A 'yolov8n | ul st fp32 | trt st' names 2 variants: #3 yolov8n | ul st fp32 | trt st fp16; #15" in \
        refused("yolov8n | ul st fp32 | trt st", "2")
    assert "'fp64' names no variant; the sweep has: #0 rtdetr-n" in refused("fp64", "3")
    assert "has variants #0..#23" in refused("3", "99")
    assert "A and B both name variant #3" in refused("3", "yolov8n | ul st fp32 | trt st fp16")
    assert "variant #0 rtdetr-n | ul dy fp32 | trt dy fp16 has no layer profile" in refused("0", "3")
    assert cli.main(["layers", "--results", str(sweep), "2", "3", "--top", "0"]) == 2  # argparse's usage, then why
    assert "--top: '0' is not a whole number above 0" in capsys.readouterr().err


def test_from_mlflow_the_layers_are_artifacts_of_the_variant_and_the_sweep(sweep, tmp_path, capsys):
    results = read_results(sweep)[:4]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "runner", str(tmp_path / "mlartifacts"))
    sweep_id = tracker.start_sweep("profiled", {})
    now = int(time.time() * 1000)
    runs = [tracker.log_variant(sweep_id, JobRecord(tmp_path, r, config_id=r.cell.key, config={}, started_ms=now + i,
                                                    ended_ms=now + i)) for i, r in enumerate(results)]
    tracker.end_sweep(sweep_id, results, len(results), [])
    client = MlflowClient(uri)
    assert {Path(f.path).name for f in client.list_artifacts(runs[3], "layers")} == {"layers.csv", "layers.json"}
    assert not client.list_artifacts(runs[0], "layers")  # not profiled: no artifact
    table = pd.read_csv(client.download_artifacts(runs[3], "layers/layers.csv", str(tmp_path)))
    assert list(table.columns) == list(forensics.CSV_COLUMNS) and table["share"].sum() == pytest.approx(1.0)
    assert client.get_run(runs[3]).data.metrics["layers.reformats"] == 2
    out = tmp_path / "report"
    assert cli.main(["layers", "--tracking-uri", uri, "--sweep", sweep_id, "3", "2", "--out", str(out)]) == 0
    assert f"logged to run {sweep_id}, artifacts layers/" in capsys.readouterr().out
    assert {Path(f.path).name for f in client.list_artifacts(sweep_id, "layers")} == set(layers.FILES)


H200_INT8 = Path(__file__).parents[1] / "results/gpu/2026-11-30-h200x2-trt8.6.0-int8-layers/int8-layers/results.json"


def test_the_h200_int8_sweep_shows_the_requantizes_at_concat_inputs(tmp_path, capsys):
    """The committed TensorRT 8.6 sweep: the Q/DQ engine's Scale layers made of Q/DQ nodes only are requantizes;
    a convolution that holds its weights' QuantizeLinear is not."""
    by_cell = {r.cell.key: r for r in read_results(H200_INT8)}
    qdq = by_cell["yolov8n | ul dy qdq percentile | trt dy int8 gpu-pre gpu-post"].bench.layers
    requantizes = [r for r in qdq.rows if r.requantize]
    assert len(requantizes) == 26 and {r.type for r in requantizes} == {"Scale"}
    assert all(r in qdq.reformats for r in requantizes)
    assert not any(r.requantize for r in qdq.rows if r.type == "CaskConvolution")
    assert cli.main(["layers", "--results", str(H200_INT8), "trt dy fp16", "qdq percentile", "--out",
                     str(tmp_path)]) == 0
    said = (tmp_path / "layers.md").read_text()
    assert "|Concat_output_0_QuantizeLinear" not in said and "|requantize|" in said and "0.427 (71)|" in said


H200_PINS = {sweep: Path(__file__).parents[1] / "results/gpu" / folder / "results.json" for sweep, folder in
             (("float-out", "2026-12-01-h200-trt8.6.0-int8-cal64/float-out/every-gpu"),
              ("head", "2026-12-01-h200x2-trt8.6.0-int8-head/gpu0"),
              ("pins", "2026-12-01-h200-trt8.6.0-int8-pins/int8-pins/by-hand-flow"))}


def test_pins_tensorrt_ignored_are_named_and_those_it_kept_or_made_copies_are_not():
    """The committed TensorRT 8.6 sweeps: an fp16 output asked of the head's middle convolutions, which TensorRT
    fuses with their SiLU, is ignored without an error (they write int8); the head's last convolutions, kept in
    float and then pinned in int8 with an fp16 output, are judged by the later pin; Concats pinned in int8, which
    TensorRT made into copies, are not judged."""
    def ignored(sweep: str) -> dict[str, list[str]]:
        return {r.cell.build.label: forensics.ignored_pins(r.build.calibration, r.bench.layers)
                for r in read_results(H200_PINS[sweep]) if r.status == "ok" and r.build.calibration}

    float_out = ignored("float-out")
    assert sorted(map(len, float_out.values())) == [0, 6]
    said = next(v for v in float_out.values() if v)
    assert said[0] == "/model.22/cv2.0/cv2.0.1/conv/Conv: asked int8 with an fp16 output, runs int8 -> int8"
    assert all(".1/conv/Conv: asked int8 with an fp16 output, runs int8 -> int8" in line for line in said)
    head, pins = ignored("head"), ignored("pins")
    assert any("float-out" in label for label in head) and not any(head.values())
    assert any("pins 3" in label for label in pins) and not any(pins.values())


def test_pins_no_layer_profile_can_judge_are_said_not_checked(inspector):
    """The variant's check: pins judged where the profile has precisions; where it has none, or there is no
    profile, the pins are said not checked (the cell's △); a build with no pins has nothing to say."""
    from runner.results import BuildResult
    from runner.variant import check_pins

    def build(**calibration) -> BuildResult:
        return BuildResult(tool="tensorrt_api", artifact="engine", profile=[[1, 3, 640, 640]] * 3,
                           calibration=calibration)

    names_only = forensics.join(["/model.0/conv/Conv"], {"/model.0/conv/Conv": 0.3}, [1, 3, 640, 640], 10)
    detailed = forensics.join(forensics.read_layers(inspector), TIMES, [1, 3, 640, 640], 10)
    said = {}
    for name, layers in (("none", None), ("names only", names_only), ("detailed", detailed)):
        pinned = build(fp16_layers=["/model.0/conv/Conv"], int8_layers=["/model.22/Concat_3"])
        check_pins(pinned, layers)
        said[name] = pinned.pin_check_text()
    assert said == {"none": "2 precision pins not checked: no layer profile (see the bench's note)",
                    "names only": "2 precision pins not checked: the engine inspector gave no layer precisions",
                    "detailed": "TensorRT ignored 1 of 2 pins: /model.0/conv/Conv: asked fp16, runs fp16 -> int8"}
    unpinned = build(calibrator="percentile")
    check_pins(unpinned, None)
    assert unpinned.pin_check_text() == "" and unpinned.pins_unchecked is None
