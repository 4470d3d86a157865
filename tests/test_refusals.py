"""Hostile command lines are refused in one line, exit 2, before anything is made: a resume that asks for
other variants than its sweep measured, folders that cannot be written, a store that cannot be opened, a
sweep without -m, an empty sweep, a variant given twice, a name that is a path.

`runner` runs in this process (conftest's `runner_main`: a subprocess would prove nothing more); every case then
checks that nothing was made under `outputs=`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.parent import open_sweep
from runner.preflight import preflight
from runner.sweep import SWEEP_FILE, variant_id

USAGE_EXIT = 2
UNTRACKED = "tracking.enabled=false"
RAN = ["-m", "export=ultralytics,torch", "precision=fp32,fp16"]


@pytest.fixture
def refused(runner_main):
    """refused(args, outputs) -> the one error line of `runner <args> outputs=<outputs>`, after checking the
    exit code and that `outputs` holds what it held before."""

    def run(args: list[str], outputs: Path) -> str:
        before = sorted(outputs.rglob("*")) if outputs.exists() else None
        said = runner_main([*args, f"outputs={outputs}"])
        assert said.returncode == USAGE_EXIT, said.stdout + said.stderr
        (line,) = said.stderr.strip().splitlines()
        assert line.startswith("runner: error: ") and "Traceback" not in said.stdout + said.stderr
        assert (sorted(outputs.rglob("*")) if outputs.exists() else None) == before, "the refused command made files"
        return line.removeprefix("runner: error: ")

    return run


def open_untracked_sweep(outputs: Path, args: list[str]) -> Path:
    """A sweep folder and its sweep.json, as `runner -m <args>` opens them before its first job."""
    argv = [*args, UNTRACKED, f"outputs={outputs}"]
    return open_sweep(argv, preflight(argv)).sweep.folder


def test_resume_with_other_overrides_is_refused_naming_both(tmp_path, refused):
    outputs = tmp_path / "out"
    folder = open_untracked_sweep(outputs, RAN)
    kept = (folder / SWEEP_FILE).read_text()
    line = refused(["-m", "export=torch", "shape=dynamic", "precision=fp32", UNTRACKED, "resume=latest"], outputs)
    assert line == (f"resume: sweep {folder} ran `export=ultralytics,torch precision=fp32,fp16 {UNTRACKED} "
                    f"outputs={outputs}`; this command asks `export=torch shape=dynamic precision=fp32 {UNTRACKED} "
                    f"outputs={outputs}`: give the same overrides to resume it")
    assert (folder / SWEEP_FILE).read_text() == kept


def test_resume_typed_in_another_order_reopens_the_sweep(tmp_path):
    """Jobs are numbered in launch order, the longest build first, whatever order typed: the same variants in
    another order are the same sweep."""
    outputs = tmp_path / "out"
    folder = open_untracked_sweep(outputs, RAN)
    again = open_untracked_sweep(outputs, ["-m", "precision=fp16,fp32", "export=torch,ultralytics", "resume=latest"])
    assert again == folder and [p.name for p in (outputs / "sweeps").iterdir()] == [folder.name]


def test_resume_with_the_same_variants_reopens_the_sweep(tmp_path):
    """The variants are compared, not the words: another launcher or a list written out as a glob resumes."""
    outputs = tmp_path / "out"
    folder = open_untracked_sweep(outputs, ["-m", "precision=fp16,fp32"])
    again = open_untracked_sweep(outputs, ["-m", "precision=glob(fp*)", "hydra/launcher=joblib", "resume=latest"])
    assert again == folder and [p.name for p in (outputs / "sweeps").iterdir()] == [folder.name]
    sweep = json.loads((folder / SWEEP_FILE).read_text())
    assert sweep["overrides"][0] == "precision=fp16,fp32" and sweep["total"] == 2
    argv = ["-m", "precision=fp16,fp32", UNTRACKED, f"outputs={outputs}"]
    assert sweep["variants"] == [variant_id(v) for v in preflight(argv)]


def test_a_sweep_json_without_variants_is_compared_by_its_overrides(tmp_path, refused):
    outputs = tmp_path / "out"
    folder = open_untracked_sweep(outputs, RAN)
    older = {k: v for k, v in json.loads((folder / SWEEP_FILE).read_text()).items() if k != "variants"}
    (folder / SWEEP_FILE).write_text(json.dumps(older))
    assert "give the same overrides to resume it" in refused(["-m", "precision=fp32", UNTRACKED, "resume=latest"],
                                                             outputs)
    assert open_untracked_sweep(outputs, [*RAN, "resume=latest"]) == folder


def test_resume_of_a_sweep_its_config_now_composes_otherwise_is_refused(tmp_path, refused):
    outputs = tmp_path / "out"
    folder = open_untracked_sweep(outputs, RAN)
    sweep = json.loads((folder / SWEEP_FILE).read_text())
    (folder / SWEEP_FILE).write_text(json.dumps({**sweep, "variants": sweep["variants"][::-1]}))
    line = refused([*RAN, UNTRACKED, "resume=latest"], outputs)
    assert line.endswith("which now makes other variants (the config changed since); start a new sweep without "
                         "resume=")


@pytest.mark.parametrize("key", ["outputs", "cache_dir"])
def test_a_folder_under_a_file_is_refused(tmp_path, refused, key):
    """Under a regular file no one can make a folder, root included."""
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "afile" / "sub"
    outputs = bad if key == "outputs" else tmp_path / "out"
    args = [f"cache_dir={bad}"] if key == "cache_dir" else []
    line = refused(["-m", "precision=fp32,fp16", *args], outputs)
    assert line == f"{key}: cannot make {bad}: {tmp_path / 'afile'} is a file, not a folder; give a folder you can write ({key}=DIR)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("sweep", [[], ["-m", "precision=fp32,fp16"]], ids=["run", "sweep"])
def test_a_store_that_cannot_be_opened_leaves_no_folder_and_says_why_whole(tmp_path, refused, sweep):
    outputs = tmp_path / "out"
    outputs.mkdir()
    line = refused([*sweep, "tracking=server", "tracking.uri=ftp://example.invalid/store"], outputs)
    assert line.startswith("tracking.uri: cannot open ftp://example.invalid/store: ")
    assert "unsupported URI 'ftp://example.invalid/store' for model registry data storage; " in line  # not cut
    assert line.endswith("; start the server, or use the embedded store (tracking=sqlite)")


def test_a_sweep_without_m_is_refused(tmp_path, refused):
    line = refused(["precision=fp32,fp16", "bench=quick"], tmp_path / "out")
    assert line == f"precision=fp32,fp16 is a sweep: add -m (runner -m precision=fp32,fp16 bench=quick " \
                   f"outputs={tmp_path / 'out'})"


@pytest.mark.parametrize("sweep, said", [
    ("precision=glob(zz*)", "precision: glob(zz*) selects no value, so the sweep would run nothing; options: fp16, "
                            "fp32, int8, int8_calibrator, int8_qdq"),
    ("bench.iters=range(5,1)", "bench.iters: range(5,1) selects no value, so the sweep would run nothing"),
    ("precision=fp32,fp32", "precision: fp32 comes twice in fp32,fp32; give each value once"),
], ids=["glob-of-nothing", "empty-range", "twice"])
def test_an_empty_sweep_or_a_value_given_twice_is_refused(tmp_path, refused, sweep, said):
    assert refused(["-m", "export=ultralytics,torch", sweep], tmp_path / "out") == said


def test_two_values_that_compose_one_variant_are_refused(tmp_path, refused):
    line = refused(["-m", "precision=fp32,fp16", "precision.name=fp32"], tmp_path / "out")
    assert line == "sweep: precision=fp32 and precision=fp16 make the same variant; keep one of them"


@pytest.mark.parametrize("override", ["model.name=../../evil", "model.name=a/b", "model.name=..", "model.name=a\\b",
                                      "data.name=../x", "profile.name=p/q"])
def test_a_name_that_is_a_path_is_refused(tmp_path, refused, override):
    key, _, value = override.partition("=")
    line = refused([override], tmp_path / "out")
    assert line == f"{key}: a name, not a path: no '/' or '\\', not '.' or '..'; got {value!r}"
