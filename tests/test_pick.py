"""`runner pick` on the committed GPU sweep (24 real variants, H200, TensorRT 8.6.0) read from its results.json and
from a real MLflow sqlite store it is logged to. Every expected set below is read off the committed summary.csv
by hand."""
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from runner.__main__ import main as runner_main
from runner.report import cli, pick
from runner.report.frame import ReportError, read_results, results_frame
from runner.report.plots import _spread
from runner.sweep import JobRecord
from runner.track import Tracker

GPU = Path(__file__).parents[1] / "results/gpu/2026-11-30-h200x2-trt8.6.0-models"
MODELS, BATCH4 = GPU / "models/results.json", GPU / "batch4/results.json"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return results_frame(read_results(MODELS))


def qualifying(choice: pick.Pick) -> list[str]:
    return [f"{r.model} | {r.build_label}" for r in choice.chosen.itertuples()]


def budget(**limits) -> dict:
    return {limit.dest: limits.get(limit.dest) for limit in pick.LIMITS}


def test_pareto_front_on_a_hand_checked_set():
    x, y = pd.Series([1.0, 2.0, 3.0, 4.0, 2.0, 5.0]), pd.Series([0.5, 0.7, 0.6, 0.9, 0.7, 0.9])
    # lower x better: (3, .6) is beaten by (2, .7), (5, .9) by (4, .9); the twin (2, .7) beat neither each other
    assert list(pick.pareto(x, y, low_x=True)) == [True, True, False, True, True, False]
    # higher x better: (5, .9) beats every other point
    assert list(pick.pareto(x, y, low_x=False)) == [False, False, False, False, False, True]


def test_each_limit_filters_and_every_miss_is_counted(frame):
    choice = pick.pick(frame, budget(max_e2e_ms=4.0, max_map_drop=0.005, min_map=0.65))
    assert qualifying(choice) == ["yolov8n | trt st fp16", "yolov5nu | trt st fp16"]  # e2e 3.48, 3.66 ms
    assert choice.count_line() == ("2 of 24 qualify; 18 over --max-e2e-ms, 8 under --min-map, "
                                   "3 over --max-map-drop, 1 not ok (△)")
    infer = pick.pick(frame, budget(max_infer_ms=0.75))  # infer 0.746, 0.748 ms; ranked by e2e 3.48, 3.66 ms
    assert qualifying(infer) == ["yolov8n | trt st fp16", "yolov5nu | trt st fp16"]
    assert qualifying(pick.pick(frame, budget(min_images_per_s=280))) == ["yolov8n | trt st fp16"]  # 287 img/s


def test_a_triangle_qualifies_only_when_asked(frame):
    fast = budget(max_e2e_ms=3.9)
    assert "rtdetr-n | trt st fp16" not in qualifying(pick.pick(frame, fast))
    assert len(pick.pick(frame, fast).chosen) == 4
    anyway = pick.pick(frame, fast, status="any")
    assert qualifying(anyway)[-1] == "rtdetr-n | trt st fp16" and len(anyway.chosen) == 5  # 3.86 ms, mAP 0.496


def test_ranks_and_fronts(frame):
    choice = pick.pick(frame, budget(max_e2e_ms=4.0), by="throughput")
    assert list(choice.chosen["rank"]) == [1, 2, 3, 4, 5]  # the 5 ok rows under 4 ms; the 3.86 ms △ is not
    assert list(choice.chosen["images_per_s"]) == sorted(choice.chosen["images_per_s"], reverse=True)
    on = choice.frame.set_index(["model", "build_label"])["front"]
    assert on["yolov8n", "trt st fp16"] == on["yolov8n", "trt dy fp16"] == "both"  # fastest; its twin 0.0002 better
    assert on["rtdetr-n", "trt dy fp16"] == "both"  # best mAP below the fp32 engines' 5.6 ms
    assert on["rtdetr-n", "trt dy fp32"] == "both" and on["rtdetr-n", "trt st fp32"] == ""  # same mAP, 0.09 ms slower
    assert on["rtdetr-n", "trt st fp16"] == ""  # fast, but △: never a candidate under --status ok
    assert (on != "").sum() == 4


def test_a_missing_figure_is_a_reason_never_a_pass(frame):
    unreferenced = frame.assign(map_drop=frame["map_drop"].where(frame["model"] != "yolov8n"))
    choice = pick.pick(unreferenced, budget(max_map_drop=0.01))
    assert not any(choice.frame.loc[choice.frame["model"] == "yolov8n", "qualifies"])
    assert "4 no mAP drop" in choice.count_line()


