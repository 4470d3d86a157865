"""The GPU chain's ends on a real GPU: the letterbox against the CPU one, the score filter against the host decode;
and the throughput lanes. The engines are tiny ONNX graphs made here, so the kernels see exactly the buffers a YOLO
engine gives, and the 128-px yolov8n cut at its head maps."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SMALL_IMGSZ, export_spec
from runner.backends.onnxruntime import open_reference
from runner.backends.tensorrt import compat as trt_compat
from runner.backends.tensorrt.build import BuildSpec, build_engine
from runner.backends.tensorrt.prepost import CANDIDATE_CAP
from runner.backends.tensorrt.runtime import ShapeError, TrtRunner
from runner.bench import bench, images_per_second
from runner.config import BenchConfig
from runner.export import export_onnx
from runner.metrics import tensor_metrics
from runner import prepost
from runner.preflight import preflight
from runner.prepost import Chain
from runner.rewrite import head_maps_onnx
from runner.processing import ONE2MANY, fit, postprocess, preprocess
from runner.validate import GPU_LETTERBOX_TOLERANCE

pytestmark = pytest.mark.gpu
for _ok, _why in (trt_compat.trt_available(), trt_compat.cuda_gpu_available()):
    if not _ok:
        pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=_why)]
        break

INPUT = [2, 3, 96, 128]  # batch 2, non-square
HEAD_INPUT, HEAD = [1, 3, 16, 1024], [1, 24, 2048]  # reshaped to a one-to-many head: 4 + 20 classes, 2048 anchors


def onnx_model(path, in_shape, fp16: bool, reshape_to=None) -> str:
    """images -> Mul(1) -> output0, reshaped to `reshape_to` if given: the output is the input, as a head. A batch
    dim given as a name (and -1 in `reshape_to`) makes the batch dynamic."""
    dtype, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    nodes = [helper.make_node("Mul", ["images", "one"], ["scaled"])]
    inits = [numpy_helper.from_array(np.ones(1, dtype), "one")]
    out_shape = in_shape
    if reshape_to:
        nodes.append(helper.make_node("Reshape", ["scaled", "to"], ["output0"]))
        inits.append(numpy_helper.from_array(np.asarray(reshape_to, np.int64), "to"))
        out_shape = [in_shape[0] if d == -1 else d for d in reshape_to]
    else:
        nodes.append(helper.make_node("Identity", ["scaled"], ["output0"]))
    graph = helper.make_graph(nodes, "io", [helper.make_tensor_value_info("images", elem, in_shape)],
                              [helper.make_tensor_value_info("output0", elem, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def engine(tmp_path, in_shape, fp16, reshape_to=None, batches: tuple[int, int, int] | None = None) -> str:
    """A static engine at `in_shape`, or with `batches` (min, opt, max) one dynamic in its batch."""
    onnx_shape = ["N", *in_shape[1:]] if batches else in_shape
    path = onnx_model(tmp_path / f"m{fp16}{bool(reshape_to)}{bool(batches)}.onnx", onnx_shape, fp16, reshape_to)
    lo, opt, hi = ([b, *in_shape[1:]] for b in batches) if batches else (in_shape,) * 3
    result = build_engine(BuildSpec(onnx_path=path, precision="fp16" if fp16 else "fp32",
                                    mechanism="builder_flag" if fp16 else "none", min_shape=lo, opt_shape=opt,
                                    max_shape=hi, optimization_level=0, workspace_gib=1.0,
                                    cache_dir=str(tmp_path / "cache")))
    return result.artifact


def frames(seed: int) -> list[list[np.ndarray]]:
    """Batches of BGR frames: downscaled, upscaled, the input's own size, and smooth gradients."""
    rng = np.random.default_rng(seed)
    noise = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((300, 200), (47, 61), (96, 128), (810, 1080))]
    y, x = np.mgrid[0:480, 0:640]
    smooth = np.stack([(x * 255 / 639), (y * 255 / 479), ((x + y) * 255 / 1118)], -1).astype(np.uint8)
    return [noise[:2], noise[2:], [smooth, smooth[::2, ::3].copy()]]


