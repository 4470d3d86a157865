#!/usr/bin/env bash
# The TensorRT proof sweeps, one step per command: each fits a 10-minute slot on a warm machine that keeps
# $CACHE and $RUNS (engine/ONNX/timing caches, the MLflow store) between steps. MLflow is on, as users run it.
# Each step leaves $DEST/<step>/{run.log,results.json,summary.csv,sweep_id}, and the timing cache as it grew in
# $DEST/timing-cache (for scripts/timing-cache). TIMEOUT=<s> stops a sweep step
# after that many seconds (SIGTERM); the same step with resume=latest finishes it.
#   bash scripts/gpu-proof.sh tests         # the GPU tests (pytest -m gpu)
#   bash scripts/gpu-proof.sh seed          # the notes' table: ultralytics/torch export x ONNX shape x engine shape
#                                           #   x precision under the seed profile, TensorRT API, level 0
#   bash scripts/gpu-proof.sh seed-dynamo   # the same for export=dynamo
#   bash scripts/gpu-proof.sh seed-engine   # build=ultralytics: model.export(format="engine") x shape x precision
#   bash scripts/gpu-proof.sh seed-table    # the three seed sweeps as one table, rendered from the MLflow store
#   bash scripts/gpu-proof.sh matrix        # export x shape x precision, level 0
#   bash scripts/gpu-proof.sh level3        # static fp32/fp16 at the default level, CUDA graph off/on
#   bash scripts/gpu-proof.sh scale-1       # the matrix under hydra/launcher=joblib on GPU 0 only, cold caches
#   bash scripts/gpu-proof.sh scale-all     # the same on every GPU of the host, one variant per GPU, cold caches
#   bash scripts/gpu-proof.sh scale-table   # both as one table from the MLflow store, and their wall times
#   bash scripts/gpu-proof.sh models        # the six model presets x shape x precision, level 0, every GPU
#   bash scripts/gpu-proof.sh models-e2e    # yolo26n and yolov10n exported end to end (one-to-one head), likewise
#   bash scripts/gpu-proof.sh models-table  # the models sweep (and models-e2e, where it ran) as one table from the
#                                           #   MLflow store, a grid per model
#   bash scripts/gpu-proof.sh fast          # yolov8n fp16 static/dynamic (batch 1..64) with the defaults, beside the
#                                           #   peer (backend=ultralytics): single-stream, offline up to batch 64,
#                                           #   server at 1000 img/s; then runner table and runner pick of the sweep
#   bash scripts/gpu-proof.sh fast3         # the same at builder level 3 with backend.half_input=false,true, offline
#                                           #   batches overlapped (the GPU letterbox's default); table and pick
#   bash scripts/gpu-proof.sh overlap       # fast3's dynamic fp16 engine, offline batches overlapped or one at a time
#   bash scripts/gpu-proof.sh batch4        # yolov8n static at batch 4: exported, validated and timed at [4,3,640,640]
#   bash scripts/gpu-proof.sh pipeline      # yolov8n fp16 static, default level: runner's pipeline with pre/post on
#                                           #   cpu|gpu in a CUDA graph, beside the peer (backend=ultralytics),
#                                           #   on the held-out set, then on bus.jpg; a table and chart for each
#   bash scripts/gpu-proof.sh nms           # export.head=nms (NMS in the graph) x shape x precision x build tool,
#                                           #   level 0
#   bash scripts/gpu-proof.sh int8-static   # fp32, fp16, int8 calibrator and int8 Q/DQ, static, level 0, on the
#   bash scripts/gpu-proof.sh int8-dynamic  #   whole held-out split; likewise dynamic
#   bash scripts/gpu-proof.sh int8-table    # both as one table from the MLflow store
#   bash scripts/gpu-proof.sh int8-layers   # yolov8n fp16, int8 calibrator, int8 Q/DQ and the Q/DQ placement before, dynamic
#                                           #   to batch 32, level 1, the whole held-out split, offline batches 1/8/32
#   bash scripts/gpu-proof.sh int8-report   # its table, and the layers of fp16 against each int8 side by side
#   bash scripts/gpu-proof.sh int8-fuse     # fp16, int8 Q/DQ (shared Concat scales), Q/DQ with each Concat's own
#                                           #   scales, and with the Adds' convolution inputs in float (presets in
#                                           #   scripts/presets), as int8-layers at level $LEVEL (1); its table, and the
#                                           #   layers of own against shared scales, and of fp16 against int8 Q/DQ
#   bash scripts/gpu-proof.sh l3-dynamic    # yolov8n fp16 and int8 Q/DQ, dynamic to batch 64 (opt 32), at level $LEVEL (3),
#                                           #   beside the peer; offline batches 1/8/32/64; table, layers, pick
#   bash scripts/gpu-proof.sh l3-static     # yolov8n fp16 static at level $LEVEL (3) beside the peer, one variant at a
#                                           #   time: single-stream at batch 1; table and pick
#   bash scripts/gpu-proof.sh levels        # yolov8n fp16 static with the defaults at builder levels 3, 4 and 5, each
#                                           #   beside the peer: single-stream at batch 1; table and pick
#   bash scripts/gpu-proof.sh warmup        # yolov8n fp16 static with the defaults beside the peer, the chain loop's
#                                           #   warm-up and timed seconds off or on (runs counted only, as before);
#                                           #   table and pick
#   bash scripts/gpu-proof.sh fold-static   # yolov8n fp16 static at level $LEVEL (3) beside the peer, the Split->Concat
#                                           #   fold off/on x float/fp16 input, one variant per GPU; table, layers, pick
#   bash scripts/gpu-proof.sh fold-dynamic  # yolov8n fp16 and int8 Q/DQ, dynamic to batch 64 (opt 32), level $LEVEL (3),
#                                           #   folded; offline batches 1/32/64 at 4096 images each; table, layers
#   bash scripts/gpu-proof.sh int8-b32      # fold-dynamic's two engines with each layer profiled at batch 32, where
#                                           #   int8's gain should show; table, layers fp16 against int8
#   bash scripts/gpu-proof.sh int8-ranges   # as int8-b32, with TensorRT's implicit INT8 from onnxruntime's percentile
#                                           #   ranges (int8_calibrator, calibrator=percentile, shared Concat ranges)
#   bash scripts/gpu-proof.sh maps-static   # yolov8n fp16 static at level $LEVEL (3), the engine ending at the head's
#                                           #   maps against the whole head, each beside the peer; table, layers, pick
#   bash scripts/gpu-proof.sh maps-dynamic  # as int8-ranges with the int8 preset, head maps off/on; table, layers
#   bash scripts/gpu-proof.sh int8-pins     # yolov8n fp16, then int8 from onnxruntime's ranges with no layer, the
#                                           #   convolutions, and the convolutions, Adds and Concats pinned in int8
#                                           #   (precision.pin_int8), dynamic to batch 64 (opt 32), level $LEVEL (3),
#                                           #   offline batch 32 and layers profiled there; table, layers side by side
#   bash scripts/gpu-proof.sh int8-head     # yolov8n fp16 and int8 with the convolutions pinned, the head's last ones
#                                           #   in int8 with an fp16 output too, and that with the stem and first C2f in
#                                           #   fp16 (presets in scripts/presets), as int8-pins; the sweep on every GPU,
#                                           #   then again on GPU 0 alone from the engine cache (one GPU, one variant at a
#                                           #   time: the figures to compare); table, fp16 and each int8 preset swept
#                                           #   side by side.
#                                           #   LEVEL=5 PRECISIONS=fp16,int8,int8_pins_conv: those at level 5;
#                                           #   SHAPE=static: engines fixed at batch 32; PRECISIONS=fp16,
#                                           #   int8_pins_conv_m0_fp16,int8_pins_conv_m0_fp16_cal64,
#                                           #   int8_pins_m0_head1_conv_out: 64 calibration images, and a pin TensorRT
#                                           #   ignores (the cell is △, the pins named); the int8 presets take an
#                                           #   int8 input (backend.int8_input=auto), an fp16 one given
#                                           #   backend.int8_input=false
#   bash scripts/gpu-proof.sh sensitivity   # runner sensitivity on $MODEL (yolov8n) from everything quantized, by
#                                           #   $GROUP (node), each greedy and pruning step timed on TensorRT (--latency),
#                                           #   level 1; MODEL=yolo11n GROUP=block: the second family, by block
#   bash scripts/gpu-proof.sh console       # static/dynamic x fp32/fp16, level 0: what a sweep prints on the console
set -euo pipefail
step=${1:?step: tests|console|seed|seed-dynamo|seed-engine|seed-table|matrix|level3|scale-1|scale-all|scale-table|models|models-e2e|models-table|fast|fast3|overlap|batch4|pipeline|nms|int8-static|int8-dynamic|int8-table|int8-layers|int8-report|int8-fuse|l3-dynamic|l3-static|levels|warmup|fold-static|fold-dynamic|int8-b32|int8-ranges|maps-static|maps-dynamic|int8-pins|int8-head|sensitivity}
CACHE=${CACHE:-/tmp/runner-cache}
RUNS=${RUNS:-/tmp/runner-out}
DEST=${DEST:-outputs/gpu-proof}
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
case $step in scale-1|scale-all) CACHE=$CACHE/$step ;; esac  # each starts cold: no engine or timing cache
case $step in scale-1|scale-all) ;; *)  # the others start from the leases' timing cache: builds in seconds, not minutes
  mkdir -p "$CACHE/timing" && cp -n scripts/timing-cache/* "$CACHE/timing/" ;; esac
common=(backend=tensorrt cache_dir=$CACHE outputs=$RUNS)
scale=(-m precision=fp16,fp32 export=ultralytics,torch shape=static,dynamic backend.builder_optimization_level=0
       hydra/launcher=joblib)
gpu_count() { nvidia-smi -L | wc -l; }
every_gpu=(backend.builder_optimization_level=0 hydra/launcher=joblib backend.gpus=auto)  # + n_jobs=$(gpu_count)
LAYERS=results/gpu/2026-11-30-h200x2-trt8.6.0-int8-layers  # its precision/ holds the placement before, for comparison
batch32=(shape=dynamic 'profile.min=[1,3,640,640]' 'profile.opt=[32,3,640,640]' 'profile.max=[32,3,640,640]'
         'bench.offline_batches=[1,8,32]' data.limit=64 hydra/launcher=joblib backend.gpus=auto)  # default level
seed=(profile=seed shape=static,dynamic precision=fp32,fp16 backend.builder_optimization_level=0)
batch32_layers() {  # yolov8n with the given overrides, dynamic to batch 64 (opt 32) or, with SHAPE=static, fixed at
  # batch 32; offline batch 32 and each layer profiled there, level $LEVEL (3), one variant per GPU ($GPUS: auto,
  # $JOBS: every GPU)
  local shape=(shape=dynamic 'profile.min=[1,3,640,640]' 'profile.opt=[32,3,640,640]' 'profile.max=[64,3,640,640]')
  [[ ${SHAPE:-dynamic} == static ]] && shape=(shape=static 'shape.opt=[32,3,640,640]' bench.batch=32)
  args=(-m model=yolov8n "$@" "${shape[@]}"
        'bench.offline_batches=[32]' bench.offline_images=4096 bench.layers_batch=32 data.limit=64
        "backend.builder_optimization_level=${LEVEL:-3}" hydra/launcher=joblib "backend.gpus=${GPUS:-auto}"
        "hydra.launcher.n_jobs=${JOBS:-$(gpu_count)}")
}
int8_input_label() {  # the int8 presets' input in their labels: int8 (auto) unless the arguments turn it off
  if [[ " $* " == *" backend.int8_input=false "* ]]; then echo fp16-in; else echo int8-in; fi
}
side_by_side() {  # each "A:B:name" argument's layers side by side in $DEST/$step/<name>, over the sweeps in $sweeps
  local pair a b name
  for pair in "$@"; do
    IFS=: read -r a b name <<< "$pair"
    python3 -m runner layers --tracking-uri "sqlite:///$RUNS/mlflow.db" "${sweeps[@]}" "$a" "$b" \
      --out "$DEST/$step/$name" 2>&1 | tee -a "$DEST/$step/run.log" \
      || echo "layers $a against $b: exit $?" | tee -a "$DEST/$step/run.log"
  done
}
mkdir -p "$DEST/$step"
case $step in
  tests)
    python3 -c "import datetime, json; from runner.environment import environment
print(json.dumps({'date': datetime.date.today().isoformat(), **environment(17)}, indent=1))" > "$DEST/environment.json"
    python3 -m pytest -q -s -m gpu tests/test_trt_gpu.py tests/test_gpu_pipeline.py tests/test_heads.py 2>&1 | tee "$DEST/$step/run.log"
    exit "${PIPESTATUS[0]}" ;;
  fast|fast3)
    DEST=$DEST/$step bash "$0" "$step-sweep" "${@:2}" || exit
    id=$(cat "$DEST/$step/$step-sweep/sweep_id")
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" --sweep "$id" --out "$DEST/$step/table" \
      2>&1 | tee "$DEST/$step/table.log"
    python3 -m runner pick --tracking-uri "sqlite:///$RUNS/mlflow.db" --sweep "$id" --max-e2e-ms 1.0 \
      --max-map-drop 0.01 --out "$DEST/$step/pick" 2>&1 | tee "$DEST/$step/pick.log" || (( $? == 1 ))  # 1: none qualifies
    exit 0 ;;
  pipeline)
    for data in shapes bus; do
      DEST=$DEST/$step bash "$0" "pipeline-$data" "${@:2}" || exit
      python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" \
        --sweep "$(cat "$DEST/$step/pipeline-$data/sweep_id")" --out "$DEST/$step/pipeline-$data/table" \
        >> "$DEST/$step/pipeline-$data/run.log" 2>&1
    done
    exit 0 ;;
  seed-table)
    sweeps=()
    for s in seed seed-dynamo seed-engine; do sweeps+=(--sweep "$(cat "$DEST/$s/sweep_id")"); done
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" "${sweeps[@]}" --out "$DEST/$step" \
      2>&1 | tee "$DEST/$step/run.log"
    exit "${PIPESTATUS[0]}" ;;
  scale-table)
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" --sweep "$(cat "$DEST/scale-1/sweep_id")" \
      --out "$DEST/$step/1-gpu" > "$DEST/$step/run.log" 2>&1
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" --sweep "$(cat "$DEST/scale-all/sweep_id")" \
      --out "$DEST/$step/all-gpus" 2>&1 | tee -a "$DEST/$step/run.log"
    python3 scripts/scale-summary.py "$DEST" "sqlite:///$RUNS/mlflow.db" | tee "$DEST/$step/scale.json"
    exit "${PIPESTATUS[0]}" ;;
  int8-report)  # the table of int8-layers, and its variants' layers side by side
    id=$(cat "$DEST/int8-layers/sweep_id") uri=sqlite:///$RUNS/mlflow.db
    python3 -m runner table --tracking-uri "$uri" --sweep "$id" --out "$DEST/$step/table" 2>&1 | tee "$DEST/$step/run.log"
    for pair in "trt dy fp16|qdq percentile" "trt dy fp16|int8 entropy2" "ops Conv|qdq percentile"; do
      out=$DEST/$step/$(echo "${pair%|*}-vs-${pair#*|}" | tr ' ' '-')
      python3 -m runner layers --tracking-uri "$uri" --sweep "$id" "${pair%|*}" "${pair#*|}" --out "$out" 2>&1 \
        | tee -a "$DEST/$step/run.log"
    done
    exit 0 ;;
  int8-fuse)  # cells: "qdq percentile |" is int8_qdq's alone, "concat own" the placement before
    DEST=$DEST/$step bash "$0" int8-fuse-sweep "${@:2}" || exit
    id=$(cat "$DEST/$step/int8-fuse-sweep/sweep_id") uri=sqlite:///$RUNS/mlflow.db
    python3 -m runner table --tracking-uri "$uri" --sweep "$id" --out "$DEST/$step/table" 2>&1 | tee "$DEST/$step/run.log"
    for pair in "concat own:qdq percentile |:own-vs-shared" "trt dy fp16:qdq percentile |:fp16-vs-qdq"; do
      IFS=: read -r a b name <<< "$pair"
      python3 -m runner layers --tracking-uri "$uri" --sweep "$id" "$a" "$b" --out "$DEST/$step/$name" 2>&1 \
        | tee -a "$DEST/$step/run.log"
    done
    exit 0 ;;
  l3-dynamic|l3-static|levels|warmup|fold-static|fold-dynamic|int8-b32|int8-ranges|maps-static|maps-dynamic)
    DEST=$DEST/$step bash "$0" "$step-sweep" "${@:2}" || exit
    id=$(cat "$DEST/$step/$step-sweep/sweep_id") uri=sqlite:///$RUNS/mlflow.db
    python3 -m runner table --tracking-uri "$uri" --sweep "$id" --out "$DEST/$step/table" 2>&1 | tee "$DEST/$step/run.log"
    case $step in
      l3-dynamic|fold-dynamic|int8-b32) pairs=("fp16 gpu-pre:int8 gpu-pre:fp16-vs-qdq") ;;
      int8-ranges) pairs=("fp16 gpu-pre:int8 percentile:fp16-vs-ranges") ;;
      fold-static) pairs=("fp16 gpu-pre gpu-post backend.fold_split_concat=false:fp16 gpu-pre gpu-post backend.fold_split_concat=true:fold") ;;
      maps-static) pairs=("trt st fp16 gpu-pre:trt st fp16 head-maps:maps") ;;
      maps-dynamic) pairs=("trt dy fp16 gpu-pre:trt dy fp16 head-maps:fp16-maps" "trt dy int8 percentile concat shared gpu-pre:trt dy int8 percentile concat shared head-maps:int8-maps" "trt dy fp16 head-maps:trt dy int8 percentile concat shared head-maps:fp16-vs-int8-maps") ;;
      *) pairs=() ;;
    esac
    sweeps=(--sweep "$id")
    side_by_side "${pairs[@]}"
    python3 -m runner pick --tracking-uri "$uri" --sweep "$id" --max-e2e-ms 1.0 --max-map-drop 0.01 \
      --out "$DEST/$step/pick" 2>&1 | tee -a "$DEST/$step/run.log" || (( $? == 1 ))  # 1: none qualifies
    exit 0 ;;
  int8-pins)  # two sweeps, so no fp16 row is made for each int8 pin list
    for sweep in int8-pins-fp16 int8-pins-int8; do DEST=$DEST/$step bash "$0" "$sweep" "${@:2}" || exit; done
    sweeps=(--sweep "$(cat "$DEST/$step/int8-pins-fp16/sweep_id")"
            --sweep "$(cat "$DEST/$step/int8-pins-int8/sweep_id")")
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" "${sweeps[@]}" --out "$DEST/$step/table" 2>&1 \
      | tee "$DEST/$step/run.log"
    input=$(int8_input_label "${@:2}")
    side_by_side "dy fp16:shared $input:fp16-vs-int8" "shared $input:int8 pins 1:int8-vs-pins-conv" \
                 "dy fp16:int8 pins 1:fp16-vs-pins-conv" "dy fp16:int8 pins 3:fp16-vs-pins-flow"
    exit 0 ;;
  int8-head)  # built on every GPU, then (on a host of several) timed on GPU 0 alone, one variant after another, from
    #   the engine cache
    DEST=$DEST/$step bash "$0" int8-head-sweep "${@:2}" || exit
    mv "$DEST/$step/int8-head-sweep" "$DEST/$step/every-gpu"
    timed=every-gpu
    if (( $(gpu_count) > 1 )); then
      GPUS="[0]" JOBS=1 DEST=$DEST/$step bash "$0" int8-head-sweep "${@:2}" || exit
      mv "$DEST/$step/int8-head-sweep" "$DEST/$step/gpu0" && timed=gpu0
    fi
    sweeps=(--sweep "$(cat "$DEST/$step/$timed/sweep_id")")
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" "${sweeps[@]}" --out "$DEST/$step/table" 2>&1 \
      | tee "$DEST/$step/run.log"
    input=$(int8_input_label "${@:2}")  # a piece of each preset's label, and no other's
    declare -A cell=([int8]="concat shared $input" [int8_pins_conv]="percentile concat shared int8 pins 1 $input"
                     [int8_pins_head]="percentile concat shared int8 pins 1 int8 float-out"
                     [int8_pins_head_stem_fp16]="keep 4 concat shared int8 pins 1 int8 float-out"
                     [int8_pins_conv_m0_fp16]="keep 4 concat shared int8 pins 1 $input"
                     [int8_pins_m0_head1_conv_out]="keep 4 concat shared int8 pins 1 int8 float-out 2"
                     [int8_pins_conv_m0_fp16_cal64]="keep 4 concat shared cal 64 int8 pins 1 $input")
    declare -A name=([int8]=int8 [int8_pins_conv]=pins-conv [int8_pins_head]=head
                     [int8_pins_head_stem_fp16]=head-stem-fp16 [int8_pins_conv_m0_fp16]=m0-fp16
                     [int8_pins_m0_head1_conv_out]=head1-conv-out [int8_pins_conv_m0_fp16_cal64]=m0-fp16-cal64)
    shape=$([[ ${SHAPE:-dynamic} == static ]] && echo st || echo dy)
    list=${PRECISIONS:-fp16,int8_pins_conv,int8_pins_head,int8_pins_head_stem_fp16}
    IFS=, read -ra swept <<< "$list"
    pairs=()  # fp16 against each int8 preset swept, and each preset against the one it builds on
    for preset in "${swept[@]}"; do
      [[ -n ${cell[$preset]:-} ]] && pairs+=("$shape fp16:${cell[$preset]}:fp16-vs-${name[$preset]}")
    done
    declare -A base=([int8_pins_head]=int8_pins_conv [int8_pins_conv_m0_fp16]=int8_pins_conv
                     [int8_pins_m0_head1_conv_out]=int8_pins_conv_m0_fp16
                     [int8_pins_conv_m0_fp16_cal64]=int8_pins_conv_m0_fp16)
    for preset in "${!base[@]}"; do
      if [[ ,$list, == *,${base[$preset]},* && ,$list, == *,$preset,* ]]; then
        pairs+=("${cell[${base[$preset]}]}:${cell[$preset]}:${name[${base[$preset]}]}-vs-${name[$preset]}")
      fi
    done
    side_by_side "${pairs[@]}"
    exit 0 ;;
  sensitivity)
    ${TIMEOUT:+timeout "$TIMEOUT"} python3 -m runner sensitivity "model=${MODEL:-yolov8n}" 'precision.keep_float=[]' \
      --group "${GROUP:-node}" backend.builder_optimization_level=1 cache_dir="$CACHE" outputs="$RUNS" --latency \
      --out "$DEST/$step/${MODEL:-yolov8n}" 2>&1 | tee "$DEST/$step/run.log"
    exit "${PIPESTATUS[0]}" ;;
  int8-table)
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" --sweep "$(cat "$DEST/int8-static/sweep_id")" \
      --sweep "$(cat "$DEST/int8-dynamic/sweep_id")" --out "$DEST/$step" 2>&1 | tee "$DEST/$step/run.log"
    exit "${PIPESTATUS[0]}" ;;
  int8-static|int8-dynamic)  # the host pipeline results/baseline-gpu.json was recorded with, so its cells match
    args=(-m precision=fp32,fp16,int8_calibrator,int8_qdq "shape=${step#int8-}" backend.builder_optimization_level=0
          data.limit=64 bench.warmup=20 bench.iters=200 preprocess=cpu postprocess=cpu bench.cuda_graph=false
          backend.half_input=false backend.head_maps=false) ;;
  models-table)
    sweeps=()
    for s in models models-e2e; do [[ -s $DEST/$s/sweep_id ]] && sweeps+=(--sweep "$(cat "$DEST/$s/sweep_id")"); done
    python3 -m runner table --tracking-uri "sqlite:///$RUNS/mlflow.db" "${sweeps[@]}" --out "$DEST/$step" 2>&1 \
      | tee "$DEST/$step/run.log"
    exit "${PIPESTATUS[0]}" ;;
  models)     args=(-m precision=fp16,fp32 model=yolov8n,yolo11n,yolo26n,yolov10n,yolov5nu,rtdetr-n
                    shape=static,dynamic
                    "${every_gpu[@]}" hydra.launcher.n_jobs=$(gpu_count)) ;;
  models-e2e) args=(-m precision=fp16,fp32 model=yolo26n,yolov10n export.head=end2end shape=static,dynamic
                    "${every_gpu[@]}" hydra.launcher.n_jobs=$(gpu_count)) ;;
  scale-1)   args=("${scale[@]}" hydra.launcher.n_jobs=1 "backend.gpus=[0]") ;;
  scale-all) args=("${scale[@]}" hydra.launcher.n_jobs=$(gpu_count) backend.gpus=auto) ;;
  seed)        args=(-m export=ultralytics,torch export.shape=static,dynamic "${seed[@]}") ;;
  seed-dynamo) args=(-m export=dynamo export.shape=static,dynamic "${seed[@]}") ;;
  seed-engine) args=(-m build=ultralytics export=ultralytics "${seed[@]}") ;;
  console) args=(-m precision=fp32,fp16 shape=static,dynamic backend.builder_optimization_level=0 data.limit=8
                  bench=quick) ;;
  matrix) args=(-m export=ultralytics,torch shape=static,dynamic precision=fp32,fp16 backend.builder_optimization_level=0) ;;
  pipeline-shapes|pipeline-bus)
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 shape=static backend=tensorrt,ultralytics preprocess=cpu,gpu
          postprocess=cpu,gpu bench.warmup=50 bench.iters=300 data=${step#pipeline-}) ;;
  fast-sweep)
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 shape=static,dynamic backend=tensorrt,ultralytics
          backend.builder_optimization_level=0 'profile.opt=[8,3,640,640]' 'profile.max=[64,3,640,640]'
          'bench.offline_batches=[1,8,32,64]' bench.server_rate=1000 bench.warmup=50 bench.iters=300
          "${every_gpu[@]}" hydra.launcher.n_jobs=$(gpu_count)) ;;
  fast3-sweep)
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 shape=static,dynamic backend=tensorrt,ultralytics backend.half_input=false,true
          backend.builder_optimization_level=3 'profile.opt=[8,3,640,640]' 'profile.max=[64,3,640,640]'
          'bench.offline_batches=[1,8,32,64]' bench.warmup=50 bench.iters=300 hydra/launcher=joblib backend.gpus=auto
          hydra.launcher.n_jobs=$(gpu_count)) ;;
  overlap) args=(-m model=yolov8n precision=fp16 shape=dynamic backend.builder_optimization_level=3
                 'profile.opt=[8,3,640,640]' 'profile.max=[64,3,640,640]' 'bench.offline_batches=[1,8,32,64]'
                 bench.offline_overlap=true,false) ;;
  batch4) args=(-m model=yolov8n shape=static 'shape.opt=[4,3,640,640]' bench.batch=4 precision=fp32,fp16
                backend.builder_optimization_level=0) ;;
  nms) args=(-m export.head=nms shape=static,dynamic precision=fp32,fp16 build=tensorrt_api,ultralytics
             backend.builder_optimization_level=0) ;;
  int8-layers) args=(-m "hydra.searchpath=[file://$LAYERS]" precision=fp16,int8_calibrator,int8_qdq,int8_qdq_conv_only
                     "${batch32[@]}" backend.builder_optimization_level=1 hydra.launcher.n_jobs=$(gpu_count)) ;;
  int8-fuse-sweep) args=(-m "hydra.searchpath=[file://$PWD/scripts/presets]"
                         precision=fp16,int8_qdq,int8_qdq_concat_own,int8_qdq_add_skip "${batch32[@]}"
                         backend.builder_optimization_level=${LEVEL:-1} hydra.launcher.n_jobs=$(gpu_count)) ;;
  level3) args=(-m export=ultralytics shape=static precision=fp32,fp16 bench.cuda_graph=false,true) ;;
  l3-dynamic-sweep)
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16,int8_qdq backend=tensorrt,ultralytics shape=dynamic
          'profile.min=[1,3,640,640]' 'profile.opt=[32,3,640,640]' 'profile.max=[64,3,640,640]'
          'bench.offline_batches=[1,8,32,64]' data.limit=64 bench.warmup=50 bench.iters=300
          backend.builder_optimization_level=${LEVEL:-3} hydra/launcher=joblib backend.gpus=auto
          hydra.launcher.n_jobs=$(gpu_count)) ;;
  l3-static-sweep)
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 backend=tensorrt,ultralytics shape=static data.limit=64
          bench.warmup=50 bench.iters=300 backend.builder_optimization_level=${LEVEL:-3}) ;;
  levels-sweep)  # levels 4 and 5 search more tactics than 3: their builds take longer
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 backend=tensorrt,ultralytics shape=static data.limit=64
          bench.warmup=50 bench.iters=300 backend.builder_optimization_level=3,4,5) ;;
  warmup-sweep)  # one engine: what a warm-up and timed run by the clock change against counts alone
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 backend=tensorrt,ultralytics shape=static data.limit=64
          bench.warmup_s=0,0.2 bench.min_timed_s=0,1) ;;
  fold-static-sweep)
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 backend=tensorrt,ultralytics shape=static data.limit=64
          backend.fold_split_concat=false,true backend.half_input=false,true bench.warmup=50 bench.iters=300
          backend.builder_optimization_level=${LEVEL:-3} hydra/launcher=joblib backend.gpus=auto
          hydra.launcher.n_jobs=$(gpu_count)) ;;
  fold-dynamic-sweep)
    args=(-m model=yolov8n precision=fp16,int8_qdq shape=dynamic
          'profile.min=[1,3,640,640]' 'profile.opt=[32,3,640,640]' 'profile.max=[64,3,640,640]'
          'bench.offline_batches=[1,32,64]' bench.offline_images=4096 data.limit=64 bench.warmup=50 bench.iters=300
          backend.builder_optimization_level=${LEVEL:-3} hydra/launcher=joblib backend.gpus=auto
          hydra.launcher.n_jobs=$(gpu_count)) ;;
  int8-b32-sweep) batch32_layers precision=fp16,int8_qdq ;;
  int8-ranges-sweep)
    batch32_layers precision=fp16,int8_calibrator precision.calibrator=percentile precision.concat_scales=shared ;;
  maps-static-sweep)  # the engine ending at the head's maps against the whole head, each beside the peer
    common=(cache_dir=$CACHE outputs=$RUNS)  # the backend is a dimension here
    args=(-m model=yolov8n precision=fp16 backend=tensorrt,ultralytics shape=static data.limit=64
          backend.head_maps=false,true bench.warmup=50 bench.iters=300 backend.builder_optimization_level=${LEVEL:-3}
          hydra/launcher=joblib backend.gpus=auto hydra.launcher.n_jobs=$(gpu_count)) ;;
  int8-pins-fp16|int8-pins-int8)
    pins=(precision=fp16)
    [[ $step == int8-pins-int8 ]] && pins=(precision=int8 'precision.pin_int8=[],[*/Conv],[*/Conv,*/Add,*/Concat]')
    batch32_layers "${pins[@]}" ;;
  int8-head-sweep)
    batch32_layers "hydra.searchpath=[file://$PWD/scripts/presets]" \
                   "precision=${PRECISIONS:-fp16,int8_pins_conv,int8_pins_head,int8_pins_head_stem_fp16}" ;;
  maps-dynamic-sweep) batch32_layers precision=fp16,int8 backend.head_maps=false,true ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
start=$(date +%s.%N)
${TIMEOUT:+timeout "$TIMEOUT"} python3 -m runner "${common[@]}" "${args[@]}" "${@:2}" 2>&1 | tee "$DEST/$step/run.log"
python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)" \
  > "$DEST/$step/wall_s"
echo "$step: $(cat "$DEST/$step/wall_s") s wall: python3 -m runner ${common[*]} ${args[*]} ${*:2}" | tee -a "$DEST/$step/run.log"
grep -o 'sweep run [0-9a-f]*' "$DEST/$step/run.log" | tail -1 | cut -d' ' -f3 > "$DEST/$step/sweep_id"
sweep=$(ls -td "$RUNS"/sweeps/*/ | head -1)
cp "$sweep/results.json" "$sweep/summary.csv" "$DEST/$step/"
# the lease's timing cache as it grew, to commit to scripts/timing-cache for the next lease
if [[ -d $CACHE/timing ]]; then mkdir -p "$DEST/timing-cache" && cp "$CACHE/timing/"* "$DEST/timing-cache/"; fi
