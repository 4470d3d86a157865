"""CUDA kernels of the GPU pipeline, compiled at run time with NVRTC (cuda-python): no torch, no toolkit.

`letterbox_*`: uint8 BGR HWC source images -> the engine's NCHW RGB input in [0, 1] (float or half; int8 quantized
at the input's range: round(v * q) clamped to [-128, 127], q = 127 / range, as `processing.quantize_input`), one
thread per output pixel. The geometry (scale, unpadded size, padding) comes from the host, computed by the CPU path's
own `processing.fit`, so it is the same exactly. Resampling follows OpenCV's INTER_LINEAR: half-pixel centres,
edge clamping, weights in steps of 1/2048, rounded to whole levels before /255. OpenCV rounds its fixed-point
sums in two passes, so a pixel may differ from the CPU path by one level: |gpu - cpu| <= 1/255 (+ the half
rounding of an fp16 input).

`candidates_*`: the one-to-many head `(B, 4 + nc, A)` -> per image the anchors whose best class score is above
the threshold, as rows [cx, cy, w, h, score, class, anchor, 0], compacted with an atomic counter. Only these rows
and the counts cross to the host, instead of the whole head output.

`map_candidates_*`: the same rows from a Detect head's three levels of maps (`backend.head_maps`), box
`(B, 4 * reg_max, h, w)` and class `(B, nc, h, w)` each: the best class logit's sigmoid against the threshold, then,
for the anchors kept only, the decode `processing.decode_maps` does (DFL expectation, distances from the cell's
centre, times the level's stride). Four threads take each anchor: a quarter of the classes each, then a side each.

`nms_rows`: one block per image over the rows above, the host's class-aware NMS (`processing.nms`, OpenCV's
`NMSBoxesBatched`) done on the GPU: rows ranked by score, ties in anchor order (as the host decode sees them), the
best `max_det` kept (OpenCV's top_k), then greedy suppression of a class's boxes whose IoU with a kept one is above
the threshold, a round per kept row: the rows suppressed are bits, a 32-row word per warp, so each warp finds the
next row kept by a ballot and the block tests every later row against it at once. The kept boxes are mapped back to
the source image as `processing.scale_boxes` maps them (less the padding, over the gain, clipped to the image; IEEE
float32 like NumPy), from each image's `Scale` row, which the host writes into pinned memory that the kernel reads
over the bus. Each image's kept count and its detections [x1, y1, x2, y2, score, class] in source pixels, best
first, are written straight into pinned host memory (no copy back); the count is -1 where the filter found more
rows than it keeps (the host decodes the whole output). The NMS zeroes each image's candidate count once read, so
the next run's filter counts from zero with no memset. The bitonic sort spans the next power of two above the
image's count, not every slot, and syncs the block only where a step's partners, or the next step's, lie in another
warp.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from runner.backends.tensorrt.compat import cuda_call, cuda_driver, nvrtc
from runner.rewrite import MAX_BINS

FIT_FIELDS = 8  # int32 per image in the letterbox parameters: see `struct Fit`
SCALE_FIELDS = 6  # float32 per image in the NMS's way back to source pixels: see `struct Scale`
ROW = 8  # float32 per candidate row
DETECTION = 6  # float32 per detection: x1, y1, x2, y2, score, class
NMS_ROWS = 1024  # the candidate rows per image the NMS kernel sorts at once, a thread each
MAP_ANCHORS = 64  # anchors per block of `map_candidates`
SIDES = 4  # threads per anchor in `map_candidates`: the classes split four ways, then one side of the box each
DEFINES = {"NMS_ROWS": NMS_ROWS, "MAP_ANCHORS": MAP_ANCHORS, "SIDES": SIDES,  # the kernels' sizes, from here
           "MAX_BINS": MAX_BINS}  # the DFL's bins per side that the head-maps rewrite lets through
SOURCE = r"""
typedef unsigned short half_bits;
__device__ __forceinline__ half_bits to_half(float v) {
    half_bits h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
}
__device__ __forceinline__ float from_half(half_bits h) {
    float v; asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h)); return v;
}
__device__ __forceinline__ void put(float* p, float v, float) { *p = v; }
__device__ __forceinline__ void put(half_bits* p, float v, float) { *p = to_half(v); }
__device__ __forceinline__ void put(signed char* p, float v, float q) {
    *p = (signed char)fminf(fmaxf(rintf(v * q), -128.f), 127.f);
}
__device__ __forceinline__ float get(const float* p) { return *p; }
__device__ __forceinline__ float get(const half_bits* p) { return from_half(*p); }