@pytest.mark.parametrize("fp16", [False, True], ids=["float-input", "half-input"])
@pytest.mark.parametrize("graph", [False, True], ids=["plain", "cuda-graph"])
def test_gpu_letterbox_matches_the_cpu_one(tmp_path, fp16, graph):
    """Same geometry exactly; pixels within one level of the resize's rounding (+ fp16 rounding)."""
    hw = tuple(INPUT[2:])
    with TrtRunner(engine(tmp_path, INPUT, fp16), cuda_graph=graph) as runner:
        runner.set_shape(tuple(INPUT))
        letterbox = runner.gpu_letterbox()
        worst, differing, total = 0.0, 0, 0
        for batch in frames(0):
            blob, cpu_boxes = preprocess(batch, hw)
            gpu_boxes = letterbox.run(batch, hw)
            runner.sync()
            got = letterbox.read_input()
            assert gpu_boxes == cpu_boxes
            diff = np.abs(got - blob)
            worst, differing, total = max(worst, float(diff.max())), differing + int((diff > 1e-3).sum()), \
                total + diff.size
            runner.execute()  # the engine reads what the kernel wrote
            np.testing.assert_allclose(runner.d2h()["output0"], got, atol=1e-3)
        assert graph == runner.settings()["cuda_graph"]
    print(f"letterbox: max |gpu - cpu| {worst:.2e} (tolerance {GPU_LETTERBOX_TOLERANCE:.2e}), "
          f"{differing}/{total} values differ by more than 1e-3")
    assert worst <= GPU_LETTERBOX_TOLERANCE
    assert differing / total < 0.1  # uniform noise, downscaled: the worst case for OpenCV's fixed-point rounding


def test_gpu_letterbox_and_engine_replay_a_graph_per_shape_on_a_dynamic_engine(tmp_path):
    """On a dynamic engine, the letterbox and the engine keep a CUDA graph per shape: two shapes alternating, each
    visit run twice (plain, then replayed), give the CPU letterbox's input and the engine reads what it wrote."""
    lo, hi = [1, 3, 64, 64], [2, 3, 96, 128]
    path = onnx_model(tmp_path / "dynamic.onnx", ["batch", 3, "height", "width"], False)
    built = build_engine(BuildSpec(onnx_path=path, precision="fp32", mechanism="none", min_shape=lo, opt_shape=hi,
                                   max_shape=hi, optimization_level=0, workspace_gib=1.0,
                                   cache_dir=str(tmp_path / "cache")))
    batches = frames(4)
    with TrtRunner(built.artifact, cuda_graph=True) as runner:
        letterbox = None
        for visit, shape in enumerate([hi, lo, hi, lo]):
            runner.set_shape(tuple(shape))
            letterbox = letterbox or runner.gpu_letterbox()
            hw = tuple(shape[2:])
            for batch in batches[visit % 2:visit % 2 + 2]:
                batch = (batch * 2)[:shape[0]]
                blob, cpu_boxes = preprocess(batch, hw)
                assert letterbox.run(batch, hw) == cpu_boxes
                runner.sync()
                got = letterbox.read_input()
                assert got.shape == blob.shape and float(np.abs(got - blob).max()) <= GPU_LETTERBOX_TOLERANCE
                runner.execute()
                np.testing.assert_allclose(runner.d2h()["output0"], got, atol=1e-6)
        settings = runner.settings()
        assert settings["cuda_graph"] is True and "cuda_graph_note" not in settings, settings
        assert len(runner.graphs) == 4  # letterbox and engine, at each shape


def test_gpu_letterbox_from_pinned_frames(tmp_path):
    """Frames page-locked once (bench does) upload straight from their own memory, with the same result."""
    hw = tuple(INPUT[2:])
    batch = frames(1)[0]
    with TrtRunner(engine(tmp_path, INPUT, False), cuda_graph=True) as runner:
        runner.set_shape(tuple(INPUT))
        letterbox = runner.gpu_letterbox()
        letterbox.run(batch, hw)
        before = letterbox.read_input()
        runner.pin(batch)
        letterbox.run(batch, hw)
        np.testing.assert_array_equal(letterbox.read_input(), before)
        assert runner.copy_ms()["h2d"] > 0


