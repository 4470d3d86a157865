#!/usr/bin/env bash
# The project as a user installs it: build the wheel, install it with its dependencies into a fresh virtual
# environment outside the checkout, and from there run --help, one onnxruntime variant and the table.
set -euo pipefail
PY=${PY:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"  # build from a copy of the tracked files: setuptools leaves build/ where it builds
git -C "$repo" ls-files -z | (cd "$repo" && tar --null -T - -cf -) | tar -xf - -C "$work/src"
"$PY" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q "$work"/dist/runner-*.whl
cd "$work"
venv/bin/python - <<PY
import runner, pathlib
assert pathlib.Path(runner.__file__).is_relative_to("$work/venv"), runner.__file__
PY
venv/bin/runner --help > help.txt && grep -q "runner table" help.txt
venv/bin/runner backend=onnxruntime bench=quick data.limit=2 outputs=out
venv/bin/runner table --tracking-uri sqlite:///out/mlflow.db --out out/report
test -s out/report/table.png
echo "install-check: the wheel installed into a fresh virtual environment and ran a variant outside the checkout"