struct Fit { int src_offset, src_w, src_h, new_w, new_h, left, top, unused; };

__device__ __forceinline__ void axis(int d, int new_size, int src_size, int& i0, int& i1, float& w) {
    float f = (d + 0.5f) * ((float)src_size / (float)new_size) - 0.5f;
    int i = (int)floorf(f);
    f -= i;
    if (i < 0) { i = 0; f = 0.f; }
    if (i >= src_size - 1) { i = src_size - 1; f = 0.f; }
    i0 = i; i1 = min(i + 1, src_size - 1);
    w = rintf(f * 2048.f) / 2048.f;
}

template <typename T>
__device__ void letterbox(const unsigned char* src, const Fit* fits, T* dst, int H, int W, float q) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y, n = blockIdx.z;
    if (x >= W) return;
    Fit f = fits[n];
    float c[3] = {114.f, 114.f, 114.f};  // B, G, R
    int dx = x - f.left, dy = y - f.top;
    if (dx >= 0 && dx < f.new_w && dy >= 0 && dy < f.new_h) {
        const unsigned char* s = src + f.src_offset;
        int x0, x1, y0, y1; float wx, wy;
        axis(dx, f.new_w, f.src_w, x0, x1, wx);
        axis(dy, f.new_h, f.src_h, y0, y1, wy);
        const unsigned char *r0 = s + (size_t)y0 * f.src_w * 3, *r1 = s + (size_t)y1 * f.src_w * 3;
        for (int k = 0; k < 3; ++k) {
            float top = r0[x0 * 3 + k] * (1.f - wx) + r0[x1 * 3 + k] * wx;
            float bottom = r1[x0 * 3 + k] * (1.f - wx) + r1[x1 * 3 + k] * wx;
            c[k] = floorf(top * (1.f - wy) + bottom * wy + 0.5f);
        }
    }
    size_t plane = (size_t)H * W, at = (size_t)n * 3 * plane + (size_t)y * W + x;
    put(dst + at, c[2] / 255.f, q);
    put(dst + at + plane, c[1] / 255.f, q);
    put(dst + at + 2 * plane, c[0] / 255.f, q);
}

template <typename T>
__device__ void candidates(const T* pred, int C, int A, float conf, float* rows, int* counts, int cap) {
    int a = blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
    if (a >= A) return;
    const T* p = pred + (size_t)n * C * A + a;
    float best = get(p + (size_t)4 * A); int cls = 0;
    for (int c = 5; c < C; ++c) { float v = get(p + (size_t)c * A); if (v > best) { best = v; cls = c - 4; } }
    if (!(best > conf)) return;
    int i = atomicAdd(counts + n, 1);
    if (i >= cap) return;
    float* r = rows + ((size_t)n * cap + i) * 8;
    for (int k = 0; k < 4; ++k) r[k] = get(p + (size_t)k * A);
    r[4] = best; r[5] = (float)cls; r[6] = (float)a; r[7] = 0.f;
}

