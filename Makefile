# runner: the YOLO/TensorRT experiment-matrix runner. `make` lists the targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CI_OUT := outputs/ci
# an export cache `make test` and `make test-slow` share (CI sets it per checkout; never reuse it across changes)
TEST_CACHE ?=
TEST_OPTS = $(if $(TEST_CACHE),--export-cache=$(TEST_CACHE))

.DEFAULT_GOAL := help
.PHONY: help setup run test test-slow test-cluster test-gpu table check cpu-gate gate-check int8-ort install-check ui clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: ## Create .venv and install runner with its test tools (TensorRT: pip install -e '.[gpu]')
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[dev]"

run: ## The default sweep: export x precision x shape, 12 variants, logged to outputs/mlflow.db
	$(BIN)/python -m runner -m export=ultralytics,torch,dynamo precision=fp32,fp16 shape=static,dynamic

test: ## The test suite less its slow tests (GPU tests skip with the reason when TensorRT or a GPU is absent)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m "not slow and not cluster" $(TEST_OPTS)

test-slow: ## The slow tests (the user's 12-variant sweep, left in outputs/ci for gate-check; kill, resume, restart)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m "slow and not cluster" --sweep-outputs=$(CI_OUT) $(TEST_OPTS)

test-cluster: ## The cluster tests: a one-host SLURM and PostgreSQL they start (apt-get as root), two Ray nodes (the ray extra)
	$(BIN)/pip install -q -e ".[ray]"
	$(BIN)/python -m pytest -q -m cluster --durations=0 tests/test_cluster.py
	if unshare --net true 2>/dev/null; then \
		unshare --net sh -c 'ip link set lo up && $(BIN)/python -m pytest -q -m cluster --durations=0 tests/test_ray_cluster.py'; \
	else $(BIN)/python -m pytest -q -m cluster tests/test_ray_cluster.py; fi  # outside a loopback-only namespace it skips

test-gpu: ## Only the GPU tests (TensorRT and a CUDA GPU needed)
	$(BIN)/python -m pytest -q -m gpu

table: ## Compatibility table, detail table and latency chart of the latest sweep
	$(BIN)/runner table --sweep latest

check: ## Check the latest sweep against BASELINE (default: the committed GPU baseline)
	$(BIN)/runner check --sweep latest --baseline $(or $(BASELINE),results/baseline-gpu.json)

cpu-gate: ## CPU regression gate: the user's 12-variant sweep (bench=quick data.limit=4), then gate-check
	rm -rf $(CI_OUT)
	$(BIN)/python -m runner -m export=ultralytics,torch,dynamo precision=fp32,fp16 shape=static,dynamic \
		bench=quick data.limit=4 outputs=$(CI_OUT)
	$(MAKE) gate-check

gate-check: ## Check the sweep in outputs/ci (from cpu-gate or test-slow) on statuses and validation only
	$(BIN)/runner check --no-timing --sweep latest --tracking-uri sqlite:///$(CI_OUT)/mlflow.db \
		--baseline results/baseline-cpu.json --summary $(CI_OUT)/check.md

int8-ort: ## int8 Q/DQ on the CPU (onnxruntime), yolov8n 640, whole held-out split: placement before/after x calibrator
	PY=$(BIN)/python bash scripts/int8-ort.sh

install-check: ## Build the wheel, install it into a fresh virtual environment outside the checkout, run from there
	PY=$(PY) bash scripts/install-check.sh

ui: ## MLflow UI on the embedded store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db --port 5000

clean: ## Remove outputs/ (runs, caches, the MLflow store)
	rm -rf outputs
