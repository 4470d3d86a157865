"""Two variants that differ never share a table cell: a real sweep over precision.keep_float on onnxruntime (Q/DQ,
yolov8n at 128 px) read by the summary, `runner table`, `runner baseline` and `runner check`. The label names the pins
where they are not the preset's (`keep none`, `keep 1`); two pin lists of one length, which the label cannot tell
apart, are told apart by the setting that differs; the same variant twice is refused by the gate."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import PLUMBING, REPO, UNTIMED, run_cli
from runner.report import cli

PINS = 'precision.keep_float=[],["*/dfl/*"],["*cv2.*.2/Conv"]'  # none; and two lists of one pattern each
ONNX = {"ul st qdq percentile keep none cal 8", "ul st qdq percentile keep 1 cal 8"}  # 8 calibration images, not 32
BUILDS = {"ort st int8", "ort st int8 precision.keep_float=['*/dfl/*']",
          "ort st int8 precision.keep_float=['*cv2.*.2/Conv']"}


@pytest.fixture(scope="module")
def pinned(tmp_path_factory, export_cache) -> tuple[Path, str]:
    """(sweep folder, tracking URI) of the three-variant sweep over the pins."""
    outputs = tmp_path_factory.mktemp("pins") / "outputs"
    proc = run_cli(["-m", "precision=int8_qdq", PINS, "precision.calibration_images=8", "backend=onnxruntime",
                    *PLUMBING, *UNTIMED, f"cache_dir={export_cache}"], outputs, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = Path(proc.stdout.rstrip().splitlines()[-1].split("summary in ", 1)[1])
    return (folder if folder.is_absolute() else REPO / folder), f"sqlite:///{outputs}/mlflow.db"


def test_pins_that_differ_give_their_own_rows_and_baseline_cells(pinned, tmp_path):
    folder, uri = pinned
    summary = pd.read_csv(folder / "summary.csv", keep_default_na=False)
    assert set(summary["onnx"]) == ONNX and set(summary["build"]) == BUILDS and len(summary) == 3
    for source in (["--results", str(folder)], ["--tracking-uri", uri, "--sweep", "latest"]):
        out = tmp_path / source[0].strip("-")
        assert cli.main(["table", *source, "--out", str(out)]) == 0
        table = pd.read_csv(out / "table.csv", keep_default_na=False)
        assert len(table.drop_duplicates(["onnx", "build"])) == 3 and set(table["build"]) == BUILDS
        baseline = out / "baseline.json"
        assert cli.main(["baseline", *source, "--out", str(baseline)]) == 0
        cells = json.loads(baseline.read_text())["cells"]
        assert sorted(cells) == sorted(f"yolov8n | {c.onnx} | {c.build}" for c in summary.itertuples())
        assert cli.main(["check", *source, "--baseline", str(baseline), "--no-timing",
                         "--summary", str(out / "check.md")]) == 0


def test_a_variant_the_configs_cannot_tell_apart_is_refused_by_the_gate(pinned, tmp_path, capsys):
    folder, _ = pinned
    twice = ["--results", str(folder), "--results", str(folder)]
    assert cli.main(["table", *twice, "--out", str(tmp_path / "table")]) == 0  # both rows shown, none hidden
    assert len(pd.read_csv(tmp_path / "table" / "table.csv")) == 6
    capsys.readouterr()
    assert cli.main(["baseline", *twice, "--out", str(tmp_path / "baseline.json")]) == 2
    said = capsys.readouterr().err
    assert said.startswith("runner: error: cell 'yolov8n | ul st qdq percentile ") and "holds 2 variants" in said
    assert len(said.strip().splitlines()) == 1 and not (tmp_path / "baseline.json").exists()


def test_another_variant_under_the_baseline_label_is_a_regression(pinned, tmp_path, capsys):
    folder, _ = pinned
    baseline = tmp_path / "baseline.json"
    assert cli.main(["baseline", "--results", str(folder), "--out", str(baseline)]) == 0
    data = json.loads(baseline.read_text())
    key = next(k for k in data["cells"] if "'*/dfl/*'" in k)
    data["cells"][key]["cell"]["onnx"]["keep_float"] = '["*/enc_*"]'  # also `keep 1`: another Q/DQ ONNX
    baseline.write_text(json.dumps(data))
    assert cli.main(["check", "--results", str(folder), "--baseline", str(baseline), "--no-timing",
                     "--summary", str(tmp_path / "check.md")]) == 1
    escaped = key.replace("|", "\\|")
    assert f"|{escaped}|variant|the baseline's|another, of other int8 settings|REGRESSION|" in \
        (tmp_path / "check.md").read_text()
