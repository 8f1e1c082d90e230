"""Whether a deployed graph, whatever made it, can stand in for the run's float model (checked from
the two graphs before anything runs), how to feed it and how to read its output as float logits.

ORT's QOperator graphs keep a float input and output (QuantizeLinear after the input,
DequantizeLinear before the output). Others take or give integer codes: those are read with the
graph's own scale and zero point, ``(q - zero_point) x scale``, and never compared as logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ptqcal.atomic import atomic_path
from ptqcal.errors import InputError

FLOAT_INPUTS = ("float32", "float16", "float64")  # fed by casting the float model's input
CODE_TYPES = ("uint8", "int8", "uint16", "int16", "int32")
CHANNELS = (1, 3)
# Ops that move codes without changing them: walked through to find who quantizes a tensor
MOVEMENT_OPS = frozenset({"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"})
# Producer -> input positions of the scale and zero point of its (first) output
OUTPUT_QPARAMS = {"QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QGemm": (7, 8),
                  "QLinearAdd": (6, 7), "QLinearMul": (6, 7), "QLinearConcat": (0, 1),
                  **{op: (3, 4) for op in ("QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
                                           "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean")}}
# Consumers that read codes at input 0 (also at 3 for the binary ones) with scale and zero point after them
INPUT_QPARAMS = {"DequantizeLinear": (0,), "QLinearConv": (0,), "QLinearMatMul": (0, 3), "QGemm": (0, 3),
                 "QLinearAdd": (0, 3), "QLinearMul": (0, 3),
                 **{op: (0,) for op in ("QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
                                        "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean")}}


class CompatError(InputError):
    """A deployed graph that cannot stand in for the run's float model."""


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as declared: name, shape (int, a symbolic name, or None) and type."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str  # numpy's (ml_dtypes') name: float32, uint8, bfloat16, ...

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} [{dims}] {self.dtype}"

    @property
    def layout(self) -> str | None:
        """NCHW or NHWC where the shape shows the channels (1 or 3) at one end only."""
        if len(self.shape) != 4:
            return None
        first, last = (d in CHANNELS for d in (self.shape[1], self.shape[3]))
        return None if first == last else "NCHW" if first else "NHWC"


