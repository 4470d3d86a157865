#!/usr/bin/env bash
# Two Ray nodes on one host with two GPUs, each given one GPU and a working folder of its own, and a sweep that
# spreads over both: `bash scripts/ray-two-nodes.sh [runner overrides]` from the checkout (needs the ray extra:
# pip install -e '.[ray]'). The sweep is launched from a third folder and logs to a loopback mlflow server;
# the proof printed at the end is each result's node folder and GPU UUID, read back from the launching
# folder's records. Everything lands in OUT (default outputs/ray-two-nodes); every process started here is
# stopped on exit.
set -euo pipefail
if [ -z "${RAY_TWO_NODES_NETNS:-}" ] && unshare --net true 2>/dev/null; then  # loopback only, where permitted
  exec unshare --net env RAY_TWO_NODES_NETNS=1 bash -c 'ip link set lo up && exec bash "$0" "$@"' "$0" "$@"
fi
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
RAY=${RAY:-$(dirname "$PY")/ray}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
OUT=$(realpath -m "${OUT:-outputs/ray-two-nodes}")
SWEEP=${*:-precision=fp16,fp32 export=ultralytics,torch shape=static,dynamic backend.builder_optimization_level=0}
PORT=${PORT:-6390}
MLFLOW_PORT=${MLFLOW_PORT:-5391}
rm -rf "$OUT"
mkdir -p "$OUT"/{head,worker,launching,mlflow}
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 5
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
export RAY_USAGE_STATS_ENABLED=0

node() {  # node FOLDER GPU ARGS...: a Ray node in its own session, cwd, HOME and temp dir, seeing one GPU
  local folder=$OUT/$1 gpu=$2
  shift 2
  mkdir -p "$folder/home"
  (cd "$folder" && CUDA_VISIBLE_DEVICES=$gpu HOME=$folder/home \
    setsid "$RAY" start --block --num-gpus=1 --num-cpus="${CPUS_PER_NODE:-8}" --node-ip-address=127.0.0.1 \
    --temp-dir="$folder/tmp" "$@" >"$folder/ray.log" 2>&1) &
  PIDS+=($!)
}

node head 0 --head --port="$PORT" --include-dashboard=false
sleep 15
node worker 1 --address="127.0.0.1:$PORT"
(cd "$OUT/mlflow" && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PY" -m mlflow server --host 127.0.0.1 \
  --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "sqlite:///$OUT/mlflow/store.db" \
  --artifacts-destination "$OUT/mlflow/artifacts" >"$OUT/mlflow/server.log" 2>&1) &
PIDS+=($!)
for _ in $(seq 60); do
  nodes=$(RAY_ADDRESS=127.0.0.1:$PORT "$PY" -c "import ray; ray.init(log_to_driver=False); \
print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
  [ "$nodes" = 2 ] && curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && break
  sleep 2
done
echo "ray-two-nodes: $nodes Ray nodes up; sweep: $SWEEP"

start=$(date +%s)
# shellcheck disable=SC2086
(cd "$OUT/launching" && RAY_ADDRESS=127.0.0.1:$PORT "$PY" -m runner -m $SWEEP \
  hydra/launcher=ray hydra.launcher.ray.init.address=auto hydra.launcher.ray.remote.num_gpus=1 \
  tracking=server "tracking.uri=http://127.0.0.1:$MLFLOW_PORT" outputs=outputs) | tee "$OUT/sweep.log"
echo "ray-two-nodes: wall $(( $(date +%s) - start )) s"

"$PY" - "$OUT" <<'EOF'
import collections, sys
from pathlib import Path
from runner.sweep import job_records

out = Path(sys.argv[1])
(sweep,) = (out / "launching" / "outputs" / "sweeps").iterdir()
records = job_records(sweep)
per_node = collections.Counter()
for r in records:
    folder = Path(r.ran_in.split(":", 1)[1])
    node = next((n for n in ("head", "worker") if folder.is_relative_to(out / n)), "elsewhere")
    per_node[node, r.result.environment.get("gpu.uuid", "-")] += 1
    print(f"{r.result.name:45} {r.result.status:8} node={node:7} gpu={r.result.environment.get('gpu.uuid', '-')}")
print(f"ray-two-nodes: {len(records)} results in {sweep}; per (node, GPU): {dict(per_node)}")
EOF
