"""`runner sensitivity`: the fewest layers to keep in float so that a Q/DQ int8 model stays within an mAP50-95
limit of its fp32 reference, written as a precision config a sweep can take.

Runs on the CPU with onnxruntime, which runs the Q/DQ ONNX in int8. The model is calibrated once: every candidate
is that all-quantized ONNX with the inputs of the chosen nodes taken from before their QuantizeLinear (the node runs
in float), so a candidate costs an inference pass, not a calibration.

- Sensitivity of a node: the mAP50-95 it recovers when it alone is kept in float, on the first `--images` images.
  The other measure (the drop when only it is quantized) costs the same pass per node; this one is taken where the
  greedy starts, so its first pick is exact, while single-node drops of an otherwise float model sit below what
  mAP on a few images resolves. Ties (many on few images) go to the larger cut in the outputs' rel-L2 against fp32.
- Greedy: nodes in ranked order are kept in float until the drop on those images is within `--limit`, or
  `--max-evals` evaluations or `--max-minutes` are spent (a line per evaluation).
- Confirm: the set found is quantized for real (`quantize_variant(keep_float=...)`, as a sweep makes it) and measured
  on the variant's validation images (`data.limit`, the whole held-out split by default here). Where it misses the
  limit there, the greedy goes on on those images, within the same budget, and confirms again.
- Prune: the greedy takes layers by their rank alone, so a later one can make an earlier one needless. Once the set
  meets the limit, each layer, first taken first, goes back to int8 where the rest still meet the limit on the
  confirm images; the smaller set is confirmed again, and stands only where the real quantizer's model meets it too.
Latency per node needs TensorRT (`--latency`, per greedy and pruning step, with the variant's TensorRT build);
without it the result says it was not measured.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import yaml

from runner.arguments import OneLineParser, positive
from runner.config import BackendName, ConfigError, Int8Mode, Mechanism, Precision, RunConfig, to_plain
from runner.data import HELD_OUT_COUNT, load_samples
from runner.backends.onnxruntime import session_options
from runner.bench import run_until, runs_text
from runner.metrics import mean_average_precision, tensor_metrics
from runner.processing import postprocess, preprocess
from runner.quantize import calibration_set, keep_in_float, kept_float, quantize_variant, quantized_nodes
from runner.results import ExportResult, StageError

USAGE_EXIT, NOT_MET_EXIT = 2, 1
CONFIG_NAME = "int8_qdq_pinned"  # the precision option written: precision=int8_qdq_pinned
DEFAULTS = ["precision=int8_qdq", f"data.limit={HELD_OUT_COUNT}"]  # before the user's overrides


@dataclass
class Images:
    """Letterboxed inputs, their boxes, labels, and the fp32 reference's first output on each."""
    blobs: list[np.ndarray]
    boxes: list
    truth: list[tuple[np.ndarray, np.ndarray]]
    reference: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blobs)

    def head(self, count: int) -> Images:
        return Images(self.blobs[:count], self.boxes[:count], self.truth[:count], self.reference[:count])


@dataclass
class Score:
    map50_95: float
    rel_l2: float  # of the first output against the fp32 reference's


@dataclass
class Layer:
    """One quantized node, or a block of them (`--group block`): its mAP50-95 with it alone kept in float, what
    that recovers, and after the greedy kept it, the mAP with every layer up to it in float."""
    name: str
    op: str  # the node's op; a block's ops, counted
    nodes: list[str]
    pattern: str  # its keep_float entry
    alone_float: Score | None = None
    recovered: float | None = None
    kept_map50_95: float | None = None
    kept_images: int = 0  # the images `kept_map50_95` is measured on
    images: int = 0  # the images `alone_float` is measured on
    latency_ms: float | None = None  # with every node up to it in float (TensorRT, --latency)
    pruned: Score | None = None  # once pruning put it back in int8: the set left, on the confirm images
    pruned_latency_ms: float | None = None  # the set left (TensorRT, --latency)


