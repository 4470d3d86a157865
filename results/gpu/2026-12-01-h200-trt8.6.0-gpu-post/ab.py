"""A/B of the queued chain at batch 1 on the defaults' engine (head maps, fp16 input): e2e and the GPU's spans,
for whichever `runner` package is first on the path. argv: cache dir, label, out json."""
import glob, json, sys, time
import numpy as np, cv2
import runner
from runner.backends.tensorrt.runtime import TrtRunner
from runner.prepost import Chain
from runner.processing import ONE2MANY

cache, label, out_path = sys.argv[1:4]
images = [cv2.imread(p) for p in sorted(glob.glob("/tmp/ro/data/**/*.jpg", recursive=True))[:64]]
images = [i for i in images if i is not None]
maps = json.load(open(glob.glob(cache + "/onnx/*maps*/artifact.json")[0]))["head_maps"]
res = {"label": label, "package": runner.__file__, "images": len(images), "engines": {}}
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
    chain = Chain(r.gpu_letterbox(), r.gpu_score_filter(), 0.25, 0.7, 300, ONE2MANY, None, True)
    hw, st = (640, 640), {}
    for i in range(500):
        chain.run(r, [images[i % len(images)]], hw)
    for i in range(3000):
        dets, t = chain.run(r, [images[i % len(images)]], hw)
        pre, post = r.around_engine_ms()
        t.update(gpu_pre=pre, gpu_post=post, dets=len(dets[0]))
        for k, v in t.items(): st.setdefault(k, []).append(v)
    r.close()
    res["engines"][path.rsplit("/", 1)[-1]] = {k: {"p50": round(float(np.percentile(v, 50)), 4),
                                                   "p90": round(float(np.percentile(v, 90)), 4)} for k, v in st.items()}
json.dump(res, open(out_path, "w"), indent=1)
print(label, json.dumps(res["engines"]), flush=True)