template <typename T>
__device__ void map_candidates(const T* b0, const T* c0, const T* b1, const T* c1, const T* b2, const T* c2,
                               int h0, int w0, int h1, int w1, int h2, int w2, int nc, int reg, int H,
                               float conf, float* rows, int* counts, int cap) {
    __shared__ float best_of[SIDES][MAP_ANCHORS], side[SIDES][MAP_ANCHORS];
    __shared__ int class_of[SIDES][MAP_ANCHORS];
    int t = threadIdx.x, g = threadIdx.y, a = blockIdx.x * MAP_ANCHORS + t, n = blockIdx.y;
    int a0 = h0 * w0, a1 = h1 * w1;
    bool inside = a < a0 + a1 + h2 * w2;
    const T *box = b0, *cls = c0; int i = a, h = h0, w = w0;  // past the last level: addressed, never read
    if (a >= a0 + a1) { box = b2; cls = c2; i = a - a0 - a1; h = h2; w = w2; }
    else if (a >= a0) { box = b1; cls = c1; i = a - a0; h = h1; w = w1; }
    size_t hw = (size_t)h * w;
    box += (size_t)n * 4 * reg * hw + i;
    cls += (size_t)n * nc * hw + i;
    float best = -3.4e38f; int k = nc;
    if (inside) {
        #pragma unroll 4
        for (int c = g; c < nc; c += SIDES) {
            float v = get(cls + c * hw);
            if (v > best || k == nc) { best = v; k = c; }
        }
    }
    best_of[g][t] = best; class_of[g][t] = k;
    __syncthreads();
    best = best_of[0][t]; k = class_of[0][t];  // the first class of the highest logit, as a scan of all would find
    for (int j = 1; j < SIDES; ++j) {
        float v = best_of[j][t]; int c = class_of[j][t];
        if (c < nc && (v > best || (v == best && c < k))) { best = v; k = c; }
    }
    float score = 1.f / (1.f + expf(-best));
    bool keep = inside && score > conf;
    if (keep) {  // this thread's side: every bin loaded at once, so a kept anchor waits for one round of loads
        float v[MAX_BINS];
        #pragma unroll
        for (int j = 0; j < MAX_BINS; ++j) v[j] = j < reg ? get(box + (g * reg + j) * hw) : -3.4e38f;
        float m = v[0];
        #pragma unroll
        for (int j = 1; j < MAX_BINS; ++j) m = fmaxf(m, v[j]);
        float sum = 0.f, mean = 0.f;
        #pragma unroll
        for (int j = 0; j < MAX_BINS; ++j) { float e = j < reg ? expf(v[j] - m) : 0.f; sum += e; mean += e * j; }
        side[g][t] = reg > 1 ? mean / sum : m;
    }
    __syncthreads();
    if (!keep || g != 0) return;
    float stride = (float)H / (float)h, x = (i % w) + 0.5f, y = (i / w) + 0.5f;
    float x1 = x - side[0][t], y1 = y - side[1][t], x2 = x + side[2][t], y2 = y + side[3][t];
    int slot = atomicAdd(counts + n, 1);
    if (slot >= cap) return;
    float* r = rows + ((size_t)n * cap + slot) * 8;
    r[0] = (x1 + x2) / 2 * stride; r[1] = (y1 + y2) / 2 * stride; r[2] = (x2 - x1) * stride; r[3] = (y2 - y1) * stride;
    r[4] = score; r[5] = (float)k; r[6] = (float)a; r[7] = 0.f;
}

__device__ __forceinline__ bool ranked_before(float s, int a, float t, int b) { return s > t || (s == t && a < b); }

struct Scale { float left, top, gain_x, gain_y, w, h; };  // `Letterbox`: padding, gains (as float32), source size
__device__ __forceinline__ float to_source(float v, float pad, float gain, float size) {
    return fminf(fmaxf((v - pad) / gain, 0.f), size);
}