@dataclass
class Outcome:
    model: str
    limit: float
    images: int
    confirm_images: int
    calibrator: str
    reference_map50_95: float
    quantized: Score  # all candidates quantized, on the ranking images
    ranked: list[Layer]
    kept: list[str]  # the layers kept in float, in the order the greedy took them, less those pruned
    keep_float: list[str]  # the config's patterns: precision.keep_float given, then one per layer kept
    estimate: Score  # with the greedy's first set in float, on the ranking images
    confirmed_reference_map50_95: float
    confirmed: Score | None = None  # the real quantize_variant(keep_float=kept), on the confirm images
    stopped_by: str = ""  # limit | budget: evals | budget: minutes | no nodes left
    latency: str = "not measured: TensorRT is not here"
    latency_ms: float | None = None  # TensorRT infer p50 with every candidate quantized (--latency)
    evals: int = 0
    seconds: float = 0.0
    differs: str = ""  # where the real quantizer's model for `kept` is not the one searched, how
    precision: dict = field(default_factory=dict)  # the precision config searched, as plain values
    taken: list[str] = field(default_factory=list)  # every layer the greedy took, in order, pruned ones too

    @property
    def drop(self) -> float:
        return self.confirmed_reference_map50_95 - self.confirmed.map50_95

    @property
    def met(self) -> bool:
        return self.confirmed is not None and self.drop <= self.limit

    @property
    def pruned_count(self) -> int:
        """How many layers the greedy took that pruning put back in int8."""
        return len(self.taken) - len(self.kept)


def layers(nodes: list[tuple[str, str]], group: str) -> list[Layer]:
    """The candidates searched: each node, or each block (ultralytics names a node `/model.<i>/...`; a node named
    otherwise is its own block)."""
    if group == "node":
        return [Layer(name, op, [name], pattern(name)) for name, op in nodes]
    blocks: dict[str, list[tuple[str, str]]] = {}
    for name, op in nodes:
        parts = name.split("/")
        blocks.setdefault(f"/{parts[1]}/" if name.startswith("/") and len(parts) > 2 else name, []).append((name, op))
    return [Layer(block, ", ".join(f"{sum(o == op for _, o in members)} {op}"
                                   for op in dict.fromkeys(o for _, o in members)),
                  [n for n, _ in members], pattern(block) + "*" if block.endswith("/") else pattern(block))
            for block, members in blocks.items()]


def pattern(name: str) -> str:
    """An fnmatch pattern that matches exactly `name` (keep_float entries are patterns)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class Evaluator:
    """mAP50-95 and rel-L2 of ONNX models (bytes) on `Images`, with the variant's decode and thresholds."""

    def __init__(self, cfg: RunConfig, head: str):
        self.v, self.head, self.count = cfg.validate, head, 0

    def outputs(self, model: bytes, images: Images) -> list[np.ndarray]:
        import onnxruntime as ort

        options = session_options()
        options.log_severity_level = 3  # an unused initializer's warning says nothing here
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return [session.run(None, {name: blob})[0] for blob in images.blobs]

    def score(self, model: bytes, images: Images, counted: bool = True) -> Score:
        """`counted`: one of the search's evaluations, which the budget bounds (confirming is not)."""
        self.count += counted
        outs = self.outputs(model, images)
        return Score(self.map50_95(outs, images), _rel_l2(outs, images.reference))

    def map50_95(self, outs: list[np.ndarray], images: Images) -> float:
        dets = [d for out, boxes in zip(outs, images.boxes)
                for d in postprocess(out, boxes, self.v.conf, self.v.nms_iou, self.v.max_det, self.head)]
        return mean_average_precision(dets, images.truth).get("map50_95", 0.0)


