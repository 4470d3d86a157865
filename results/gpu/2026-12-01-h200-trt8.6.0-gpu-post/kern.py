"""GPU time of the post kernels alone on the defaults' engine: N queued runs of the filter+NMS captured in one graph,
and N of the filter (map decode) alone, between CUDA events. argv: cache dir, label, out json."""
import glob, json, sys
import numpy as np, cv2
import runner
from runner.backends.tensorrt.runtime import TrtRunner
from runner.backends.tensorrt.compat import cuda_call
from runner.prepost import Chain
from runner.processing import ONE2MANY

cache, label, out_path = sys.argv[1:4]
N = 50
images = [cv2.imread(p) for p in sorted(glob.glob("/tmp/ro/data/**/*.jpg", recursive=True))[:64]]
images = [i for i in images if i is not None]
maps = json.load(open(glob.glob(cache + "/onnx/*maps*/artifact.json")[0]))["head_maps"]
res = {"label": label, "package": runner.__file__}
for meta in sorted(glob.glob(cache + "/engines/*.json")):
    rec = json.load(open(meta))
    art = rec.get("artifact")
    if not art or rec.get("profile", [[0]])[0][0] != 1 or rec.get("profile")[2][0] != 1:
        continue
    path = art if art.startswith("/") else meta.rsplit("/", 1)[0] + "/" + art
    r = TrtRunner(path, cuda_graph=True, head_maps=None); r.open()
    if len(r.output_names) == 1 or r.input_dtype != np.float16:
        r.close(); continue
    r.close(); r = TrtRunner(path, cuda_graph=True, head_maps=maps); r.open()
    r.set_shape((1, 3, 640, 640)); r.pin(images)
    sf = r.gpu_score_filter()
    chain = Chain(r.gpu_letterbox(), sf, 0.25, 0.7, 300, ONE2MANY, None, True)
    rt, cand, K = r.rt, sf._candidates, sf.kernels()
    head, shape, dtype = r.tensor(r.output_names[0])
    tensors = [r.tensor(name)[:2] for name in maps["maps"]]
    def both():
        cand.queue(r, K, 0.25, 0.7, 300)
    def decode():
        K.map_candidates(r.stream, tensors, maps["classes"], maps["reg_max"], 640, 0.25,
                         cand.buffers.device[cand.rows], cand.buffers.device[cand.counts], 1024, dtype == np.float16)
        cuda_call(rt.cudaMemsetAsync, cand.buffers.device[cand.counts], 0, 4, r.stream)
    def memset():
        cuda_call(rt.cudaMemsetAsync, cand.buffers.device[cand.counts], 0, 4, r.stream)
    a, b = cuda_call(rt.cudaEventCreate), cuda_call(rt.cudaEventCreate)
    out = {}
    for img in range(0, 64, 8):
        chain.run(r, [images[img]], (640, 640))  # this image's maps in the engine's output
        for name, fn in (("filter+nms", both), ("decode+memset", decode), ("memset", memset)):
            cuda_call(rt.cudaStreamBeginCapture, r.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
            for _ in range(N):
                fn()
            g = cuda_call(rt.cudaStreamEndCapture, r.stream)
            ge = cuda_call(rt.cudaGraphInstantiate, g, 0)
            ts = []
            for _ in range(20):
                cuda_call(rt.cudaEventRecord, a, r.stream)
                cuda_call(rt.cudaGraphLaunch, ge, r.stream)
                cuda_call(rt.cudaEventRecord, b, r.stream)
                cuda_call(rt.cudaEventSynchronize, b)
                ts.append(cuda_call(rt.cudaEventElapsedTime, a, b) * 1e3 / N)
            out.setdefault(name, []).append(float(np.median(ts)))
            cuda_call(rt.cudaGraphExecDestroy, ge); cuda_call(rt.cudaGraphDestroy, g)
        cuda_call(rt.cudaMemsetAsync, cand.buffers.device[cand.counts], 0, 4, r.stream); r.sync()
    res["us_per_run"] = {k: [round(x, 2) for x in v] for k, v in out.items()}
    r.close()
json.dump(res, open(out_path, "w"), indent=1)
print(label, json.dumps(res["us_per_run"]), flush=True)