__device__ void nms(const float* rows, int* counts, float iou, int max_det, const Scale* scales, int* kept,
                    float* dets) {
    __shared__ float score[NMS_ROWS], x1[NMS_ROWS], y1[NMS_ROWS], x2[NMS_ROWS], y2[NMS_ROWS], w[NMS_ROWS],
        h[NMS_ROWS];
    __shared__ int anchor[NMS_ROWS], order[NMS_ROWS], cls[NMS_ROWS];
    int t = threadIdx.x, n = blockIdx.x, count = counts[n];
    Scale fit;
    if (t == 0) fit = scales[n];  // pinned host memory: one read over the bus, waited for only at the write-out
    __syncthreads();  // every thread has the count: the next run's filter counts from zero
    if (t == 0) counts[n] = 0;
    if (count > NMS_ROWS) { if (t == 0) kept[n] = -1; return; }
    rows += (size_t)n * NMS_ROWS * 8;
    score[t] = t < count ? rows[t * 8 + 4] : -3.4e38f;
    anchor[t] = t < count ? (int)rows[t * 8 + 6] : 0x7fffffff;
    order[t] = t;
    __syncthreads();
    int span = 2;
    while (span < count) span <<= 1;  // the rows past it rank last already
    for (int k = 2; k <= span; k <<= 1) {  // bitonic sort of (score desc, anchor asc)
        for (int j = k >> 1; j > 0; j >>= 1) {
            int p = t ^ j;
            if (p > t && ((t & k) == 0) != ranked_before(score[t], anchor[t], score[p], anchor[p])) {
                float s = score[t]; score[t] = score[p]; score[p] = s;
                int a = anchor[t]; anchor[t] = anchor[p]; anchor[p] = a;
                int o = order[t]; order[t] = order[p]; order[p] = o;
            }
            int next = j > 1 ? j >> 1 : k;  // the next step's partner distance
            if (j >= 32 || next >= 32) __syncthreads(); else __syncwarp();  // both steps' partners in the warp
        }
    }
    int K = min(count, max_det);  // OpenCV's top_k: the best max_det rows, then NMS among them
    if (t < K) {  // the box as the host writes it: centre -/+ half the size
        const float* r = rows + order[t] * 8;
        x1[t] = r[0] - r[2] / 2; y1[t] = r[1] - r[3] / 2; x2[t] = r[0] + r[2] / 2; y2[t] = r[1] + r[3] / 2;
        w[t] = r[2]; h[t] = r[3]; cls[t] = (int)r[5];
    }
    __shared__ unsigned gone[2][32];  // per round, the rows suppressed as bits: word w is rows 32w..32w+31
    if (t < 32) gone[0][t] = 0;
    __syncthreads();
    // the greedy pass, a round per kept row: every warp finds the same next row from the round's bits, then thread t
    // tests row t against it and warp w writes word w of the next round's bits
    int lane = t & 31, first = 32 * lane, found = 0;
    int* chosen = order;  // the rows kept, best first: the sort's order is spent once the boxes are gathered
    float bx = x1[t], by = y1[t], bw = w[t], bh = h[t];  // this thread's row (meaningful below K)
    int bc = cls[t];
    for (int from = 0;; ++found) {
        const unsigned* now = gone[found & 1];
        unsigned open = 0;  // lane l: the rows of word l from `from` on, below K, not suppressed
        if (from < first + 32 && first < K) {
            open = ~now[lane];
            if (from > first) open &= ~0u << (from - first);
            if (K < first + 32) open &= (1u << (K - first)) - 1u;
        }
        unsigned words = __ballot_sync(~0u, open != 0);
        if (words == 0) break;
        int word = __ffs(words) - 1, i = 32 * word + __ffs(__shfl_sync(~0u, open, word)) - 1;  // the best left
        if (t == 0) chosen[found] = i;
        bool hit = false;
        if (t > i && t < K && bc == cls[i]) {
            float ax = x1[i], ay = y1[i], aw = w[i], ah = h[i];
            float iw = fminf(ax + aw, bx + bw) - fmaxf(ax, bx), ih = fminf(ay + ah, by + bh) - fmaxf(ay, by);
            float both = aw * ah + bw * bh, inter = iw > 0.f && ih > 0.f ? iw * ih : 0.f;
            hit = both <= 0.f || inter / (both - inter) > iou;
        }
        unsigned hits = __ballot_sync(~0u, hit);
        if (lane == 0) gone[(found + 1) & 1][t >> 5] = now[t >> 5] | hits;
        __syncthreads();
        from = i + 1;
    }
    if (t >= 32) return;  // the write-out is one warp's
    // the detections straight into pinned host memory, a warp's consecutive floats at a time, in source pixels
    float left = __shfl_sync(~0u, fit.left, 0), top = __shfl_sync(~0u, fit.top, 0);
    float gain_x = __shfl_sync(~0u, fit.gain_x, 0), gain_y = __shfl_sync(~0u, fit.gain_y, 0);
    float width = __shfl_sync(~0u, fit.w, 0), height = __shfl_sync(~0u, fit.h, 0);
    float* out = dets + (size_t)n * max_det * 6;
    for (int e = t; e < found * 6; e += 32) {
        int i = chosen[e / 6], field = e % 6;
        out[e] = field == 0 ? to_source(x1[i], left, gain_x, width) : field == 1 ? to_source(y1[i], top, gain_y, height)
               : field == 2 ? to_source(x2[i], left, gain_x, width) : field == 3 ? to_source(y2[i], top, gain_y, height)
               : field == 4 ? score[i] : (float)cls[i];
    }
    if (t == 0) kept[n] = found;
}

