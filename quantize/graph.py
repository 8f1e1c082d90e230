"""What an ONNX graph says about its quantization: which layers carry weights and along which axis,
which op types ORT quantizes, which layers stay float, which ranges ORT sets itself, which tensors a
QDQ model quantizes, which biases it clipped, and how many bytes the weights take.

A leaf: only onnx, numpy and :mod:`.spec`, so the calibrator, the quantizer and the face all ask the
same questions of a graph without importing each other. ORT's operator registry is read on first
use (:func:`op_types_to_quantize`), so this module imports without onnxruntime.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .spec import QuantizeError, stored_bytes

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Normalisations ORT would quantize by default: their scale vector would get the sweep's weight
# bits (per tensor; rank 1 has no channel axis), and no CPU integer kernel runs them. They stay
# float, so the weight bits of a configuration mean the weights of its Conv/Gemm/MatMul layers.
KEPT_FLOAT_OPS = ("LayerNormalization", "InstanceNormalization")


def _graph(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """``model`` itself, or the file's graph without its external data (only names, dims and the
    initializers stored inline are read)."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)


def weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Conv/Gemm/MatMul nodes with a constant weight, in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in initializers]


def weight_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Weight initializer -> output-channel axis."""
    def axis(node: onnx.NodeProto) -> int:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else 1

    return {node.input[1]: axis(node) for node in weighted_nodes(model)}


def weight_layer_names(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes with constant weights, in graph order."""
    return [node.name for node in weighted_nodes(model)]


def layers_to_exclude(model: onnx.ModelProto, names: tuple[str, ...] = (), first: bool = False,
                      last: bool = False) -> tuple[str, ...]:
    """Node names to keep in float: ``names``, plus the first and/or last weight layer.

    Raises :class:`QuantizeError` for a name that is no node of ``model``.
    """
    unknown = sorted(set(names) - {node.name for node in model.graph.node})
    if unknown:
        raise QuantizeError(f"no node of the model is named {', '.join(unknown)}", setting="exclude")
    layers = weight_layer_names(model)
    chosen = list(names) + ([layers[0]] if first and layers else []) + ([layers[-1]] if last and layers else [])
    return tuple(dict.fromkeys(chosen))


def op_types_to_quantize() -> list[str]:
    """ORT's default choice for QDQ (every op it has a QDQ or QLinear rule for) without
    :data:`KEPT_FLOAT_OPS`."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - set(KEPT_FLOAT_OPS))


def calibration_tensors(model: onnx.ModelProto) -> list[str]:
    """Float activations that enter or leave a node (what ORT's calibrators select), in graph order."""
    model = onnx.shape_inference.infer_shapes(model)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    typed = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    initializers = {init.name for init in model.graph.initializer}
    names: dict[str, None] = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            if name and name not in initializers and typed.get(name) in float_types:
                names[name] = None
    return list(names)


def ranges_set_by_ort(model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Tensors whose calibrated range ORT's quantizer never reads -> the tensor whose range it uses.

    Before quantizing, ORT gives the input of a quantized Relu or Clip that feeds nothing else the
    Relu's or Clip's output range (``BaseQuantizer.adjust_tensor_ranges``), then fuses the two (the
    Conv writes the clipped range directly). Binning those inputs would be wasted work: on
    EfficientNet-Lite0 they are a third of the tensors and half of the values. Left out, so that
    the graph ORT writes stays the same: chains of such nodes (ORT rewrites them in graph order),
    graph inputs and outputs (never fused, so their own range is used), and ``exclude``'s nodes.
    """
    quantized_ops = set(op_types_to_quantize())
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    boundary = {v.name for v in [*model.graph.input, *model.graph.output]}
    taken = {node.input[0]: node.output[0] for node in model.graph.node
             if node.op_type in ("Relu", "Clip") and node.op_type in quantized_ops and node.name not in exclude
             and consumers.get(node.input[0]) == 1 and node.input[0] not in boundary}
    chained = set(taken) & set(taken.values())
    return {name: source for name, source in taken.items() if name not in chained and source not in chained}


def quantized_tensors(quantized: onnx.ModelProto | str | Path) -> set[str]:
    """The activation tensors a QDQ model quantizes (inputs of its activation QuantizeLinear nodes;
    a Clip put in front of one for a narrow activation grid is named ``<tensor>_clip_<node>``)."""
    model = _graph(quantized)
    constants = {init.name for init in model.graph.initializer}
    return {node.input[0].split("_clip_")[0] for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in constants}


def clipped_biases(quantized: onnx.ModelProto | str | Path) -> list[str]:
    """Names of the int32 biases whose codes ORT clipped at the int32 limits (their scale, input
    scale x weight scale, is too small for the float bias)."""
    model = _graph(quantized)
    limits = np.iinfo(np.int32)
    dequantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return [init.name for init in model.graph.initializer
            if init.data_type == onnx.TensorProto.INT32 and init.name in dequantized
            and np.isin(numpy_helper.to_array(init), (limits.min, limits.max)).any()]


# Which input of each op is its weight: float layers (through a DequantizeLinear in QDQ graphs), ORT's
# QOperator and dynamic-quantization kernels, and its weight-only int4 MatMulNBits, so that every
# format's weights are counted alike
WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3,
                "ConvInteger": 1, "MatMulInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulNBits": 1}


def weight_bytes(model: onnx.ModelProto | str | Path) -> int:
    """Bytes stored for the weights of a model's layers (:data:`WEIGHT_INPUT`): float tensors, or
    the integer codes DequantizeLinear (directly or through a Cast) or an integer kernel reads (as
    stored: int4 counts two codes to a byte, int2 four)."""
    model = _graph(model)
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    total = 0
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index:
            source = producers.get(node.input[index])
            name = node.input[index]
            if source is not None and source.op_type == "DequantizeLinear":
                name, unpack = source.input[0], producers.get(source.input[0])
                if unpack is not None and unpack.op_type == "Cast":  # packed INT2 codes, read as int8
                    name = unpack.input[0]
            if name in initializers:
                init = initializers[name]
                total += len(init.raw_data) if init.raw_data else _unpacked_bytes(init)
    return total


# Sub-byte types: numpy holds one code a byte, the file packs them (two int4 or four int2 a byte)
_PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT2: 2,
                onnx.TensorProto.UINT2: 2}


def _unpacked_bytes(init: onnx.TensorProto) -> int:
    """The bytes of an initializer kept in typed fields rather than ``raw_data``, as a file packs them."""
    bits = _PACKED_BITS.get(init.data_type)
    return numpy_helper.to_array(init).nbytes if bits is None else math.ceil(math.prod(init.dims) * bits / 8)


def weight_sizes(model: onnx.ModelProto | str | Path,
                 bits: int | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Each weight layer's (Conv/Gemm/MatMul node name, graph order) element count and bytes: as the
    float graph stores them, or with ``bits`` as its codes are stored at that width
    (:func:`.spec.stored_bytes`). What a mixed-precision search weighs its choices with; read from
    the initializers' dims and types, so a file's external data is never loaded."""
    model = _graph(model)
    initializers = {init.name: init for init in model.graph.initializer}
    elements: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for node in weighted_nodes(model):
        init = initializers[node.input[1]]
        elements[node.name] = count = math.prod(init.dims)
        sizes[node.name] = count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize if bits is None \
            else stored_bytes(count, bits)
    return elements, sizes
