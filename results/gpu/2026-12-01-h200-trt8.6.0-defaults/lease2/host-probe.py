"""Where batch-1 e2e goes: the chain's stage times with graphs, and each kernel's GPU time in plain runs."""
import glob, json, sys, time
import numpy as np, cv2
from runner.backends.tensorrt.runtime import TrtRunner
from runner.backends.tensorrt.compat import cuda_call
from runner.backends.tensorrt import kernels as K
from runner.prepost import Chain
from runner.processing import ONE2MANY

images = [cv2.imread(p) for p in sorted(glob.glob("/tmp/ro/data/**/*.jpg", recursive=True))[:64]]
images = [i for i in images if i is not None] or [np.random.randint(0, 255, (480, 640, 3), np.uint8) for _ in range(8)]
maps = json.load(open(glob.glob(sys.argv[1] + "/onnx/*maps*/artifact.json")[0]))["head_maps"]
out = {"images": len(images)}
spans = {}
orig = K.Kernels.launch
def timed_launch(self, name, grid, stream, *args, block=K.BLOCK):
    rt = RT[0]
    a, b = cuda_call(rt.cudaEventCreate), cuda_call(rt.cudaEventCreate)
    cuda_call(rt.cudaEventRecord, a, stream)
    orig(self, name, grid, stream, *args, block=block)
    cuda_call(rt.cudaEventRecord, b, stream)
    PENDING.append((name, a, b))
RT, PENDING = [None], []
for meta in sorted(glob.glob(sys.argv[1] + "/engines/*.json")):
    rec = json.load(open(meta))
    art = rec.get("artifact")
    if not art or rec.get("profile", [[0]])[0][0] != 1 or rec.get("profile")[2][0] != 1:
        continue
    path = art if art.startswith("/") else meta.rsplit("/", 1)[0] + "/" + art
    for graph in (True, False):
        r = TrtRunner(path, cuda_graph=graph, head_maps=None)
        r.open()
        if len(r.output_names) > 1:
            r.close(); r = TrtRunner(path, cuda_graph=graph, head_maps=maps); r.open()
        RT[0] = r.rt
        name = f"maps={len(r.output_names) > 1} in={r.input_dtype.name} graph={graph}"
        r.set_shape((1, 3, 640, 640)); r.pin(images)
        chain = Chain(r.gpu_letterbox(), r.gpu_score_filter(), 0.25, 0.7, 300, ONE2MANY, None, True)
        hw = (640, 640)
        for i in range(300):
            chain.run(r, [images[i % len(images)]], hw)
        st = {}
        for i in range(1000):
            dets, t = chain.run(r, [images[i % len(images)]], hw)
            st.setdefault("dets", []).append(len(dets[0]))
            for k, v in t.items(): st.setdefault(k, []).append(v)
        res = {k: round(float(np.percentile(v, 50)), 4) for k, v in st.items()}
        if not graph:
            K.Kernels.launch = timed_launch
            ks = {}
            for i in range(300):
                chain.run(r, [images[i % len(images)]], hw)
                for kname, a, b in PENDING:
                    ks.setdefault(kname, []).append(cuda_call(r.rt.cudaEventElapsedTime, a, b) * 1e3)
                    cuda_call(r.rt.cudaEventDestroy, a); cuda_call(r.rt.cudaEventDestroy, b)
                PENDING.clear()
            K.Kernels.launch = orig
            res["kernel_us"] = {k: round(float(np.percentile(v, 50)), 1) for k, v in ks.items()}
        r.close()
        out[name] = res
        print(name, json.dumps(res), flush=True)
json.dump(out, open("/tmp/proof/host-probe.json", "w"), indent=1)
