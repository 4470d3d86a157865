"""The wheel: what `pip install` gets must run without the checkout. The full install into a fresh virtual
environment, with a variant run from there, is `make install-check` (scripts/install-check.sh), run by CI."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tracked files (setuptools leaves a build/ folder where it builds)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    built, = out.glob("runner-*.whl")
    return built


def test_wheel_carries_every_config_and_the_default_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert configs and {f"runner/conf/{c}" for c in configs} <= names
    assert "runner/assets/yolov8n.pt" in names
    assert {"runner/backends/tensorrt/build.py", "runner/report/gate.py"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert parser["console_scripts"]["runner"] == "runner.__main__:main"


def test_an_unpacked_wheel_finds_its_own_configs(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("import runner.config as c, runner.preflight as l; "
             "print(c.__file__); print(l.CONF_DIR); print(len(l.preflight(['-m', 'precision=fp32,fp16'])))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    module, conf, variants = done.stdout.split()
    assert Path(module).is_relative_to(tmp_path / "site")
    assert Path(conf) == tmp_path / "site" / "runner" / "conf" and variants == "2"