def _rel_l2(outs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return tensor_metrics(np.concatenate([o.ravel() for o in outs]), np.concatenate([r.ravel() for r in reference]),
                          0.0, 0.0)["rel_l2"]


@dataclass
class Budget:
    evals: int
    minutes: float
    start: float = field(default_factory=time.monotonic)

    def spent(self, evals: int) -> str | None:
        if evals >= self.evals:
            return "budget: evals"
        if time.monotonic() - self.start >= self.minutes * 60:
            return "budget: minutes"
        return None


def rank(evaluator: Evaluator, model: onnx.ModelProto, pinned: set[str], images: Images, quantized: Score,
         searched: list[Layer], budget: Budget) -> tuple[list[Layer], str | None]:
    """The `searched` layers with their sensitivity, most sensitive first; the budget line where it ran out
    before all were measured."""
    for i, layer in enumerate(searched, 1):
        if stop := budget.spent(evaluator.count):
            print(f"sensitivity: {stop} spent after ranking {i - 1} of {len(searched)}", flush=True)
            return _ranked(searched), stop
        layer.alone_float = evaluator.score(keep_in_float(model, pinned | set(layer.nodes)).SerializeToString(),
                                            images)
        layer.recovered, layer.images = layer.alone_float.map50_95 - quantized.map50_95, len(images)
        _progress(f"rank {i}/{len(searched)}", layer.name, layer.alone_float, evaluator, budget,
                  f"recovers {layer.recovered:+.4f}")
    return _ranked(searched), None


def _ranked(layers: list[Layer]) -> list[Layer]:
    measured = [la for la in layers if la.alone_float is not None]
    return sorted(measured, key=lambda la: (-la.recovered, la.alone_float.rel_l2))


def greedy(evaluator: Evaluator, model: onnx.ModelProto, pinned: set[str], images: Images, ranked: list[Layer],
           reference_map: float, score: Score, limit: float, budget: Budget, kept: list[Layer] = ()
           ) -> tuple[list[Layer], Score, str]:
    """Keep ranked layers in float, in order, after those `kept` (whose `score` it is), until the drop on `images` is
    within `limit`: (kept, its score, why it stopped)."""
    kept = list(kept)
    for layer in (la for la in ranked if la not in kept):
        if reference_map - score.map50_95 <= limit:
            return kept, score, "limit"
        if stop := budget.spent(evaluator.count):
            return kept, score, stop
        kept.append(layer)
        reuse = len(kept) == 1 and len(images) == layer.images  # the ranking measured this very model
        score = layer.alone_float if reuse else evaluator.score(
            keep_in_float(model, pinned | nodes_of(kept)).SerializeToString(), images)
        layer.kept_map50_95, layer.kept_images = score.map50_95, len(images)
        _progress(f"keep {len(kept)} on {len(images)} images", layer.name, score, evaluator, budget,
                  f"drop {reference_map - score.map50_95:.4f}")
    return kept, score, "limit" if reference_map - score.map50_95 <= limit else "no layers left"


def prune(kept: list[Layer], score_of: Callable[[list[Layer]], Score], reference_map: float, limit: float,
          spent: Callable[[], str | None]) -> list[Layer]:
    """The layers of `kept` left once each, first taken first, is put back in int8 where `score_of` the rest is
    still within `limit` of `reference_map`; `spent` stops it early with the budget line. Each layer put back
    records the score of the set left (`Layer.pruned`)."""
    kept = list(kept)
    for layer in list(kept):
        if spent():
            break
        rest = [la for la in kept if la is not layer]
        score = score_of(rest)
        if reference_map - score.map50_95 <= limit:
            kept, layer.pruned = rest, score
    return kept


def nodes_of(kept: list[Layer]) -> set[str]:
    return {n for layer in kept for n in layer.nodes}


def _progress(step: str, name: str, score: Score, evaluator: Evaluator, budget: Budget, extra: str,
              now: str = "float") -> None:
    print(f"sensitivity: [{evaluator.count}/{budget.evals} evals, {time.monotonic() - budget.start:.0f} s] {step}: "
          f"{name} {now}: mAP50-95 {score.map50_95:.4f}, {extra}, rel-L2 {score.rel_l2:.3e}", flush=True)


def load_images(cfg: RunConfig, names: list[str], head: str) -> Images:
    """The variant's validation images (`data.limit`), letterboxed at `model.imgsz`; only labelled ones count."""
    samples, _ = load_samples(cfg.data.images, cfg.data.labels, cfg.data.limit, Path(cfg.outputs),
                              len(names) or None)
    samples = [s for s in samples if s.gt_cls is not None]
    if not samples:
        raise ConfigError(f"data: no labelled images among the first {cfg.data.limit} of "
                          f"{cfg.data.images or 'the held-out split'}; mAP needs labels (data.labels=DIR)")
    blobs, boxes = zip(*(preprocess([s.image], tuple(cfg.model.imgsz), head=head) for s in samples))
    return Images(list(blobs), list(boxes), [(s.gt_cls, s.gt_boxes) for s in samples])


def search(cfg: RunConfig, images: int, limit: float, budget: Budget, group: str = "node",
           latency: bool = False) -> Outcome:
    """Rank, keep greedily, confirm with the real quantizer; see the module's docstring."""
    from runner.variant import export_stage, output_head

    reference = export_stage(cfg, Mechanism.none, BackendName.onnxruntime).reference
    pinned, ops, method = list(cfg.precision.keep_float), list(cfg.precision.qdq_ops), cfg.precision.calibrator.value
    calibration = calibration_set(cfg)
    quantized_onnx = quantize_variant(cfg, reference, calibration=calibration)
    head = output_head(ExportResult(cfg.model.weights, reference, quantized_onnx))
    model = onnx.load(quantized_onnx.path)
    pinned_nodes = set(kept_float(model, pinned))
    quantized_names = set(quantized_nodes(onnx.load(reference.path), ops, pinned))
    searched = layers([(n.name, n.op_type) for n in model.graph.node if n.name in quantized_names], group)
    evaluator = Evaluator(cfg, head)
    every = load_images(cfg, reference.names, head)
    every.reference = evaluator.outputs(Path(reference.path).read_bytes(), every)
    subset = every.head(images)
    reference_map = evaluator.map50_95(subset.reference, subset)
    quantized = evaluator.score(model.SerializeToString(), subset)
    print(f"sensitivity: {cfg.model.label} on {len(subset)} images: fp32 mAP50-95 {reference_map:.4f}, Q/DQ int8 "
          f"{quantized.map50_95:.4f} (drop {reference_map - quantized.map50_95:.4f}, limit {limit}); "
          f"{len(searched)} {group}s to rank", flush=True)
    ranked, stop = rank(evaluator, model, pinned_nodes, subset, quantized, searched, budget)
    kept, estimate, stopped_by = ([], quantized, stop) if stop else greedy(
        evaluator, model, pinned_nodes, subset, ranked, reference_map, quantized, limit, budget)
    outcome = Outcome(cfg.model.label, limit, len(subset), len(every), method, reference_map, quantized, ranked,
                      [], [], estimate, evaluator.map50_95(every.reference, every))
    while True:
        final = _confirm(cfg, reference, calibration, evaluator, every, outcome, pinned, kept)
        if outcome.met or stopped_by != "limit" or len(subset) == len(every):
            break
        kept, _, stopped_by = greedy(evaluator, model, pinned_nodes, every, ranked,
                                     outcome.confirmed_reference_map50_95, outcome.confirmed, limit, budget, kept)
    taken = kept
    outcome.taken = [la.name for la in taken]
    if outcome.met and kept:
        kept, final = _prune(cfg, reference, calibration, evaluator, model, (pinned, pinned_nodes), every, outcome,
                             kept, final, budget)
    outcome.stopped_by, outcome.evals = stopped_by, evaluator.count
    outcome.precision = to_plain(cfg)["precision"]
    outcome.differs = _differs(evaluator, keep_in_float(model, pinned_nodes | nodes_of(kept)), final.path, subset)
    if latency:
        outcome.latency, outcome.latency_ms = measure_latency(cfg, reference, model, pinned_nodes, taken)
    outcome.seconds = time.monotonic() - budget.start
    return outcome


def _confirm(cfg: RunConfig, reference, calibration, evaluator: Evaluator, every: Images, outcome: Outcome,
             pinned: list[str], kept: list[Layer]):
    """`kept` quantized for real and scored on the confirm images, into `outcome`; returns the quantizer's ONNX."""
    outcome.kept, outcome.keep_float = [la.name for la in kept], pinned + [la.pattern for la in kept]
    final = quantize_variant(cfg, reference, outcome.keep_float, calibration)
    outcome.confirmed = evaluator.score(Path(final.path).read_bytes(), every, counted=False)
    print(f"sensitivity: confirm {len(kept)} layer(s) in float on {len(every)} images: drop {outcome.drop:.4f}",
          flush=True)
    return final


def _prune(cfg: RunConfig, reference, calibration, evaluator: Evaluator, model: onnx.ModelProto,
           pinned: tuple[list[str], set[str]], every: Images, outcome: Outcome, kept: list[Layer], final,
           budget: Budget):
    """`prune` on the confirm images, then the smaller set confirmed; where the quantizer's model misses the limit
    with it, the greedy's set and its confirmation stand. `pinned`: the config's patterns and their nodes. Returns
    the set and its quantizer's ONNX."""
    patterns, nodes = pinned
    reference_map = outcome.confirmed_reference_map50_95

    def score_of(rest: list[Layer]) -> Score:
        score = evaluator.score(keep_in_float(model, nodes | nodes_of(rest)).SerializeToString(), every)
        _progress(f"prune on {len(every)} images", ", ".join(la.name for la in rest) or "nothing", score, evaluator,
                  budget, f"drop {reference_map - score.map50_95:.4f}", now="left in float")
        return score

    left = prune(kept, score_of, reference_map, outcome.limit, lambda: budget.spent(evaluator.count))
    if len(left) == len(kept):
        return kept, final
    greedys = outcome.kept, outcome.keep_float, outcome.confirmed
    smaller = _confirm(cfg, reference, calibration, evaluator, every, outcome, patterns, left)
    if outcome.met:
        return left, smaller
    print("sensitivity: the quantizer's model misses the limit with the pruned set: the greedy's set stands",
          flush=True)
    for la in kept:
        la.pruned = None
    outcome.kept, outcome.keep_float, outcome.confirmed = greedys
    return kept, final


def _differs(evaluator: Evaluator, searched: onnx.ModelProto, final: str, images: Images) -> str:
    """Where the quantizer's model for the set found computes otherwise than the model the search measured, how
    much (the rel-L2 between their outputs); '' where they agree."""
    ours, real = (evaluator.outputs(m, images) for m in (searched.SerializeToString(), Path(final).read_bytes()))
    gap = _rel_l2(real, ours)
    return f"quantize_qdq(keep_float) makes another model than the one searched (rel-L2 {gap:.2e})" if gap > 1e-6 \
        else ""


def measure_latency(cfg: RunConfig, reference, model: onnx.ModelProto, pinned: set[str],
                    taken: list[Layer]) -> tuple[str, float | None]:
    """TensorRT infer p50 of each greedy step's ONNX, then of the set left after each layer pruned (the variant's
    build settings), warmed up and timed as the sweep's chain loop is (`bench.warmup`/`warmup_s`,
    `bench.iters`/`min_timed_s`), into its `Layer`; returns what was measured, or why not, and the p50 with every
    candidate quantized."""
    from runner import backends
    from runner.export import signature

    if problem := backends.unavailable(BackendName.tensorrt.value):
        return f"not measured: {problem}", None
    backend = backends.get(BackendName.tensorrt.value)
    trt_cfg, _ = backends.resolve_auto(replace(cfg, backend=replace(cfg.backend, name=BackendName.tensorrt)),
                                       backend)
    folder = Path(cfg.outputs) / "sensitivity" / cfg.model.label / "latency"
    folder.mkdir(parents=True, exist_ok=True)
    steps = [(f"{step} layer(s) in float", taken[:step], taken[step - 1] if step else None, "latency_ms")
             for step in range(len(taken) + 1)]
    left = list(taken)
    for layer in (la for la in taken if la.pruned is not None):
        left = [la for la in left if la is not layer]
        steps.append((f"{len(left)} layer(s) in float, {layer.name} pruned", left, layer, "pruned_latency_ms"))
    quantized_ms = None
    for i, (what, in_float, layer, attribute) in enumerate(steps):
        path = folder / f"step{i}.onnx"
        step_model = keep_in_float(model, pinned | nodes_of(in_float))
        onnx.save(step_model, str(path))
        tested = replace(reference, path=str(path), precision=Precision.int8.value, signature=signature(step_model))
        build = backend.build(trt_cfg, ExportResult(cfg.model.weights, reference, tested))
        with backend.runner(trt_cfg, build) as runner:
            runner.set_shape(tuple(build.profile[1]))
            runner.h2d(np.zeros(build.profile[1], np.float32))
            times: list[float] = []
            run_until(cfg.bench.warmup, cfg.bench.warmup_s, lambda _: runner.execute())
            run_until(cfg.bench.iters, cfg.bench.min_timed_s, lambda _: times.append(runner.execute()))
        ms = float(np.median(times))
        if layer is None:
            quantized_ms = ms
        else:
            setattr(layer, attribute, ms)
        print(f"sensitivity: latency with {what}: infer p50 {ms:.3f} ms", flush=True)
    b = cfg.bench
    return (f"TensorRT infer p50 per greedy and pruning step (warm-up {runs_text(b.warmup, b.warmup_s)}, timed at "
            f"least {runs_text(b.iters, b.min_timed_s)})"), quantized_ms


def write(outcome: Outcome, out: Path, command: str) -> list[Path]:
    """precision/<CONFIG_NAME>.yaml (a config group Hydra finds with `hydra.searchpath`), sensitivity.json and
    sensitivity.csv under `out`; returns their paths."""
    config = out / "precision" / f"{CONFIG_NAME}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    searched = {key: value for key, value in outcome.precision.items() if key != "keep_float"}
    config.write_text(f"# {command}\n# {summary_line(outcome)}\n"
                      + yaml.safe_dump({**searched, "keep_float": outcome.keep_float}, sort_keys=False))
    report = out / "sensitivity.json"
    report.write_text(json.dumps({"command": command, "met": outcome.met, "drop": outcome.drop,
                                  **asdict(outcome)}, indent=1) + "\n")
    table = out / "sensitivity.csv"
    with table.open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["rank", "layer", "op", "map50_95_alone_float", "recovered", "rel_l2_alone_float", "kept",
                       "map50_95_after_keeping", "on_images", "latency_ms", "pruned", "map50_95_after_pruning",
                       "latency_ms_after_pruning"])
        for i, la in enumerate(outcome.ranked, 1):
            rows.writerow([i, la.name, la.op, f"{la.alone_float.map50_95:.4f}", f"{la.recovered:.4f}",
                           f"{la.alone_float.rel_l2:.4e}", la.name in outcome.kept,
                           "" if la.kept_map50_95 is None else f"{la.kept_map50_95:.4f}", la.kept_images or "",
                           _ms(la.latency_ms), la.pruned is not None,
                           "" if la.pruned is None else f"{la.pruned.map50_95:.4f}", _ms(la.pruned_latency_ms)])
    return [config, report, table]