extern "C" {
typedef const unsigned char* Src;
#define LETTERBOX(T) Src s, const Fit* f, T* d, int H, int W, float q
__global__ void letterbox_float(LETTERBOX(float)) { letterbox(s, f, d, H, W, q); }
__global__ void letterbox_half(LETTERBOX(half_bits)) { letterbox(s, f, d, H, W, q); }
__global__ void letterbox_int8(LETTERBOX(signed char)) { letterbox(s, f, d, H, W, q); }
__global__ void candidates_float(const float* p, int C, int A, float t, float* r, int* n, int k) {
    candidates(p, C, A, t, r, n, k);
}
__global__ void candidates_half(const half_bits* p, int C, int A, float t, float* r, int* n, int k) {
    candidates(p, C, A, t, r, n, k);
}
#define MAPS(T) const T* b0, const T* c0, const T* b1, const T* c1, const T* b2, const T* c2, int h0, int w0, \
    int h1, int w1, int h2, int w2, int nc, int reg, int H, float t, float* r, int* n, int k
#define MAPS_ARGS b0, c0, b1, c1, b2, c2, h0, w0, h1, w1, h2, w2, nc, reg, H, t, r, n, k
__global__ void map_candidates_float(MAPS(float)) { map_candidates(MAPS_ARGS); }
__global__ void map_candidates_half(MAPS(half_bits)) { map_candidates(MAPS_ARGS); }
__global__ void __launch_bounds__(NMS_ROWS) nms_rows(const float* r, int* n, float iou, int m,
                                                     const Scale* s, int* kept, float* d) {
    nms(r, n, iou, m, s, kept, d);
}
}
"""
LETTERBOX_KERNELS = {"float32": "letterbox_float", "float16": "letterbox_half", "int8": "letterbox_int8"}  # by input
KERNELS = (*LETTERBOX_KERNELS.values(), "candidates_float", "candidates_half", "map_candidates_float",
           "map_candidates_half", "nms_rows")
BLOCK = 256


@lru_cache(maxsize=None)
def compile_ptx(arch: str) -> bytes:
    """PTX of SOURCE for a virtual architecture such as compute_90 (compiled once per process). Raises RuntimeError
    with NVRTC's log."""
    nv = nvrtc()
    program = cuda_call(nv.nvrtcCreateProgram, SOURCE.encode(), b"runner_kernels.cu", 0, [], [])
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"--std=c++14", b"-default-device",
                   *(f"-D{name}={value}".encode() for name, value in DEFINES.items())]
        err, = nv.nvrtcCompileProgram(program, len(options), options)
        if int(err) != 0:
            size = cuda_call(nv.nvrtcGetProgramLogSize, program)
            log = b" " * size
            nv.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC could not compile the pipeline kernels: {log.decode(errors='replace')}")
        ptx = b" " * cuda_call(nv.nvrtcGetPTXSize, program)
        cuda_call(nv.nvrtcGetPTX, program, ptx)
        return ptx
    finally:
        nv.nvrtcDestroyProgram(program)