def test_offline_images_per_s_is_used_only_where_every_timed_row_has_one(frame):
    offline = frame["e2e_img_s"] * 30
    assert pick.pick(frame.assign(offline_e2e_img_s=offline), budget(min_images_per_s=8000)).rate_source == \
        pick.OFFLINE_E2E
    partial = offline.where(frame["model"] == "yolov8n")
    choice = pick.pick(frame.assign(offline_e2e_img_s=partial), budget(min_images_per_s=8000))
    assert choice.rate_source == pick.SINGLE_E2E and choice.chosen.empty  # never offline beside single stream


def test_rows_timed_at_several_shapes_or_gpus_are_refused(frame):
    both = results_frame(read_results(MODELS) + read_results(BATCH4))
    with pytest.raises(ReportError, match=r"2 shapes \(1x3x640x640: 24, 4x3x640x640: 2\).*--timed-at"):
        pick.pick(both, budget())
    assert len(pick.pick(both, budget(), timed_at="4x3x640x640").frame) == 2
    with pytest.raises(ReportError, match="no variant timed at 2x3x640x640"):
        pick.pick(both, budget(), timed_at="2x3x640x640")
    other_gpu = frame.assign(gpu=frame["gpu"].where(frame["model"] != "yolov8n", "NVIDIA A100"))
    with pytest.raises(ReportError, match="2 GPUs .*not comparable"):
        pick.pick(other_gpu, budget())


def test_exit_codes_and_files(tmp_path, capsys):
    out = tmp_path / "pick"
    assert cli.main(["pick", "--results", str(MODELS), "--max-e2e-ms", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 of 24 qualify; 18 over --max-e2e-ms, 1 not ok (△)" in printed
    assert {p.name for p in out.iterdir()} == set(pick.FILES)
    assert (out / "pick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "yolov8n" in (out / "pick.html").read_text()
    assert pd.read_csv(out / "pick.csv")["qualifies"].sum() == 5
    with pytest.raises(SystemExit) as none:  # as `runner pick` runs it
        runner_main(["pick", "--results", str(MODELS), "--max-e2e-ms", "1", "--out", str(out)])
    assert none.value.code == 1 and "0 of 24 qualify; 23 over --max-e2e-ms" in capsys.readouterr().out
    both = ["--results", str(MODELS), "--results", str(BATCH4), "--out", str(out)]
    assert cli.main(["pick", *both]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_usage_errors_come_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no-such.json")
    assert cli.main(["pick", "--results", missing, "--max-map-drop", "2"]) == 2
    assert capsys.readouterr().err == ("runner: error: runner pick: argument --max-map-drop: 2 is not in [0, 1] "
                                       "(see runner pick --help)\n")  # one line, no usage block
    assert cli.main(["pick", "--results", missing, "--timed-at", "1x3xbig"]) == 2
    assert "not a shape" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["pick", "--results", missing, "--out", str(blocker / "pick")]) == 2
    assert "--out" in capsys.readouterr().err  # refused before the missing results are read


def test_labels_rank_as_whole_numbers_whatever_the_rank_dtype():
    frame = pd.DataFrame({"model": ["m", "m"], "onnx_label": ["o", "o"], "build_label": ["a", "b"],
                          "cuda_graph": [1, 0]})
    for ranks in (pd.array([1, None], dtype="Int64"), [1.0, float("nan")]):
        assert pick.labels(frame.assign(rank=ranks)).tolist() == ["#1 m | a | CUDA graph", "m | b"]


def test_labels_stay_apart():
    spread = _spread([0.1, 0.1, 0.12, 0.5, 0.99], gap=0.05)
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(spread, spread[1:])) and 0 <= spread[0] and spread[-1] <= 1
    assert spread[3] == 0.5  # a label with room stays at its point's height
    assert _spread([0.5] * 30, gap=0.05) == [i / 29 for i in range(30)]  # too many: evenly spaced


def test_from_mlflow_the_pick_is_logged_under_the_sweep(tmp_path, capsys):
    results = read_results(MODELS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "runner", str(tmp_path / "mlartifacts"))
    sweep_id = tracker.start_sweep("gpu models", {})
    now = int(time.time() * 1000)
    for result in results:
        tracker.log_variant(sweep_id, JobRecord(tmp_path, result, config_id=result.cell.key, config={},
                                                started_ms=now, ended_ms=now))
    tracker.end_sweep(sweep_id, results, len(results), [])
    out = tmp_path / "pick"
    assert cli.main(["pick", "--tracking-uri", uri, "--sweep", sweep_id, "--max-e2e-ms", "4", "--out", str(out)]) == 0
    assert f"logged to run {sweep_id}, artifacts pick/" in capsys.readouterr().out
    logged = {Path(f.path).name for f in MlflowClient(uri).list_artifacts(sweep_id, "pick")}
    assert logged == set(pick.FILES)
    from_file = pd.read_csv(out / "pick.csv")
    assert cli.main(["pick", "--results", str(MODELS), "--max-e2e-ms", "4", "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(from_file, pd.read_csv(out / "pick.csv"))
