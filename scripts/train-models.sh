#!/usr/bin/env bash
# Train the shipped models on the GPU machine: one architecture per GPU (round robin over GPUS), all in parallel
# (runner.train), each on its own copy of the generated data. Leaves <arch>.pt, <arch>.json (figures),
# <arch>.csv (per epoch) and <arch>.log in $DEST. A run cut by TIMEOUT continues where it stopped with RESUME=1;
# HOURS fits the epochs to a time budget for the whole training instead of EPOCHS; INIT starts the layers that
# match from other weights (rtdetr-n from the yolov8n preset's backbone).
#   DEST=$OUT EPOCHS=30 bash scripts/train-models.sh yolo11n yolo26n yolov10n yolov5nu
#   DEST=$OUT HOURS=0.14 INIT=runner/assets/yolov8n.pt bash scripts/train-models.sh rtdetr-n
set -euo pipefail
DEST=${DEST:?where the weights and figures go}
EPOCHS=${EPOCHS:-100}
export YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
read -r -a gpus <<< "${GPUS:-$(seq -s ' ' 0 $(( $(nvidia-smi -L | wc -l) - 1 )))}"
workers=${WORKERS:-$(( $(nproc) / $# ))}
extra=()
[[ -n ${HOURS:-} ]] && extra+=(--hours "$HOURS")
[[ -n ${RESUME:-} ]] && extra+=(--resume)
[[ -n ${INIT:-} ]] && extra+=(--init "$INIT")
mkdir -p "$DEST"
i=0
for arch in "$@"; do
  CUDA_VISIBLE_DEVICES=${gpus[$((i % ${#gpus[@]}))]} timeout "${TIMEOUT:-560}" python3 -m runner.train --arch "$arch" \
    --device 0 --epochs "$EPOCHS" --workers "$workers" --data-root "/tmp/runner-train/$arch" --out "$DEST/$arch.pt" \
    --summary "$DEST/$arch.json" "${extra[@]}" >> "$DEST/$arch.log" 2>&1 &
  i=$((i + 1))
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for arch in "$@"; do grep -a "held-out split" "$DEST/$arch.log" || echo "$arch: no result (see $arch.log)"; done
exit $status