def head_of(rng, clustered: bool) -> np.ndarray:
    """A one-to-many head `HEAD` with 200 anchors above 0.25 at random, or 700 in 12 clusters of near-equal boxes of
    two classes, their scores in steps of 0.05 (ties ranked by anchor): more than max_det, overlapping around the
    IoU threshold."""
    head = np.zeros(HEAD, np.float32)
    head[0, :2] = rng.uniform(0, 640, (2, HEAD[2]))  # cx, cy
    head[0, 2:4] = rng.uniform(4, 60, (2, HEAD[2]))  # w, h
    head[0, 4:] = rng.uniform(0, 0.2, (20, HEAD[2]))
    hits = rng.choice(HEAD[2], 700 if clustered else 200, replace=False)
    scores = rng.uniform(0.2, 1, len(hits))
    if clustered:
        centres = rng.uniform(100, 540, (12, 2))[np.arange(len(hits)) % 12]
        head[0, :2, hits] = centres + rng.normal(0, 6, (len(hits), 2))
        head[0, 2:4, hits] = 80 + rng.normal(0, 6, (len(hits), 2))
        scores = np.round(scores * 20) / 20
    head[0, 4 + rng.integers(0, 2 if clustered else 20, len(hits)), hits] = scores
    return head


@pytest.mark.parametrize("fp16", [False, True], ids=["float-output", "half-output"])
@pytest.mark.parametrize("graph", [False, True], ids=["plain", "cuda-graph"])
def test_gpu_filter_and_nms_give_the_host_decode(tmp_path, fp16, graph):
    """Filter, NMS and the way back to the source image on the GPU == the whole output decoded and scaled on the
    host (OpenCV's NMS), detection for detection: scattered boxes, and clusters with tied scores past max_det, at two
    IoU thresholds and max_det, from sources of four sizes; too many rows -> None, and the next run counts afresh."""
    rng = np.random.default_rng(2)
    with TrtRunner(engine(tmp_path, HEAD_INPUT, fp16, HEAD), cuda_graph=graph) as runner:
        runner.set_shape(tuple(HEAD_INPUT))
        score_filter = runner.gpu_score_filter()
        for clustered, source in ((False, (480, 640)), (True, (720, 1280)), (False, (1080, 810)), (True, (333, 517))):
            boxes = [fit(*source, (640, 640))[2]]
            runner.h2d(head_of(rng, clustered).reshape(HEAD_INPUT))
            runner.execute()
            full = runner.d2h()["output0"]
            for iou, max_det in ((0.7, 300), (0.45, 50)):
                dets, = score_filter.run(0.25, iou, max_det, boxes)
                expected = postprocess(full, boxes, 0.25, iou, max_det)[0]
                assert 0 < len(dets) < max_det if clustered else 0 < len(dets) <= max_det  # clusters: suppressed
                np.testing.assert_array_equal(dets, expected)
        assert score_filter.run(0.0, 0.7, 300, boxes) == [None]  # every anchor qualifies: more than the cap
        np.testing.assert_array_equal(score_filter.run(0.25, 0.7, 300, boxes)[0],  # counted from zero again
                                      postprocess(full, boxes, 0.25, 0.7, 300)[0])


def test_gpu_letterbox_at_every_batch_of_a_dynamic_engine(tmp_path):
    """set_shape to batches 3, 1, 4, 2 in turn, two batches of frames each (plain, then a graph replayed): each batch,
    part pinned and part staged, letterboxes as the CPU does, and the engine reads it."""
    hw, rng = tuple(INPUT[2:]), np.random.default_rng(4)
    pool = [image for batch in frames(5) for image in batch]
    with TrtRunner(engine(tmp_path, INPUT, True, batches=(1, 2, 4)), cuda_graph=True) as runner:
        letterbox = runner.gpu_letterbox()
        runner.pin(pool[3:5])  # the two largest: the others upload through the staging buffer
        for batch in (3, 1, 4, 2):
            runner.set_shape((batch, *INPUT[1:]))
            for _ in range(2):
                chosen = [pool[i] for i in rng.choice(len(pool), batch, replace=False)]
                blob, cpu_boxes = preprocess(chosen, hw)
                assert letterbox.run(chosen, hw) == cpu_boxes
                runner.sync()
                got = letterbox.read_input()
                assert got.shape == blob.shape
                assert float(np.abs(got - blob).max()) <= GPU_LETTERBOX_TOLERANCE
                runner.execute()
                np.testing.assert_allclose(runner.d2h()["output0"], got, atol=1e-3)
        assert runner.settings()["cuda_graph"] is True


