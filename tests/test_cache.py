"""Cached artifacts are trusted only while they match the size and sha256 recorded when they were written:
the helper itself, the ONNX export cache (with the real CLI once), the engine cache and the timing cache.
A moved or copied cache still hits. Damage is done to copies, never to the session's export cache."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import PLUMBING, SMALL_IMGSZ, export_spec, run_cli
from runner import cache
from runner.backends.tensorrt.build import EngineCache, read_timing_cache
from runner.export import ExportSpec, export_onnx
from runner.results import BuildResult

KEY = "ab" * 32


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    path.write_text("{not json")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_problem_names_the_file_and_what_differs(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 8)
    recorded = cache.record(path)
    assert recorded["size"] == 2048 and len(recorded["sha256"]) == 64
    assert cache.problem(path, recorded) is None
    flip_byte(path)
    assert cache.problem(path, recorded).startswith("blob.bin is damaged (sha256 ")
    truncate(path)
    assert cache.problem(path, recorded) == "blob.bin is damaged (size 1948 != 2048 recorded)"
    path.unlink()
    assert cache.problem(path, recorded) == "blob.bin is missing"


def test_paths_relative_to_the_cache_and_back(tmp_path):
    folder = tmp_path / "engines"
    assert cache.relative(str(folder / "k.plan"), folder) == "k.plan"
    assert cache.absolute("k.plan", tmp_path / "moved") == str(tmp_path / "moved" / "k.plan")
    assert cache.relative(None, folder) is cache.absolute(None, folder) is None


# --- timing cache: a record beside it; stale -> one warning and a fresh start

@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_stale_timing_cache_starts_fresh(tmp_path, caplog, damage):
    path = tmp_path / "timing" / "gpu_trt10.9.0.cache"
    path.parent.mkdir()
    cache.write_recorded(path, b"timing" * 100)
    assert read_timing_cache(path) == b"timing" * 100
    damage(path)
    caplog.set_level("INFO", logger="runner")
    assert read_timing_cache(path) == b""
    (line,) = warnings_of(caplog)
    assert line.startswith("build: timing cache gpu_trt10.9.0.cache is damaged (") and "starting a new one" in line
    assert not path.exists() and not path.with_name(path.name + ".json").exists()  # the stale cache and its record


def test_timing_cache_without_record_starts_fresh(tmp_path, caplog):
    path = tmp_path / "gpu_trt10.9.0.cache"
    path.write_bytes(b"written before records existed")
    caplog.set_level("INFO", logger="runner")
    assert read_timing_cache(path) == b""
    (line,) = warnings_of(caplog)
    assert line == "build: timing cache gpu_trt10.9.0.cache has no record (gpu_trt10.9.0.cache.json is missing); " \
                   "starting a new one"
    assert read_timing_cache(path) == b"" and not path.exists()  # none now: nothing more to say
    assert len(warnings_of(caplog)) == 1


# --- engine cache: plain file bookkeeping, no TensorRT needed

def stored_engine(cache_dir: Path) -> BuildResult:
    """A fake engine stored the way build_engine stores one, with its log and layers beside it."""
    engines = EngineCache(str(cache_dir))
    engine = engines.engine_path(KEY)
    cache.write_atomic(engine, bytes(range(256)) * 40)
    log_path, layers_path = engines.folder / f"{KEY}.log", engines.folder / f"{KEY}.layers.json"
    log_path.write_text("[INFO] built\n")
    layers_path.write_text('{"Layers": []}')
    result = BuildResult(tool="tensorrt_api", artifact=str(engine), profile=[[1, 3, 64, 64]] * 3, build_s=1.5,
                         size_bytes=engine.stat().st_size, log_path=str(log_path), layers_path=str(layers_path),
                         num_layers=0)
    engines.store(KEY, result)
    return result


def test_intact_engine_is_a_hit_and_its_metadata_is_relative(tmp_path):
    built = stored_engine(tmp_path)
    meta = json.loads((tmp_path / "engines" / f"{KEY}.json").read_text())
    assert (meta["artifact"], meta["log_path"], meta["layers_path"]) == (f"{KEY}.plan", f"{KEY}.log",
                                                                         f"{KEY}.layers.json")
    assert meta["files"] == {f"{KEY}.plan": cache.record(Path(built.artifact))}
    hit = EngineCache(str(tmp_path)).lookup(KEY)
    assert hit.cache_hit and hit.build_s == 0.0
    assert (hit.artifact, hit.log_path, hit.layers_path, hit.size_bytes) == (
        built.artifact, built.log_path, built.layers_path, built.size_bytes)


def test_moved_engine_cache_still_hits(tmp_path):
    built = stored_engine(tmp_path / "old")
    shutil.move(tmp_path / "old", tmp_path / "new")
    hit = EngineCache(str(tmp_path / "new")).lookup(KEY)
    assert hit.cache_hit
    assert hit.artifact == str(tmp_path / "new" / "engines" / Path(built.artifact).name)
    assert Path(hit.artifact).read_bytes() == bytes(range(256)) * 40
    assert Path(hit.log_path).is_file() and Path(hit.layers_path).parent == Path(hit.artifact).parent


@pytest.mark.parametrize("damage,what", [(truncate, f"{KEY}.plan is damaged (size 10140 != 10240 recorded)"),
                                         (flip_byte, f"{KEY}.plan is damaged (sha256 "),
                                         (Path.unlink, f"{KEY}.plan is missing")], ids=["truncated", "flipped",
                                                                                        "missing"])
def test_damaged_engine_is_a_miss_said_once_and_removed(tmp_path, caplog, damage, what):
    built = stored_engine(tmp_path)
    damage(Path(built.artifact))
    caplog.set_level("INFO", logger="runner")
    assert EngineCache(str(tmp_path)).lookup(KEY) is None
    (line,) = warnings_of(caplog)
    assert line.startswith(f"build: cached {what}") and line.endswith("; rebuilding")
    assert list((tmp_path / "engines").iterdir()) == []


def test_invalid_engine_metadata_is_a_miss(tmp_path, caplog):
    stored_engine(tmp_path)
    garbage(tmp_path / "engines" / f"{KEY}.json")
    caplog.set_level("INFO", logger="runner")
    assert EngineCache(str(tmp_path)).lookup(KEY) is None
    (line,) = warnings_of(caplog)
    assert line.startswith(f"build: cached {KEY}.json is invalid (JSONDecodeError: ") and line.endswith("; rebuilding")
    assert list((tmp_path / "engines").iterdir()) == []


# --- ONNX export cache: copies of the session's export

def ul_spec() -> ExportSpec:
    """The export the CLI's plumbing variant asks for (ultralytics, static, fp32, 128 px)."""
    return export_spec("ultralytics", imgsz=SMALL_IMGSZ)


