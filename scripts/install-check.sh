#!/usr/bin/env bash
# The project as a user installs it: build the wheel, check that it carries every module, config and the default
# model, install it with its dependencies into a fresh virtual environment outside the checkout, and from there
# compose a sweep from the configs it carries, run --help, one onnxruntime variant and the table.
set -euo pipefail
PY=${PY:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"  # build from a copy of the tracked files: setuptools leaves build/ where it builds
git -C "$repo" ls-files -z | (cd "$repo" && tar --null -T - -cf -) | tar -xf - -C "$work/src"
"$PY" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
"$PY" - "$work/src" "$work"/dist/runner-*.whl <<'PY'
import sys, zipfile
from pathlib import Path
src, names = Path(sys.argv[1]), set(zipfile.ZipFile(sys.argv[2]).namelist())
wanted = {f"runner/conf/{p.relative_to(src / 'conf')}" for p in (src / "conf").rglob("*.yaml")}
wanted |= {str(p.relative_to(src)) for p in (src / "runner").rglob("*.py")} | {"runner/assets/yolov8n.pt"}
missing = sorted(wanted - names)
assert len(wanted) > 50 and not missing, f"the wheel lacks {missing}"
PY
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q "$work"/dist/runner-*.whl
cd "$work"
venv/bin/python - <<PY
import runner, pathlib
assert pathlib.Path(runner.__file__).is_relative_to("$work/venv"), runner.__file__
from runner.preflight import CONF_DIR, preflight
assert CONF_DIR == pathlib.Path(runner.__file__).parent / "conf", CONF_DIR
assert len(preflight(["-m", "precision=fp32,fp16"])) == 2  # a sweep composes from the configs the wheel carries
PY
venv/bin/runner --help > help.txt && grep -q "runner table" help.txt
venv/bin/runner backend=onnxruntime bench=quick data.limit=2 outputs=out
venv/bin/runner table --tracking-uri sqlite:///out/mlflow.db --out out/report
test -s out/report/table.png
echo "install-check: the wheel installed into a fresh virtual environment and ran a variant outside the checkout"