def test_gpu_nms_per_image_at_batch_on_a_dynamic_engine(tmp_path):
    """Batch 3 of heads with their own candidate counts, one past the cap: the others still match the host decode."""
    rng, batch = np.random.default_rng(6), 3
    heads = np.zeros((batch, *HEAD[1:]), np.float32)
    heads[:, :2] = rng.uniform(0, 640, (batch, 2, HEAD[2]))
    heads[:, 2:4] = rng.uniform(4, 60, (batch, 2, HEAD[2]))
    heads[:, 4:] = rng.uniform(0, 0.2, (batch, 20, HEAD[2]))
    for n, hits in enumerate((50, 300, CANDIDATE_CAP + 100)):
        anchors = rng.choice(HEAD[2], hits, replace=False)
        heads[n, 4 + rng.integers(0, 20, hits), anchors] = rng.uniform(0.3, 1, hits)
    boxes = [fit(h, w, (640, 640))[2] for h, w in ((480, 640), (1280, 720), (640, 640))]
    with TrtRunner(engine(tmp_path, HEAD_INPUT, False, [-1, *HEAD[1:]], batches=(1, 2, 4))) as runner:
        score_filter = runner.gpu_score_filter()
        runner.set_shape((1, *HEAD_INPUT[1:]))
        runner.h2d(heads[:1].reshape(1, *HEAD_INPUT[1:]))
        runner.execute()
        assert len(score_filter.run(0.25, 0.7, 300, boxes[:1])) == 1
        runner.set_shape((batch, *HEAD_INPUT[1:]))
        runner.h2d(heads.reshape(batch, *HEAD_INPUT[1:]))
        runner.execute()
        dets = score_filter.run(0.25, 0.7, 300, boxes)
        full = runner.d2h()["output0"]
    assert dets[2] is None  # past the cap: the chain decodes the whole output
    expected = postprocess(full, boxes)
    for n in (0, 1):
        assert len(dets[n]) > 0
        np.testing.assert_array_equal(dets[n], expected[n])


def test_offline_on_a_dynamic_engine_with_both_gpu_ends(tmp_path):
    """The offline scenario at batches 1, 2 and 4 of a dynamic engine through the GPU letterbox and score filter:
    8 is past the profile; the engine alone outruns the chain that waits for the host's NMS."""
    batches = frames(7)
    images = [batches[1][1], batches[2][0]]  # 810x1080 noise, a 480x640 gradient
    cfg = BenchConfig(warmup=2, warmup_s=0, iters=5, min_timed_s=0, offline_batches=[1, 2, 4, 8],
                      offline_images=16)
    profile = [[b, *HEAD_INPUT[1:]] for b in (1, 2, 4)]
    with TrtRunner(engine(tmp_path, HEAD_INPUT, True, [-1, *HEAD[1:]], batches=(1, 2, 4))) as runner:
        chain = Chain(runner.gpu_letterbox(), runner.gpu_score_filter(), overlap=runner.overlapped(fit, True))
        result = bench(runner, chain, images, list(HEAD_INPUT), cfg, profile)
    assert result.settings["offline"].startswith("overlapped")
    assert [p.batch for p in result.offline] == [1, 2, 4]
    assert result.offline_skipped == {"8": "the built profile holds batches 1..4"}
    for point in result.offline:
        assert 0 < point.e2e_img_s < point.engine_img_s
    print("offline:", ", ".join(f"batch {p.batch}: {p.e2e_img_s:.0f} img/s e2e, {p.engine_img_s:.0f} engine"
                                for p in result.offline))