@pytest.fixture
def copied_export(export_cache, tmp_path) -> Path:
    """A copy of the session's ultralytics export at 128 px in a cache of this test (the files its record names: another
    worker may be writing an export's passing files beside them); returns its folder."""
    folder = Path(export_onnx(ul_spec(), export_cache).path).parent
    copy = tmp_path / "cache" / "onnx" / folder.name
    copy.mkdir(parents=True)
    for name in ["artifact.json", *json.loads((folder / "artifact.json").read_text())["files"]]:
        shutil.copy2(folder / name, copy / name)
    return copy


def test_copied_export_cache_hits_in_its_new_place(copied_export):
    artifact = export_onnx(ul_spec(), copied_export.parent.parent)
    assert artifact.cached and artifact.path == str(copied_export / "model.onnx")
    meta = json.loads((copied_export / "artifact.json").read_text())
    assert meta["path"] == "model.onnx" and meta["files"]["model.onnx"]["size"] == artifact.size_bytes


def test_invalid_artifact_json_is_exported_again(copied_export, caplog):
    garbage(copied_export / "artifact.json")
    caplog.set_level("INFO", logger="runner")
    artifact = export_onnx(ul_spec(), copied_export.parent.parent)
    (line,) = warnings_of(caplog)
    assert line.startswith("export: cached artifact.json is invalid (JSONDecodeError: ")
    assert line.endswith("; re-exporting")
    assert not artifact.cached and artifact.path == str(copied_export / "model.onnx")
    assert export_onnx(ul_spec(), copied_export.parent.parent).cached  # recorded again


def test_cli_exports_a_truncated_onnx_again_and_the_variant_passes(copied_export, tmp_path):
    truncate(copied_export / "model.onnx")
    proc = run_cli([*PLUMBING, "backend=onnxruntime", "tracking.enabled=false",
                    f"cache_dir={copied_export.parent.parent}"], tmp_path / "outputs")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "export: cached model.onnx is damaged (size " in out and "recorded); re-exporting" in out
    assert "export: done in" in out
    assert "runner: 1/1 variants ok" in out
    assert export_onnx(ul_spec(), copied_export.parent.parent).cached
