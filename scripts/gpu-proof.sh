#!/usr/bin/env bash
# The TensorRT proof sweeps, one step per command (each fits a 10-minute slot on a warm machine that
# keeps the caches under $CACHE between steps). Results land in $DEST/<step>/{results.json,summary.csv,run.log}.
#   bash scripts/gpu-proof.sh matrix   # export x shape x precision, builder_optimization_level=0
#   bash scripts/gpu-proof.sh rerun    # the same sweep again: warm engine/timing/ONNX caches
#   bash scripts/gpu-proof.sh seed     # the user's table: ONNX shape x engine shape x precision, seed profile
#   bash scripts/gpu-proof.sh level3   # static fp32/fp16 at the default level, CUDA graph off/on
#   bash scripts/gpu-proof.sh tf32     # static fp32 at the default level with TensorRT's TF32 default kept
set -euo pipefail
step=${1:?step: matrix|rerun|seed|level3|tf32}
CACHE=${CACHE:-/tmp/runner-cache}
DEST=${DEST:-outputs/gpu-proof}
common=(backend=tensorrt cache_dir=$CACHE outputs=/tmp/runner-out tracking.enabled=${TRACKING:-false})
case $step in
  matrix|rerun) args=(-m export=ultralytics,torch shape=static,dynamic precision=fp32,fp16
                      backend.builder_optimization_level=0) ;;
  seed)   args=(-m export=ultralytics,torch export.shape=static,dynamic shape=static,dynamic
                precision=fp32,fp16 profile=seed backend.builder_optimization_level=0) ;;
  level3) args=(-m export=ultralytics shape=static precision=fp32,fp16 bench.cuda_graph=false,true) ;;
  tf32)   args=(-m export=ultralytics shape=static precision=fp32 backend.tf32=true bench.cuda_graph=false,true) ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
mkdir -p "$DEST/$step"
PYTHONUNBUFFERED=1 python3 -m runner "${args[@]}" "${common[@]}" "${@:2}" 2>&1 | tee "$DEST/$step/run.log"
sweep=$(ls -td /tmp/runner-out/sweeps/*/ | head -1)
cp "$sweep/results.json" "$sweep/summary.csv" "$DEST/$step/"
