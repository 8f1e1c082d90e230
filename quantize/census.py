"""What a quantized graph is, read from the graph alone: which ops compute on integers and which in
float, how many bytes its weights take by element type, whether its activations are quantized,
its format, and which tool says it made it. Works on any ``.onnx`` file, whatever produced it
(ORT, NNCF, a converter): no session, no onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnx

FORMATS = ("qdq", "qoperator", "dynamic", "weight-only (MatMulNBits)", "float16", "bfloat16", "float")

# Operators that take or make integer codes (ORT's contrib ops included). The QLinear* family
# (QLinearConv, QLinearAdd, QLinearGlobalAveragePool, ...) is matched by its prefix.
INTEGER_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "ConvInteger", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "MatMulNBits",
    "MatMulBnb4", "GatherBlockQuantized", "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedLayerNormalization",
})
# Integer ops whose (first) output is float again: what follows them computes in float
FLOAT_RESULT_OPS = frozenset({"DequantizeLinear", "MatMulNBits", "MatMulBnb4", "MatMulIntegerToFloat",
                              "DynamicQuantizeMatMul", "GatherBlockQuantized"})
# Ops that quantize activations: integer arithmetic runs on data, not just on stored weights
DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
                         "MatMulIntegerToFloat"})
QOPERATOR_OPS = frozenset({"QGemm", "QAttention", "QEmbedLayerNormalization"})
WEIGHT_ONLY_OPS = frozenset({"MatMulNBits", "MatMulBnb4"})
# Sub-byte element types are stored packed: two int4 codes (four int2) to a byte
PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}
FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


def _cast_to(node: onnx.NodeProto) -> str:
    """The element type a Cast node casts to (TensorProto's name, e.g. ``INT8``)."""
    return onnx.TensorProto.DataType.Name(next((a.i for a in node.attribute if a.name == "to"), 0))


def _is_integer_op(op_type: str) -> bool:
    return op_type in INTEGER_OPS or op_type.startswith("QLinear")


@dataclass(frozen=True)
class GraphCensus:
    """One graph's make-up. ``qdq_ops`` are float ops fed by DequantizeLinear (in QDQ format ORT
    fuses each with its Q/DQ pairs into an integer kernel at load, where it has one); ``integer_ops``
    compute on integer codes (QLinear*, Q/DQ themselves, and data movement on codes);
    ``float_ops`` are the rest."""

    format: str  # one of FORMATS
    integer_ops: dict[str, int]
    qdq_ops: dict[str, int]
    float_ops: dict[str, int]
    weight_bytes: dict[str, int]  # initializers and Constant tensors, by TensorProto type name
    activations_quantized: bool
    simulated_twin: bool  # ORT can also run it with float ops between its Q/DQ pairs (unfused)
    producer: str
    producer_version: str
    metadata: dict[str, str]
    weight_only_blocks: dict[str, int]  # "4-bit, block 32" -> MatMulNBits nodes so quantized

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's values take as stored, from its type and shape (external data is not read)."""
    count = math.prod(tensor.dims)
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if name in PACKED_BITS:
        return -(-count * PACKED_BITS[name] // 8)
    if name == "STRING":
        return sum(len(s) for s in tensor.string_data)
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _constants(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    return tensors


def _count(counts: dict[str, int], op_type: str) -> None:
    counts[op_type] = counts.get(op_type, 0) + 1


def graph_census(model: str | Path | onnx.ModelProto) -> GraphCensus:
    """The census of ``model`` (a path or a loaded graph; external weights are never loaded)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
    integer_ops: dict[str, int] = {}
    qdq_ops: dict[str, int] = {}
    float_ops: dict[str, int] = {}
    codes: set[str] = set()  # activation tensors that hold integer codes
    activations_quantized = False
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        op = node.op_type
        if op == "Constant":
            continue
        if op == "Cast" and node.input[0] in constants and _cast_to(node) not in FLOAT_TYPES:
            _count(integer_ops, op)  # stored codes widened for their DequantizeLinear (INT2 -> int8): weights
            constants.update(node.output)
            continue
        if _is_integer_op(op) or (node.input and node.input[0] in codes):
            _count(integer_ops, op)
            if op == "QuantizeLinear" and node.input[0] not in constants:
                activations_quantized = True
            if op in DYNAMIC_OPS or op.startswith("QLinear") or op in QOPERATOR_OPS or op in ("ConvInteger",
                                                                                             "MatMulInteger"):
                activations_quantized = True
            if op == "Cast":
                if _cast_to(node) not in FLOAT_TYPES:
                    codes.update(node.output)
            elif op == "DynamicQuantizeLinear":  # (codes, scale, zero point)
                codes.update((node.output[0], *node.output[2:]))
            elif op not in FLOAT_RESULT_OPS:
                codes.update(node.output)
        elif any(producers.get(name) is not None and producers[name].op_type == "DequantizeLinear"
                 for name in node.input):
            _count(qdq_ops, op)
        else:
            _count(float_ops, op)
    weight_bytes, blocks = _stored_bytes(model), _nbits_blocks(model)
    fmt = _format(integer_ops, qdq_ops, weight_bytes, activations_quantized)
    return GraphCensus(
        format=fmt, integer_ops=dict(sorted(integer_ops.items())), qdq_ops=dict(sorted(qdq_ops.items())),
        float_ops=dict(sorted(float_ops.items())), weight_bytes=dict(sorted(weight_bytes.items())),
        activations_quantized=activations_quantized, simulated_twin=fmt == "qdq" and bool(qdq_ops),
        producer=model.producer_name, producer_version=model.producer_version,
        metadata={p.key: p.value for p in model.metadata_props}, weight_only_blocks=blocks)


def _stored_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every constant tensor, by element type."""
    weight_bytes: dict[str, int] = {}
    for tensor in _constants(model):
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        weight_bytes[name] = weight_bytes.get(name, 0) + tensor_bytes(tensor)
    return weight_bytes


def _nbits_blocks(model: onnx.ModelProto) -> dict[str, int]:
    """MatMulNBits layers by bit width and block size."""
    blocks: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            _count(blocks, f"{attrs.get('bits', 4)}-bit, block {attrs.get('block_size', '?')}")
    return blocks


def _format(integer_ops: dict[str, int], qdq_ops: dict[str, int], weight_bytes: dict[str, int],
            activations_quantized: bool) -> str:
    """The graph's format: how its integer parts are written, else its float type."""
    ops = set(integer_ops)
    if any(op.startswith("QLinear") or op in QOPERATOR_OPS for op in ops):
        return "qoperator"
    if ops & DYNAMIC_OPS:
        return "dynamic"
    if activations_quantized and qdq_ops:
        return "qdq"
    if ops & WEIGHT_ONLY_OPS:
        return "weight-only (MatMulNBits)"
    if qdq_ops:  # DequantizeLinear on stored weights only (e.g. int4 weights into MatMul)
        return "qdq"
    floats = {name: weight_bytes.get(name, 0) for name in FLOAT_TYPES}
    widest = max(floats, key=floats.get)
    return {"FLOAT16": "float16", "BFLOAT16": "bfloat16"}.get(widest, "float") if floats[widest] else "float"


FORMAT_SENTENCES = {
    "qdq": "QDQ: QuantizeLinear/DequantizeLinear pairs around float ops, which ORT fuses into integer kernels "
           "at load where it has them",
    "qoperator": "QOperator: integer operators (QLinearConv, QGemm, ...) written into the graph",
    "dynamic": "dynamic: activations quantized at run time from each batch's own range (DynamicQuantizeLinear)",
    "weight-only (MatMulNBits)": "weight-only: MatMulNBits keeps block-quantized weights and float activations",
    "float16": "float16: no quantization; weights and arithmetic in half precision",
    "bfloat16": "bfloat16: no quantization; weights and arithmetic in bfloat16",
    "float": "float: no quantization",
}


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def census_lines(census: GraphCensus) -> list[str]:
    """Short sentences for a report, one fact each."""
    made = " ".join(filter(None, (census.producer, census.producer_version)))
    lines = [f"Made by {made}." if made else "No producer recorded in the graph.",
             f"Format: {FORMAT_SENTENCES[census.format]}."]
    if census.integer_ops:
        lines.append(f"Integer ops: {_ops(census.integer_ops)}.")
    if census.qdq_ops:
        lines.append(f"Float ops between Q/DQ pairs (fused by ORT into integer kernels at load): "
                     f"{_ops(census.qdq_ops)}.")
    if census.float_ops:
        lines.append(f"Float ops: {_ops(census.float_ops)}.")
    if census.weight_only_blocks:
        blocks = ", ".join(f"{n} x {kind}" for kind, n in census.weight_only_blocks.items())
        lines.append(f"MatMulNBits weights: {blocks}.")
    weights = ", ".join(f"{n:,} B {name}" for name, n in sorted(census.weight_bytes.items(),
                                                                   key=lambda item: -item[1]))
    lines.append(f"Stored tensors: {census.total_weight_bytes:,} B ({weights})." if weights
                 else "No stored tensors.")
    lines.append("Activations are quantized." if census.activations_quantized else "Activations stay float.")
    lines.append("Has a simulated twin: ORT can run its float ops between the Q/DQ pairs unfused."
                 if census.simulated_twin else "No simulated twin: ORT runs it only as written.")
    if census.metadata:
        shown = "; ".join(f"{k}={v if len(v) <= 60 else v[:57] + '...'}" for k, v in census.metadata.items())
        lines.append(f"Metadata: {shown}.")
    return lines