@dataclass(frozen=True)
class Quantization:
    """Linear codes: ``real = (q - zero_point) x scale``, per tensor or along ``axis``."""

    dtype: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None

    def _params(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        scale, zero = np.array(self.scale, np.float32), np.array(self.zero_point, np.int64)
        if self.axis is None:
            return scale.reshape(()), zero.reshape(())
        shape = [1] * ndim
        shape[self.axis] = -1
        return scale.reshape(shape), zero.reshape(shape)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        scale, zero = self._params(codes.ndim)
        return ((codes.astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """As QuantizeLinear: round half to even, add the zero point, saturate to the code type."""
        scale, zero = self._params(values.ndim)
        limits = np.iinfo(self.dtype)
        codes = np.rint(values.astype(np.float32) / scale) + zero
        return np.clip(codes, limits.min, limits.max).astype(self.dtype)


@dataclass(frozen=True)
class InputEncoding:
    """Turns the float model's input batch into this graph's input."""

    dtype: str
    quantization: Quantization | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.quantization is not None:
            return self.quantization.quantize(batch)
        return batch if batch.dtype == np.dtype(self.dtype) else batch.astype(self.dtype)


@dataclass(frozen=True)
class LogitsDecoding:
    """Turns the session's raw output into float32 logits. ``needs_float_copy``: ORT's Python binding
    cannot hand bfloat16 to numpy, so such a graph runs as :func:`with_float32_output`'s copy."""

    dtype: str
    quantization: Quantization | None = None

    @property
    def needs_float_copy(self) -> bool:
        return self.dtype == "bfloat16"

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.quantization is not None:
            return self.quantization.dequantize(raw)
        return raw.astype(np.float32, copy=False)


@dataclass(frozen=True)
class GraphFit:
    """A deployed graph checked against the float model: how to feed it and read its logits."""

    path: Path
    input: TensorInfo
    output: TensorInfo
    encode: InputEncoding
    decode: LogitsDecoding
    float_input: TensorInfo | None = None  # the float model's input: what the run feeds


def _load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError or a protobuf error
        raise CompatError(f"{model} is not a readable ONNX model ({type(exc).__name__})") from None


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    elem = tensor.elem_type  # numpy's (ml_dtypes') name of the ONNX element type
    return TensorInfo(value.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name if elem else "?")


def graph_io(model: str | Path | onnx.ModelProto, label: str = "the graph") -> tuple[TensorInfo, TensorInfo]:
    """The one input (initializers aside) and the one output of a classifier graph."""
    model = _load(model)
    constants = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise CompatError(f"{label} has {len(inputs)} inputs and {len(model.graph.output)} outputs; a classifier "
                          "has one of each")
    return _info(inputs[0]), _info(model.graph.output[0])


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and name in node.output:
            value = next((a for a in node.attribute if a.name == "value"), None)
            return None if value is None else numpy_helper.to_array(value.t)
    return None


def _qparams(model: onnx.ModelProto, node: onnx.NodeProto, scale_at: int, zero_at: int,
             dtype: str) -> Quantization | None:
    scale = _constant(model, node.input[scale_at]) if len(node.input) > scale_at and node.input[scale_at] else None
    if scale is None:
        return None
    zero_name = node.input[zero_at] if len(node.input) > zero_at else ""
    zero = _constant(model, zero_name) if zero_name else np.zeros_like(scale, dtype=np.int64)
    if zero is None:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.size > 1 else None
    return Quantization(dtype, tuple(float(s) for s in scale.ravel()), tuple(int(z) for z in zero.ravel()), axis)


def logits_decoding(model: str | Path | onnx.ModelProto, label: str = "the graph") -> LogitsDecoding:
    """How to read ``model``'s output as float32 logits: cast a float output; dequantize an
    integer one with the scale and zero point of the op that made it (one line if the graph does
    not say them)."""
    model = _load(model)
    _, output = graph_io(model, label)
    if output.dtype in ("float32", "float16", "float64", "bfloat16"):
        return LogitsDecoding(output.dtype)
    if output.dtype not in CODE_TYPES:
        raise CompatError(f"{label}'s output {output} holds {output.dtype} values, neither float logits nor "
                          "8/16/32-bit codes")
    producers = {out: node for node in model.graph.node for out in node.output}
    node, moved = producers.get(output.name), False
    while node is not None and node.op_type in MOVEMENT_OPS:
        node, moved = producers.get(node.input[0]), True
    quantization = None
    if node is not None and node.op_type in OUTPUT_QPARAMS:
        quantization = _qparams(model, node, *OUTPUT_QPARAMS[node.op_type], output.dtype)
    made_by = f"made by {node.op_type}" if node is not None else "a graph input"
    if quantization is None:
        raise CompatError(f"{label}'s output {output} holds codes whose scale and zero point the graph does not "
                          f"say ({made_by}); ptqcal compares logits, never raw codes")
    if moved and quantization.axis is not None:
        raise CompatError(f"{label}'s output {output} holds per-axis codes reshaped after {node.op_type}; only "
                          "per-tensor codes can be read through a reshape")
    return LogitsDecoding(output.dtype, quantization)


def _code_readers(model: onnx.ModelProto, name: str) -> list[tuple[onnx.NodeProto, int]]:
    """Nodes (and input positions) that read the codes of ``name``, through movement ops."""
    found = []
    for node in model.graph.node:
        for position, used in enumerate(node.input):
            if used != name:
                continue
            if node.op_type in MOVEMENT_OPS:
                found += _code_readers(model, node.output[0])
            else:
                found.append((node, position))
    return found


def input_encoding(model: str | Path | onnx.ModelProto, float_input: TensorInfo,
                   label: str = "the graph") -> InputEncoding:
    """How to turn the float model's input into ``model``'s: as is, cast (float16, float64), or
    quantized with the scale its consumers read (one line if they do not all say the same one)."""
    model = _load(model)
    graph_input, _ = graph_io(model, label)
    if graph_input.dtype == float_input.dtype or {graph_input.dtype, float_input.dtype} <= set(FLOAT_INPUTS):
        return InputEncoding(graph_input.dtype)
    if graph_input.dtype in CODE_TYPES and float_input.dtype in FLOAT_INPUTS:
        found = set()
        for node, position in _code_readers(model, graph_input.name):
            if position not in INPUT_QPARAMS.get(node.op_type, ()):
                found.add(None)
                continue
            found.add(_qparams(model, node, position + 1, position + 2, graph_input.dtype))
        if len(found) == 1 and None not in found and next(iter(found)).axis is None:
            return InputEncoding(graph_input.dtype, next(iter(found)))
        raise CompatError(f"{label} takes {graph_input.dtype} codes ({graph_input}) where the float model takes "
                          f"{float_input.dtype}, and its graph does not say one scale for them (no "
                          "DequantizeLinear or QLinear op alone reads the input)")
    raise CompatError(f"{label}'s input {graph_input} holds {graph_input.dtype} values, the float model's "
                      f"{float_input} {float_input.dtype}")


def check_compatible(graph_path: str | Path, float_path: str | Path, setting: str | None = None) -> GraphFit:
    """Check that the graph at ``graph_path`` takes the float model's input (name, layout, element
    type or codes of it, fixed sizes) and gives as many classes; raises :class:`CompatError` (one
    line naming both shapes) when it does not."""
    try:
        return _check(Path(graph_path), float_path)
    except CompatError as exc:
        exc.setting = exc.setting or setting
        raise


def _check(graph_path: Path, float_path: str | Path) -> GraphFit:
    label = graph_path.name
    model = _load(graph_path)
    graph_in, graph_out = graph_io(model, label)
    float_in, float_out = graph_io(float_path, "the float model")

    def refuse(what: str, mine: TensorInfo, theirs: TensorInfo, extra: str = "") -> None:
        raise CompatError(f"{label} does not fit the float model: its {what} is {mine}, the float model's is "
                          f"{theirs}{extra}")

    if graph_in.name != float_in.name:
        refuse("input", graph_in, float_in, " (another name)")
    if len(graph_in.shape) != len(float_in.shape):
        refuse("input", graph_in, float_in)
    if None not in (graph_in.layout, float_in.layout) and graph_in.layout != float_in.layout:
        refuse("input", graph_in, float_in, f" ({graph_in.layout} where the float model is {float_in.layout})")
    for index, (mine, theirs) in enumerate(zip(graph_in.shape, float_in.shape)):
        if isinstance(mine, int) and mine and isinstance(theirs, int) and theirs and mine != theirs:
            refuse("input", graph_in, float_in)
        if index == 0 and isinstance(mine, int) and mine and not isinstance(theirs, int):
            refuse("input", graph_in, float_in, f" (a batch fixed at {mine})")
    declared = () not in (graph_out.shape, float_out.shape)  # an undeclared output shape shows when it runs
    if declared and (len(graph_out.shape) != 2 or len(float_out.shape) != 2):
        refuse("output", graph_out, float_out, " (expected (N, classes))")
    classes, float_classes = (graph_out.shape[1], float_out.shape[1]) if declared else (None, None)
    if isinstance(classes, int) and isinstance(float_classes, int) and classes != float_classes:
        raise CompatError(f"{label} gives {classes} classes where the float model gives {float_classes}: its "
                          f"output is {graph_out}, the float model's is {float_out}")
    return GraphFit(graph_path, graph_in, graph_out, input_encoding(model, float_in, label),
                    logits_decoding(model, label), float_in)


# What may stand between a graph's Softmax and its output without changing which class wins
_AFTER_SOFTMAX = ("DequantizeLinear", "QuantizeLinear", "Cast", "Identity")


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def _rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    _rename_input(model, old, new)


def _params(model: onnx.ModelProto, name: str, quantization: Quantization) -> list[str]:
    """Scale and zero-point initializers of ``quantization``, added to ``model``; their names."""
    scale = np.array(quantization.scale, np.float32)
    zero = np.array(quantization.zero_point, quantization.dtype)
    if quantization.axis is None:
        scale, zero = scale.reshape(()), zero.reshape(())
    model.graph.initializer.extend([numpy_helper.from_array(scale, f"{name}_scale"),
                                    numpy_helper.from_array(zero, f"{name}_zero_point")])
    return [f"{name}_scale", f"{name}_zero_point"]


def _without_final_softmax(model: onnx.ModelProto, label: str) -> LogitsDecoding | None:
    """Cut a final Softmax (and the Q/DQ or Cast after it) so that the graph ends in its logits, and
    say how to read them; ``None`` when it has none. Probabilities are not logits: NLL, margins and
    temperatures need the latter."""
    producers = {out: node for node in model.graph.node for out in node.output}
    output, tail = model.graph.output[0], []
    node = producers.get(output.name)
    while node is not None and node.op_type in _AFTER_SOFTMAX:
        tail.append(node)
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "QLinearSoftmax"):
        return None
    if node.op_type == "QLinearSoftmax":
        raise CompatError(f"{label} ends in a quantized Softmax: its probabilities of 0 have no logits; export it "
                          "without the Softmax")
    typed = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    elem = typed.get(node.input[0], onnx.TensorProto.FLOAT)
    for cut in [node, *tail]:
        model.graph.node.remove(cut)
    _rename_output(model, node.input[0], output.name)
    output.type.tensor_type.elem_type = elem
    return LogitsDecoding(str(onnx.helper.tensor_dtype_to_np_dtype(elem)))


def float_io_model(fit: GraphFit) -> onnx.ModelProto | None:
    """The graph of ``fit`` taking the float model's input (its element type) and giving float32
    logits: a QuantizeLinear or Cast in front of an input of codes or another type, a final Softmax cut,
    a DequantizeLinear or Cast behind an output of codes or another float type. ``None`` when the
    graph already is one (it then runs as it is)."""
    model = onnx.load(str(fit.path))  # its external data too (checked to stay in its folder before)
    cut = _without_final_softmax(model, fit.path.name)
    decode, changed = cut or fit.decode, cut is not None
    graph_input = next(i for i in model.graph.input if i.name == fit.input.name)
    fed = fit.float_input.dtype if fit.float_input is not None else "float32"  # what the run feeds
    if fit.encode.quantization is not None or fit.encode.dtype != fed:
        inner = f"{graph_input.name}_encoded"
        _rename_input(model, graph_input.name, inner)
        model.graph.node.insert(0, onnx.helper.make_node(
            "QuantizeLinear", [graph_input.name, *_params(model, inner, fit.encode.quantization)], [inner], name=inner)
            if fit.encode.quantization is not None else onnx.helper.make_node(
            "Cast", [graph_input.name], [inner], name=inner,
            to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(fit.encode.dtype))))
        graph_input.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(fed))
        changed = True
    if decode.quantization is not None or decode.dtype != "float32":
        output = model.graph.output[0]
        inner = f"{output.name}_decoded"
        _rename_output(model, output.name, inner)
        model.graph.node.append(onnx.helper.make_node(
            "DequantizeLinear", [inner, *_params(model, inner, decode.quantization)], [output.name], name=inner)
            if decode.quantization is not None else
            onnx.helper.make_node("Cast", [inner], [output.name], name=inner, to=onnx.TensorProto.FLOAT))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        changed = True
    return model if changed else None


def with_float32_output(path: str | Path, out_path: str | Path) -> Path:
    """A copy of the graph whose output is cast to float32 inside the graph (same output name), for a
    bfloat16 output that ORT's Python binding cannot return as a numpy array."""
    model = onnx.load(str(path))
    output = model.graph.output[0]
    inner = f"{output.name}_before_float32"
    for node in model.graph.node:  # its producer and any consumer now use the bfloat16 tensor
        node.output[:] = [inner if name == output.name else name for name in node.output]
        node.input[:] = [inner if name == output.name else name for name in node.input]
    model.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=onnx.TensorProto.FLOAT,
                                                  name=f"{output.name}_to_float32"))
    output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    with atomic_path(out_path) as target:
        onnx.save(model, str(target))
    return Path(out_path)
