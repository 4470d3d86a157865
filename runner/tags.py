"""The MLflow tags of a sweep's runs: written by `runner.track`, read back by `runner.report`.

A run is a sweep (the parent) or a variant (a child) by its `KIND_TAG`; every run of a sweep carries the
parent's id as `SWEEP_TAG`. A variant run carries its cell as parts (`cell.model`, `cell.onnx.tool`, ...),
read back as a `Cell` value, its outcome as the `OUTCOME` tags, the shapes its figures were measured at as the
`SHAPES` tags, and what its `auto` settings became as the `AUTO` tag.
"""
from __future__ import annotations

from runner.results import Cell, VariantResult

KIND_TAG = "runner.kind"
SWEEP, VARIANT = "sweep", "variant"  # the values of KIND_TAG
SWEEP_TAG = "runner.sweep_id"
RESULT_TAG = "runner.result_id"  # the result.json a variant run was logged from
OUTCOME = ("status", "failed_stage", "error", "backend", "validation", "validation_note", "accuracy_miss",
           "unvalidated_shapes", "pin_check")
SHAPES = ("timed_shape", "map_shape", "map_worst_shape")  # where the figures were measured, as `shape_text` says
AUTO = "auto"  # the tag of what the variant's `auto` settings became (`Resolved.auto_text`)


def query(kind: str, sweep_id: str | None = None) -> str:
    """The MLflow search filter of the runs of `kind`: all of them, or those of one sweep."""
    of_kind = f"tags.`{KIND_TAG}` = '{kind}'"
    return of_kind if sweep_id is None else f"tags.`{SWEEP_TAG}` = '{sweep_id}' and {of_kind}"


def cell_tags(cell: Cell) -> dict[str, str]:
    """The cell as tags: its labels (`model`, `onnx_label`, `build_label`, for the MLflow UI) and its parts
    (cell.model, cell.onnx.tool, ..., cell.build.precision, read back by `cell_from_tags`)."""
    return {"model": cell.model, "onnx_label": cell.onnx.label, "build_label": cell.build.label,
            "cell.model": cell.model, **{f"cell.{part}.{key}": value for part in ("onnx", "build")
                                         for key, value in getattr(cell, part).to_dict().items()}}


def cell_from_tags(tags: dict) -> Cell:
    parts = {part: {key[len(f"cell.{part}."):]: value for key, value in tags.items()
                    if key.startswith(f"cell.{part}.")} for part in ("onnx", "build")}
    return Cell.from_dict({"model": tags["cell.model"], **parts})


def outcome_tags(result: VariantResult) -> dict[str, str]:
    """Status, failing stage, error, backend, validation verdict (and what a pass or the reference did not check or
    measure, or the accuracy limits missed, and the shapes not validated), and the precision pins TensorRT ignored
    or that were not checked, as tags."""
    v = result.validate
    return {"status": result.status, "failed_stage": result.failed_stage or "", "error": result.error or "",
            "backend": result.backend, "validation": v.status if v else "",
            "validation_note": (v.reason or "") if v and v.status in ("passed", "reference") else "",
            "accuracy_miss": ", ".join(v.failed_metrics) if v and v.status == "inaccurate" else "",
            "unvalidated_shapes": ", ".join(v.unvalidated) if v else "",
            "pin_check": result.build.pin_check_text() if result.build else ""}


def auto_tags(result: VariantResult) -> dict[str, str]:
    """What the variant's `auto` pre/post devices and CUDA graph became on its backend, as a tag ("" where none
    was auto)."""
    return {AUTO: result.resolved.auto_text() if result.resolved else ""}


def shape_text(shape: list[int] | None, label: str = "") -> str:
    """A shape as the tables show it: `1x3x640x640`, after its label where it has one (`min 1x3x320x320`)."""
    return " ".join(filter(None, (label, "x".join(map(str, shape or ())))))


def shape_tags(result: VariantResult) -> dict[str, str]:
    """The shape the bench timed (its first dim is the batch every timing is per), the shape of the headline mAP and
    the shape with the lowest mAP50-95, as tags ("" where not measured)."""
    v, b = result.validate, result.bench
    headline, worst = (v.headline(), v.worst_map()) if v else (None, None)
    return {"timed_shape": shape_text(b.shape) if b else "",
            "map_shape": shape_text(headline[1].shape) if headline else "",
            "map_worst_shape": shape_text(worst[1].shape, worst[0]) if worst else ""}