def summary_line(o: Outcome) -> str:
    verdict = "limit met" if o.met else "limit NOT met"
    more = f" ({o.pruned_count} more taken, then pruned)" if o.pruned_count > 0 else ""
    return (f"{verdict}: {len(o.kept)} layer(s) kept in float{more}, mAP50-95 drop {o.drop:.4f} (limit {o.limit}) on "
            f"{o.confirm_images} images, fp32 {o.confirmed_reference_map50_95:.4f} -> int8 "
            f"{o.confirmed.map50_95:.4f}; stopped by {o.stopped_by}; latency {o.latency}")


def kept_table(o: Outcome) -> str:
    """Markdown: each layer the greedy took, its sensitivity, and the mAP after keeping it, on the images it was
    taken on; then each layer pruning put back in int8, and the mAP of the set left; with `--latency`, TensorRT's
    infer p50 of each step's set."""
    by_name = {la.name: la for la in o.ranked}
    timed = o.latency_ms is not None
    lines = ["| layer kept in float | op | recovers alone (mAP50-95) | mAP50-95 after keeping | drop |"
             + " infer p50 ms |" * timed, "|---|---|---|---|---|" + "---|" * timed,
             f"| (none: all quantized) | | | {o.quantized.map50_95:.4f} on {o.images} | "
             f"{o.reference_map50_95 - o.quantized.map50_95:.4f} |" + f" {_ms(o.latency_ms)} |" * timed]
    taken = [by_name[name] for name in o.taken or o.kept]
    for la in taken:
        reference = o.reference_map50_95 if la.kept_images == o.images else o.confirmed_reference_map50_95
        lines.append(f"| `{la.name}` | {la.op} | {la.recovered:+.4f} | {la.kept_map50_95:.4f} on {la.kept_images} | "
                     f"{reference - la.kept_map50_95:.4f} |" + f" {_ms(la.latency_ms)} |" * timed)
    for la in (la for la in taken if la.pruned is not None):
        lines.append(f"| pruned: `{la.name}` back in int8 | {la.op} | {la.recovered:+.4f} | "
                     f"{la.pruned.map50_95:.4f} on {o.confirm_images} | "
                     f"{o.confirmed_reference_map50_95 - la.pruned.map50_95:.4f} |"
                     + f" {_ms(la.pruned_latency_ms)} |" * timed)
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def sweep_command(out: Path, overrides: list[str]) -> str:
    """The command that sweeps the config written beside the Q/DQ int8 one it was searched from."""
    rest = [o for o in overrides if not o.startswith(("precision=", "precision.keep_float="))]
    return shlex.join(["python", "-m", "runner", "-m", f"hydra.searchpath=[file://{out}]",
                       f"precision=int8_qdq,{CONFIG_NAME}", *rest])


