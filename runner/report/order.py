"""Table order: a model's grid, an ONNX column and a build row sort by the cell's parts, never by its labels.

Models: the YOLO presets oldest first, then the RT-DETR ones, then others by name. Within a tool: precision,
calibrator, shape, int8 settings; ONNX columns with a head other than one2many after the rest, build rows of the peer
after runner's own, then by the settings that tell variants of one cell apart.
"""
from __future__ import annotations

from runner.config import DETR_MODELS, MODELS, BackendName, BuildTool, ExportTool, Head, Mechanism, Precision, ShapeMode
from runner.results import INT8_FIELDS, PEER_PIPELINE, BuildVariant, Cell, OnnxVariant

EXPORT_TOOLS = (ExportTool.ultralytics, ExportTool.torch, ExportTool.dynamo)
BUILD_TOOLS = (BuildTool.tensorrt_api, BuildTool.ultralytics, BackendName.onnxruntime)
PRECISIONS = (Precision.fp32, Precision.fp16, Precision.int8, Mechanism.qdq)
SHAPES = (ShapeMode.static, ShapeMode.dynamic)


def _rank(order: tuple, value: str) -> int:
    return order.index(value) if value in order else len(order)


def model_key(model: str) -> tuple:
    return _rank(MODELS + DETR_MODELS, model), model


def _variant_key(variant: OnnxVariant | BuildVariant, tools: tuple) -> tuple:
    return (_rank(tools, variant.tool), _rank(PRECISIONS, variant.precision), variant.precision, variant.calibrator,
            _rank(SHAPES, variant.shape), *(getattr(variant, name) for name in INT8_FIELDS))


def onnx_key(onnx: OnnxVariant) -> tuple:
    return *_variant_key(onnx, EXPORT_TOOLS), onnx.head != Head.one2many


def build_key(build: BuildVariant) -> tuple:
    return (*_variant_key(build, BUILD_TOOLS), build.input_dtype, build.pipeline == PEER_PIPELINE, build.pipeline,
            build.setting)


def cell_key(cell: Cell) -> tuple:
    return model_key(cell.model), onnx_key(cell.onnx), build_key(cell.build)
