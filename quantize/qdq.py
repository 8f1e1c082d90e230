"""ONNX Runtime static QDQ quantization at any bit width from precomputed activation ranges.

ORT's integer types are 8, 16 and 4 bits. Other widths are stored in the 8-bit containers with
their codes on the narrower grid: weights get the per-channel scales of a b-bit quantizer through
``TensorQuantOverrides`` (ORT then rounds with them and we clip the stored codes to the b-bit
range, since ORT clips only to int8's); activations below 8 bits get the scale and zero point of a
b-bit quantizer and a Clip to the calibrated range in front of each QuantizeLinear, because
QuantizeLinear saturates only at the container's 0..255.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from ptqcal.atomic import atomic_path
from .calibrate import CalibrationRanges
from .spec import QuantizeError, QuantSpec, WeightScale, stored_bits, weight_grid

INT4_OPSET = 21
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Normalisations ORT would quantize by default: their scale vector would get the sweep's weight
# bits (per tensor; rank 1 has no channel axis), and no CPU integer kernel runs them. They stay
# float, so the weight bits of a configuration mean the weights of its Conv/Gemm/MatMul layers.
KEPT_FLOAT_OPS = ("LayerNormalization", "InstanceNormalization")


def weight_scales(weight: np.ndarray, axis: int, bits: int, convention: str = WeightScale.TORCH) -> np.ndarray:
    """Per-channel symmetric scales of a b-bit quantizer along ``axis``."""
    qmin, qmax = weight_grid(bits)
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    absmax = np.max(np.abs(weight), axis=reduce).astype(np.float32)
    divisor = (qmax - qmin) / 2 if WeightScale(convention) is WeightScale.TORCH else qmax
    scale = absmax / np.float32(divisor)  # in float32 like PyTorch's observers, so ties round alike
    return np.where(scale > 0, scale, np.float32(1.0))  # an all-zero channel keeps scale 1


def activation_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point of a b-bit asymmetric quantizer whose range includes 0 (as PyTorch's)."""
    qmax = 2 ** bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, float(np.finfo(np.float32).eps))
    zero_point = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return float(np.float32(scale)), zero_point


