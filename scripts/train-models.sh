#!/usr/bin/env bash
# Train the shipped models on the GPU machine: one architecture per GPU, all in parallel (runner.train, 100
# epochs), each on its own copy of the generated data. Leaves <arch>.pt, <arch>.json (figures), <arch>.csv
# (per epoch) and <arch>.log in $DEST.
#   DEST=$OUT bash scripts/train-models.sh yolo11n yolo26n yolov10n yolov5nu
set -euo pipefail
DEST=${DEST:?where the weights and figures go}
EPOCHS=${EPOCHS:-100}
export YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
gpus=$(nvidia-smi -L | wc -l)
workers=$(( $(nproc) / $# ))
mkdir -p "$DEST"
i=0
for arch in "$@"; do
  CUDA_VISIBLE_DEVICES=$((i % gpus)) timeout 560 python3 -m runner.train --arch "$arch" --device 0 \
    --epochs "$EPOCHS" --workers "$workers" --data-root "/tmp/runner-train/$arch" --out "$DEST/$arch.pt" \
    --summary "$DEST/$arch.json" > "$DEST/$arch.log" 2>&1 &
  i=$((i + 1))
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for arch in "$@"; do grep -a "held-out split" "$DEST/$arch.log" || echo "$arch: no result (see $arch.log)"; done
exit $status