def log_mlflow(outcome: Outcome, paths: list[Path], uri: str, experiment: str, artifact_root: str) -> str:
    """A run of kind `sensitivity` with the outcome's figures and files; returns its id."""
    from mlflow.entities import Metric, Param

    from runner.tags import KIND_TAG
    from runner.track import Tracker

    tracker = Tracker(uri, experiment, artifact_root)
    client = tracker.client
    run = client.create_run(tracker.experiment_id, run_name=f"sensitivity-{outcome.model}",
                            tags={KIND_TAG: "sensitivity", "model": outcome.model})
    run_id, now = run.info.run_id, int(time.time() * 1000)
    params = {"model": outcome.model, "limit": outcome.limit, "images": outcome.images, "calibrator":
              outcome.calibrator, "confirm_images": outcome.confirm_images, "stopped_by": outcome.stopped_by,
              "keep_float": json.dumps(outcome.keep_float)[:6000]}
    metrics = {"drop": outcome.drop, "met": float(outcome.met), "kept_layers": len(outcome.kept),
               "pruned_layers": outcome.pruned_count,
               "map50_95": outcome.confirmed.map50_95, "reference_map50_95": outcome.confirmed_reference_map50_95,
               "quantized_drop_ranking": outcome.reference_map50_95 - outcome.quantized.map50_95,
               "evals": outcome.evals, "seconds": outcome.seconds}
    steps = [Metric("map50_95_after_keeping", la.kept_map50_95, now, step)
             for step, la in enumerate((la for la in outcome.ranked if la.kept_map50_95 is not None), 1)]
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()] + steps,
                     params=[Param(k, str(v)) for k, v in params.items()])
    for path in paths:
        client.log_artifact(run_id, str(path), "sensitivity")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="runner sensitivity", description=(
        "Find the fewest nodes to keep in float so that the Q/DQ int8 model stays within --limit mAP50-95 of fp32 "
        "(onnxruntime, CPU); write them as a precision config to sweep."))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the variant, as for `runner` (one variant; e.g. model=yolo11n precision.calibrator=minmax)")
    p.add_argument("--weights", help="an ultralytics .pt (the same as model.weights=PATH)")
    p.add_argument("--images", type=positive(int), default=16,
                   help="images the nodes are ranked on, the first of data.limit (default %(default)s)")
    p.add_argument("--limit", type=positive(float), default=0.01,
                   help="the mAP50-95 drop to reach (default %(default)s)")
    p.add_argument("--max-evals", type=positive(int), default=200,
                   help="evaluations at most: the all-quantized model's, ranking and greedy; confirming is "
                        "extra (default %(default)s)")
    p.add_argument("--max-minutes", type=positive(float), default=15.0,
                   help="minutes for ranking and greedy at most (default %(default)s)")
    p.add_argument("--group", choices=("node", "block"), default="node",
                   help="rank each quantized node, or each block of them (/model.<i>/: fewer evaluations)")
    p.add_argument("--latency", action="store_true", help="time each greedy step with TensorRT (needs a GPU)")
    p.add_argument("--out", type=Path, help="output folder (default <outputs>/sensitivity/<model>)")
    p.add_argument("--tracking-uri", help="log a run to this MLflow store (default: not logged)")
    p.add_argument("--experiment", default="runner", help="MLflow experiment (default %(default)s)")
    return p