def test_a_half_input_engine_takes_the_gpu_letterbox_in_fp16(tmp_path):
    """backend.half_input: an fp16 engine of an fp32 ONNX reads half, written by the letterbox as the CPU one is."""
    path = onnx_model(tmp_path / "float.onnx", INPUT, False)
    built = build_engine(BuildSpec(onnx_path=path, precision="fp16", mechanism="builder_flag", min_shape=INPUT,
                                   opt_shape=INPUT, max_shape=INPUT, optimization_level=0, workspace_gib=1.0,
                                   cache_dir=str(tmp_path / "cache"), half_input=True))
    batch = frames(2)[0]
    blob = preprocess(batch, tuple(INPUT[2:]))[0]
    with TrtRunner(built.artifact) as runner:
        assert runner.input_dtype == np.float16 and runner.dtypes["output0"] == np.float32
        letterbox = runner.gpu_letterbox()
        runner.set_shape(tuple(INPUT))
        letterbox.run(batch, tuple(INPUT[2:]))
        runner.execute()
        assert np.abs(letterbox.read_input() - blob).max() <= GPU_LETTERBOX_TOLERANCE
        assert np.abs(runner.d2h()["output0"] - blob).max() <= GPU_LETTERBOX_TOLERANCE


@pytest.mark.parametrize(("gpu_post", "conf"), [(True, 0.9), (True, 0.25), (False, 0.25)],
                         ids=["gpu-post", "gpu-post-past-the-cap", "cpu-post"])
def test_overlapped_offline_gives_the_detections_of_one_batch_at_a_time(tmp_path, gpu_post, conf):
    """Six batches through the overlapped offline chain (uploads on the copy stream, two slots, an engine graph)
    give exactly what the same ends give one batch at a time: the noise frames at conf 0.25 pass the filter's cap,
    and their batches run again through the chain."""
    batches = frames(11) * 2
    hw = tuple(HEAD_INPUT[2:])
    with TrtRunner(engine(tmp_path, HEAD_INPUT, True, [-1, *HEAD[1:]], batches=(1, 2, 4)), cuda_graph=True) as runner:
        letterbox, score_filter = runner.gpu_letterbox(), runner.gpu_score_filter() if gpu_post else None
        runner.set_shape((2, *HEAD_INPUT[1:]))
        expected = list(Chain(letterbox, score_filter, conf=conf).stream(runner, batches, hw))
        overlapped = Chain(letterbox, score_filter, conf=conf, overlap=runner.overlapped(fit, gpu_post))
        got = list(overlapped.stream(runner, batches, hw))
    assert len(got) == len(expected) == 6
    assert sum(len(d) for batch in got for d in batch) > 0
    for ours, theirs in zip(got, expected):
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("pre", "post", "conf"), [("gpu", "gpu", 0.9), ("gpu", "gpu", 0.25), ("cpu", "gpu", 0.9),
                                                  ("gpu", "cpu", 0.9), ("cpu", "cpu", 0.9)],
                         ids=["gpu-ends", "gpu-ends-past-the-cap", "cpu-pre", "cpu-post", "cpu-ends"])
def test_a_run_queued_with_one_wait_gives_the_staged_detections(tmp_path, pre, post, conf):
    """On TensorRT a run is queued and waited for once, whichever ends run on the GPU: the same detections as each
    stage run and waited for in turn (`pre`, `execute`, `post`), each stage's time within the end to end."""
    hw = tuple(HEAD_INPUT[2:])
    cfg, = preflight([f"preprocess={pre}", f"postprocess={post}", f"validate.conf={conf}"])
    with TrtRunner(engine(tmp_path, HEAD_INPUT, True, [-1, *HEAD[1:]], batches=(1, 2, 4)), cuda_graph=True) as runner:
        chain = prepost.chain(runner, cfg, ONE2MANY)
        assert chain.queued and chain.settings()["stage_timer"] == prepost.ONE_WAIT
        for n, frames_ in enumerate(frames(13) * 2):
            runner.set_shape((2, *HEAD_INPUT[1:]))
            dets, times = chain.run(runner, frames_, hw)
            boxes = chain.pre(runner, frames_, hw)
            runner.execute()
            for ours, theirs in zip(dets, chain.post(runner, boxes), strict=True):
                np.testing.assert_array_equal(ours, theirs)
            assert 0 < times["preprocess"] and 0 < times["infer"] and 0 < times["postprocess"]
            if n >= 3:  # warm: the first runs capture the CUDA graphs, which waits on the stream inside pre's queueing
                assert times["preprocess"] + times["infer"] + times["postprocess"] <= times["e2e"] * 1.05 + 0.05