@dataclass
class Kernels:
    """The compiled kernels, loaded into the current CUDA context (a module per owner: `prepost`'s ends)."""
    module: object
    functions: dict

    @classmethod
    def load(cls, rt) -> Kernels:
        device = cuda_call(rt.cudaGetDevice)
        props = cuda_call(rt.cudaGetDeviceProperties, device)
        drv = cuda_driver()
        module = cuda_call(drv.cuModuleLoadData, compile_ptx(f"compute_{props.major}{props.minor}"))
        return cls(module, {name: cuda_call(drv.cuModuleGetFunction, module, name.encode()) for name in KERNELS})

    def launch(self, name: str, grid: tuple[int, int, int], stream, *args,
               block: tuple[int, int, int] = (BLOCK, 1, 1)) -> None:
        """Launch `name` on `stream` with (value, ctypes type) arguments."""
        values, types = zip(*args)
        cuda_call(cuda_driver().cuLaunchKernel, self.functions[name], *grid, *block, 0, stream, (values, types), 0)

    def letterbox(self, stream, src: int, fits: int, dst: int, batch: int, hw: tuple[int, int], dtype: np.dtype,
                  levels: float) -> None:
        """Into an input of `dtype`; an int8 one at `levels` per unit (127 / its range), which the others ignore."""
        h, w = hw
        self.launch(LETTERBOX_KERNELS[np.dtype(dtype).name], (-(-w // BLOCK), h, batch), stream,
                    (src, ctypes.c_void_p), (fits, ctypes.c_void_p), (dst, ctypes.c_void_p),
                    (h, ctypes.c_int), (w, ctypes.c_int), (levels, ctypes.c_float))

    def candidates(self, stream, pred: int, batch: int, channels: int, anchors: int, conf: float, rows: int,
                   counts: int, cap: int, half: bool) -> None:
        self.launch("candidates_half" if half else "candidates_float", (-(-anchors // BLOCK), batch, 1), stream,
                    (pred, ctypes.c_void_p), (channels, ctypes.c_int), (anchors, ctypes.c_int),
                    (conf, ctypes.c_float), (rows, ctypes.c_void_p), (counts, ctypes.c_void_p), (cap, ctypes.c_int))

    def map_candidates(self, stream, maps: list[tuple[int, tuple[int, ...]]], classes: int, reg_max: int,
                       input_h: int, conf: float, rows: int, counts: int, cap: int, half: bool) -> None:
        """`candidates` from the head's maps, (device address, shape) per level: box, class, box, class, ..."""
        batch, anchors = maps[0][1][0], sum(shape[2] * shape[3] for _, shape in maps[::2])
        self.launch("map_candidates_half" if half else "map_candidates_float", (-(-anchors // MAP_ANCHORS), batch, 1),
                    stream, *((address, ctypes.c_void_p) for address, _ in maps),
                    *((size, ctypes.c_int) for _, shape in maps[::2] for size in shape[2:]),
                    (classes, ctypes.c_int), (reg_max, ctypes.c_int), (input_h, ctypes.c_int), (conf, ctypes.c_float),
                    (rows, ctypes.c_void_p), (counts, ctypes.c_void_p), (cap, ctypes.c_int),
                    block=(MAP_ANCHORS, SIDES, 1))

    def nms(self, stream, batch: int, rows: int, counts: int, iou: float, max_det: int, scales: int, kept: int,
            detections: int) -> None:
        """Per image, NMS over its `counts` candidate rows (NMS_ROWS apart), zeroing the counts, into its kept count
        and its `max_det` detection rows, mapped to its source image by its `Scale` row (`scales`, `kept` and
        `detections`: pinned host memory)."""
        self.launch("nms_rows", (batch, 1, 1), stream, (rows, ctypes.c_void_p), (counts, ctypes.c_void_p),
                    (iou, ctypes.c_float), (max_det, ctypes.c_int), (scales, ctypes.c_void_p),
                    (kept, ctypes.c_void_p), (detections, ctypes.c_void_p), block=(NMS_ROWS, 1, 1))

    def unload(self) -> None:
        cuda_call(cuda_driver().cuModuleUnload, self.module)