def prepare(args) -> tuple[RunConfig, Path, list[str]]:
    """The one variant of the arguments, checked, its output folder, and the overrides. Raises ConfigError."""
    from runner import preflight
    from runner.cache import unwritable

    overrides = list(args.overrides) + ([f"model.weights={args.weights}"] if args.weights else [])
    if args.limit >= 1:
        raise ConfigError(f"--limit: an mAP50-95 drop below 1, e.g. 0.01; got {args.limit}")
    variants = preflight.compose_variants(["-m", *DEFAULTS, *overrides])
    if len(variants) != 1:
        raise ConfigError(f"{len(variants)} variants: the search takes one; give one value per key")
    cfg = variants[0]
    if cfg.precision.name != Precision.int8 or cfg.precision.int8_mode != Int8Mode.qdq:
        raise ConfigError(f"precision: the search makes a Q/DQ int8 model; drop precision={cfg.precision.name.value}"
                          f" (precision.calibrator=... and precision.keep_float=[...] apply)")
    if args.images > cfg.data.limit:
        raise ConfigError(f"--images {args.images}: more than data.limit={cfg.data.limit}, the images confirmed on")
    preflight.check_files(variants)
    out = args.out or Path(cfg.outputs) / "sensitivity" / cfg.model.label
    if problem := unwritable(out, True):
        raise ConfigError(f"--out {out}: {problem}; give a folder you can write")
    return cfg, out, overrides


