#!/usr/bin/env bash
# int8 Q/DQ on the CPU with onnxruntime (the accuracy proxy where no GPU is at hand): yolov8n, 640, the whole
# held-out split (64 images), each calibrator, before (Conv inputs only, no pins) and after (Conv, residual Add and
# Concat inputs; the head's last convs and the DFL in float). The sweeps' results.json go to results/int8-ort/, and
# the table of mAP50-95 drops against the fp32 reference to results/int8-ort/table.md.
#   bash scripts/int8-ort.sh            (make int8-ort; OUT=outputs/int8-ort)
set -euo pipefail
OUT=${OUT:-outputs/int8-ort}
DEST=results/int8-ort
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST"
common=(backend=onnxruntime precision=int8_qdq data.limit=64 bench=quick 'bench.offline_batches=[]' "outputs=$OUT")
before=('precision.qdq_ops=[Conv]' 'precision.keep_float=[]')
run() {  # name, then overrides
  local name=$1; shift
  "$PY" -m runner -m "${common[@]}" "$@" 2>&1 | tee "$DEST/$name.log"
  cp "$(ls -td "$OUT"/sweeps/*/ | head -1)results.json" "$DEST/$name.json"
}
run before-minmax-percentile precision.calibrator=minmax,percentile "${before[@]}"
run after-minmax-percentile precision.calibrator=minmax,percentile
run before-entropy2 precision.calibrator=entropy2 "${before[@]}"  # a 2048-bin KL search per tensor: minutes
run after-entropy2 precision.calibrator=entropy2
"$PY" scripts/int8-ort-table.py "$DEST"/{before,after}-*.json | tee "$DEST/table.md"