def prepare(float_path: str | Path, out_path: str | Path) -> Path:
    """ORT's ``quant_pre_process``: shape inference and graph optimisation before quantization.

    Symbolic shape inference is skipped: image classifiers have one symbolic (batch) dimension,
    which ONNX's own shape inference handles, and it would need sympy on torch-free machines.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ptqcal-prepare-", dir=out_path.parent) as tmp, _ort_temporary_files(tmp):
        quant_pre_process(str(float_path), str(out_path), skip_symbolic_shape=True)
    model = onnx.load(str(out_path))
    if name_nodes(model):
        onnx.save(model, str(out_path))
    return out_path


def name_nodes(model: onnx.ModelProto) -> bool:
    """Give unnamed nodes unique names, so that layers can be chosen and excluded by name."""
    taken = {node.name for node in model.graph.node}
    renamed = False
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{index}{suffix}" for suffix in ("", *map(str, range(1, 99)))
                             if f"{node.op_type}_{index}{suffix}" not in taken)
            taken.add(node.name)
            renamed = True
    return renamed


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


def _weight_type(bits: int) -> QuantType:
    return QuantType.QInt4 if stored_bits(bits) == 4 else QuantType.QInt8


def _overrides(model: onnx.ModelProto, ranges: CalibrationRanges, spec: QuantSpec) -> dict:
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    axes = weight_axes(model)
    overrides: dict[str, list[dict]] = {}
    for node in weighted_nodes(model):  # per tensor, so each layer can have its own width (mixed precision)
        name, axis, bits = node.input[1], axes[node.input[1]], spec.bits_of(node.name)
        scales = weight_scales(weights[name], axis, bits, spec.weight_scale)
        overrides[name] = [{"axis": axis, "quant_type": _weight_type(bits), "scale": np.float32(s),
                            "zero_point": np.int8(0)} for s in scales]
    if spec.act_bits < 8:
        for name, (lo, hi) in ranges.ranges.items():
            scale, zero_point = activation_qparams(lo, hi, spec.act_bits)
            overrides[name] = [{"quant_type": QuantType.QUInt8, "scale": np.array(scale, np.float32),
                                "zero_point": np.array(zero_point, np.uint8)}]
    return overrides


def quantize_qdq(prepared_path: str | Path, out_path: str | Path, ranges: CalibrationRanges,
                 spec: QuantSpec) -> Path:
    """Write the QDQ model of ``spec`` using ``ranges`` instead of a fresh calibration pass.

    The ranges reach ``quantize_static`` through ORT's own calibration cache, so for 8-bit
    activations ORT computes scales and zero points exactly as after its own calibration. ORT
    insists on quantizing the graph outputs; that Q/DQ pair is removed so the logits stay float.
    """
    spec.validate()
    out_path = Path(out_path)
    data = {name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for name, (lo, hi) in ranges.ranges.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # ORT's intermediate files live beside the target (inside the run's cache), never in $TMPDIR
    with tempfile.TemporaryDirectory(prefix=".ptqcal-quant-", dir=out_path.parent) as tmp:
        model = onnx.load(str(prepared_path))
        if 4 in map(stored_bits, spec.all_weight_bits) and _opset(model) < INT4_OPSET:
            # Below opset 21 ORT writes int4 as com.microsoft contrib Q/DQ ops; the standard INT4
            # QuantizeLinear/DequantizeLinear need opset 21.
            model = version_converter.convert_version(model, INT4_OPSET)
        # ORT writes "<input>-inferred.onnx" beside its input and deletes it after: the input is a
        # private copy, so that quantizations of one model running at once never share that file
        prepared_path = Path(tmp) / "prepared.onnx"
        onnx.save(model, str(prepared_path))
        layers_to_exclude(model, spec.exclude)  # every name must be a node
        ranges.check_derived(model, spec.exclude)  # calibrated for the same nodes kept float
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        partial = Path(tmp) / "model.onnx"
        _ort_quantize(prepared_path, partial, cache, model, ranges, spec)
        quantized = onnx.load(str(partial))
        if not spec.quantize_outputs:
            keep_outputs_float(quantized)
        set_weight_codes(quantized, model, spec.bits_of)
        if spec.act_bits < 8:
            clip_activations(quantized, spec.act_bits)
    with atomic_path(out_path) as target:  # beside out_path: /tmp may be another file system
        onnx.save(quantized, str(target))
    return out_path


_TEMPDIR = threading.RLock()  # tempfile.tempdir is one per process: one such call at a time


@contextmanager
def _ort_temporary_files(folder: str | Path) -> Iterator[None]:
    """``quant_pre_process`` and ``quantize_static`` make their own temporary folders in
    ``tempfile.gettempdir()`` and take no folder argument. For the call, point them at ours (inside
    the run's cache, restored after), so a killed run leaves nothing in $TMPDIR. Threads (several
    models' runs side by side) take turns."""
    with _TEMPDIR:
        previous = tempfile.tempdir
        tempfile.tempdir = str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = previous


def quantized_tensors(quantized_path: str | Path) -> set[str]:
    """The activation tensors a QDQ model quantizes (inputs of its activation QuantizeLinear nodes)."""
    model = onnx.load(str(quantized_path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    return {node.input[0].split("_clip_")[0] for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in constants}


@contextmanager
def _ort_warnings_held() -> Iterator[None]:
    """ORT's quantizer warns through the root logger, one line per layer (e.g. each int32 bias it
    clips). For the call, a handler on the root logger takes those records (so Python's last-resort
    handler prints none of them; removed after): what they say is read from the graph instead
    (:func:`clipped_biases`) and reported once."""
    handler = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def clipped_biases(quantized_path: str | Path) -> list[str]:
    """Names of the int32 biases whose codes ORT clipped at the int32 limits (their scale, input
    scale x weight scale, is too small for the float bias)."""
    model = onnx.load(str(quantized_path), load_external_data=False)
    limits = np.iinfo(np.int32)
    dequantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return [init.name for init in model.graph.initializer
            if init.data_type == onnx.TensorProto.INT32 and init.name in dequantized
            and np.isin(numpy_helper.to_array(init), (limits.min, limits.max)).any()]


def _ort_quantize(prepared_path: Path, partial: Path, cache: Path, model: onnx.ModelProto,
                  ranges: CalibrationRanges, spec: QuantSpec) -> None:
    """ORT's ``quantize_static`` with the ranges as its calibration cache and our scales as overrides."""
    with _ort_temporary_files(Path(partial).parent), _ort_warnings_held():
        quantize_static(
            str(prepared_path), str(partial), calibration_data_reader=None,
            calibration_cache_path=cache, calibrate_method=CalibrationMethod.MinMax,
            quant_format=QuantFormat.QDQ, per_channel=True, nodes_to_exclude=list(spec.exclude),
            op_types_to_quantize=op_types_to_quantize(),
            weight_type=_weight_type(spec.weight_bits),
            activation_type=QuantType.QUInt8,
            # Every weight gets explicit symmetric scales (zero point 0) in the overrides. ORT's
            # "symmetric" would also narrow the clip to [-(2^(b-1)-1), 2^(b-1)-1], dropping the
            # code -2^(b-1) that PyTorch's quantizer uses: so WeightSymmetric is off.
            extra_options={"WeightSymmetric": False, "ActivationSymmetric": False,
                           "TensorQuantOverrides": _overrides(model, ranges, spec),
                           # keep our b-bit weight scales even where the int32 bias scale is tiny
                           "QDQDisableWeightAdjustForInt32Bias": True,
                           "QuantizeBias": spec.quantize_bias},
        )


def op_types_to_quantize() -> list[str]:
    """ORT's default choice for QDQ (every op it has a QDQ or QLinear rule for) without
    :data:`KEPT_FLOAT_OPS`."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - set(KEPT_FLOAT_OPS))


def with_layer_weights_quantized(model: onnx.ModelProto, layer: str, bits: int,
                                 convention: str = WeightScale.TORCH) -> onnx.ModelProto:
    """A copy of the float ``model`` in which only ``layer``'s weight is quantized: per-channel
    symmetric b-bit codes (as :func:`set_weight_codes` stores them) dequantized back to float, so the
    layer computes exactly what the quantized graph's DequantizeLinear gives it and everything else
    stays float."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in weighted_nodes(copy) if n.name == layer)
    axis = weight_axes(copy)[node.input[1]]
    init = next(i for i in copy.graph.initializer if i.name == node.input[1])
    weight = numpy_helper.to_array(init).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    scale = weight_scales(weight, axis, bits, convention).reshape(shape)
    qmin, qmax = weight_grid(bits)
    codes = np.clip(np.rint(weight * (np.float32(1) / scale)), qmin, qmax)
    init.CopyFrom(numpy_helper.from_array((codes * scale).astype(np.float32), init.name))
    return copy


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def set_weight_codes(quantized: onnx.ModelProto, float_model: onnx.ModelProto, bits_of: Callable[[str], int]) -> None:
    """Store ``clip(rint(w * (1 / scale)), -2^(b-1), 2^(b-1) - 1)`` as every weight's codes, with
    ``b = bits_of(layer)``.

    ORT rounds ``w / scale`` and clips to the container's range, which is not the b-bit grid. With
    PyTorch's scale convention every channel's largest weight sits on a rounding tie (+-(qmax + 0.5));
    multiplying by the float32 reciprocal, as PyTorch's fake-quant kernels do, settles those ties
    the way PyTorch does.
    """
    float_inits = {init.name: init for init in float_model.graph.initializer}
    float_weight_of = {n.name: n.input[1] for n in weighted_nodes(float_model)}
    initializers = {init.name: init for init in quantized.graph.initializer}
    producers = {out: node for node in quantized.graph.node for out in node.output}
    for node in quantized.graph.node:
        dq = producers.get(node.input[1]) if node.name in float_weight_of else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        codes = initializers[dq.input[0]]
        weight = numpy_helper.to_array(float_inits[float_weight_of[node.name]]).astype(np.float32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        shape[axis] = -1
        inverse = np.float32(1) / numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32).reshape(shape)
        qmin, qmax = weight_grid(bits_of(node.name))
        q = np.clip(np.rint(weight * inverse), qmin, qmax)
        dtype = ml_dtypes.int4 if codes.data_type == onnx.TensorProto.INT4 else np.int8
        codes.CopyFrom(numpy_helper.from_array(q.astype(dtype), codes.name))


def clip_activations(model: onnx.ModelProto, bits: int) -> None:
    """Put a Clip to [code 0, code 2^b - 1] in front of every activation QuantizeLinear."""
    initializers = {init.name: init for init in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
            scale = float(numpy_helper.to_array(initializers[node.input[1]]))
            zero_point = int(numpy_helper.to_array(initializers[node.input[2]]))
            lo, hi = (0 - zero_point) * scale, (2 ** bits - 1 - zero_point) * scale
            clipped = f"{node.input[0]}_clip_{node.name}"
            bounds = [numpy_helper.from_array(np.array(v, np.float32), f"{clipped}_{side}")
                      for v, side in ((lo, "min"), (hi, "max"))]
            model.graph.initializer.extend(bounds)
            new_nodes.append(helper.make_node("Clip", [node.input[0], *(b.name for b in bounds)], [clipped],
                                              name=f"{node.name}_clip"))
            node.input[0] = clipped
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def keep_outputs_float(model: onnx.ModelProto) -> None:
    """Remove the QuantizeLinear -> DequantizeLinear pair in front of each graph output."""
    producers = {out: node for node in model.graph.node for out in node.output}
    for output in model.graph.output:
        dq = producers.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        source = producers.get(q.input[0])
        if source is None:
            continue
        source.output[list(source.output).index(q.input[0])] = output.name
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
    used = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