def test_bench_offline_overlap_false_runs_the_offline_batches_one_at_a_time(tmp_path):
    on, off = (preflight(["preprocess=gpu", "postprocess=gpu", f"bench.offline_overlap={flag}"])[0]
               for flag in ("true", "false"))
    with TrtRunner(engine(tmp_path, HEAD_INPUT, True, [-1, *HEAD[1:]], batches=(1, 2, 4))) as runner:
        assert prepost.chain(runner, on, ONE2MANY).settings()["offline"].startswith("overlapped")
        assert prepost.chain(runner, off, ONE2MANY).settings()["offline"] == "one batch at a time"


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_throughput_on_one_and_two_streams(tmp_path, cuda_graph):
    single = [1, *INPUT[1:]]
    with TrtRunner(engine(tmp_path, single, False), cuda_graph=cuda_graph) as runner:
        one = images_per_second(runner, tuple(single), 1, 200)
        two = images_per_second(runner, tuple(single), 2, 200)
        with runner.lanes(tuple(single), 2) as lanes:
            for _ in range(3):
                lanes.enqueue()
            assert lanes.graphs == cuda_graph  # the lanes replay graphs where the runner does
        x = np.random.default_rng(3).random(single, dtype=np.float32)
        np.testing.assert_allclose(runner.infer(x)["output0"], x)  # the runner still works afterwards
        with pytest.raises(ShapeError, match="does not take"):
            images_per_second(runner, (2, *INPUT[1:]), 1, 10)
    print(f"throughput: {one:.0f} img/s on one stream, {two:.0f} img/s on two")
    assert one > 0 and two > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_engine_ending_at_the_head_maps_decodes_to_the_whole_heads_output(tmp_path, export_cache, precision):
    """backend.head_maps on the 128-px yolov8n, dynamic, the maps in the engine's precision: the host decode of the
    engine's maps against onnxruntime's whole graph, and the GPU decode in the score filter against the host's,
    detection for detection, at batch 1 and at batch 2 non-square."""
    reference = export_onnx(export_spec("ultralytics", dynamic=True, imgsz=SMALL_IMGSZ), export_cache)
    cut = head_maps_onnx(reference, tmp_path)
    built = build_engine(BuildSpec(onnx_path=cut.path, precision=precision,
                                   mechanism="builder_flag" if precision == "fp16" else "none",
                                   min_shape=[1, 3, 64, 64], opt_shape=[2, 3, 128, 128], max_shape=[2, 3, 128, 128],
                                   optimization_level=0, workspace_gib=1.0, cache_dir=str(tmp_path / "cache"),
                                   half_outputs=precision == "fp16"))
    whole = open_reference(reference.path)
    with TrtRunner(built.artifact, cuda_graph=True, head_maps=cut.head_maps) as runner:
        assert {runner.dtypes[name] for name in cut.head_maps["maps"]} == {np.dtype(precision.replace("fp", "float"))}
        score_filter = runner.gpu_score_filter()
        for batch in (frames(21)[0][:1], frames(22)[2]):
            hw = (128, 128) if len(batch) == 1 else (96, 128)
            blob, boxes = preprocess(batch, hw)
            ours = runner.infer(blob)
            assert list(ours) == ["output0"]
            rel_l2 = tensor_metrics(ours["output0"], whole.infer(blob)["output0"], 1e-3, 1e-3)["rel_l2"]
            assert rel_l2 < (1e-5 if precision == "fp32" else 3e-3), rel_l2
            on_host = Chain(conf=0.01).post(runner, boxes)
            on_gpu = Chain(score_filter=score_filter, conf=0.01).post(runner, boxes)
            assert sum(len(d) for d in on_host) > 0
            for a, b in zip(on_gpu, on_host, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    whole.close()