def main(argv: list[str]) -> int:
    """0 when the set found meets the limit on the confirm images, 1 when not, 2 on a refusal."""
    from runner.config import register
    from runner.environment import quiet_defaults

    quiet_defaults()
    register()
    try:
        args = parser().parse_intermixed_args(argv)
        cfg, out, overrides = prepare(args)
    except SystemExit as exc:  # argparse has printed its usage line
        return exc.code if isinstance(exc.code, int) else USAGE_EXIT
    except ConfigError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    try:
        outcome = search(cfg, args.images, args.limit, Budget(args.max_evals, args.max_minutes), args.group,
                         args.latency)
    except StageError as exc:
        print(f"runner: error: {exc.stage}: {exc.message}", file=sys.stderr)
        return NOT_MET_EXIT
    command = shlex.join(["runner", "sensitivity", *argv])
    paths = write(outcome, out, command)
    print(f"\n{kept_table(outcome)}\n\nrunner: {summary_line(outcome)}")
    if outcome.differs:
        print(f"runner: warning: {outcome.differs}: the confirmed figure is the quantizer's", file=sys.stderr)
    print(f"runner: {len(outcome.ranked)} {args.group}s ranked on {outcome.images} images, {outcome.evals} "
          f"evaluations, {outcome.seconds:.0f} s; files in {out}")
    if args.tracking_uri:
        run_id = log_mlflow(outcome, paths, args.tracking_uri, args.experiment, cfg.tracking.artifact_root)
        print(f"runner: logged to run {run_id} (experiment '{args.experiment}', artifacts sensitivity/)")
    if outcome.kept:
        print(f"runner: sweep it: {sweep_command(out, overrides)}")
    else:
        print("runner: no layer kept beyond precision.keep_float: the config written is the one searched")
    return 0 if outcome.met else NOT_MET_EXIT
