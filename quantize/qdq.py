"""ONNX Runtime static QDQ quantization at any bit width from precomputed activation ranges.

ORT's quantizer writes 8-, 16- and 4-bit integers. Weight codes are stored in the narrowest type
that holds them (:func:`.spec.stored_bits`), on their own b-bit grid: 2-bit codes as packed INT2
(opset 25; ORT writes them in int8, :func:`set_weight_codes` repacks them and a Cast to int8 reads
them: see :func:`_store_int2`), 3- and 4-bit codes as packed INT4 (opset 21), 5..8-bit codes in
int8. Weights get the per-channel scales of a b-bit quantizer through ``TensorQuantOverrides`` (ORT
then rounds with them and we clip the stored codes to the b-bit range, since ORT clips only to its
container's); activations below 8 bits get the scale and zero point of a b-bit quantizer and a
Clip to the calibrated range in front of each QuantizeLinear, because QuantizeLinear saturates only
at the container's 0..255.

This module writes models; what a graph says about its quantization (weight layers, op types, the
tensors and biases a QDQ model quantized) is asked of :mod:`.graph`. ORT's calls change
process-wide state (``tempfile.tempdir``, the root logger) for their duration only.
"""

from __future__ import annotations

import logging
import os
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
from ptqcal.cache import scratch_folder

from .calibrate import CalibrationRanges
from .graph import layers_to_exclude, op_types_to_quantize, weight_axes, weighted_nodes
from .spec import QuantSpec, WeightScale, stored_bits, weight_grid

INT4_OPSET = 21  # the standard QuantizeLinear/DequantizeLinear take INT4 from opset 21
INT2_OPSET = 25  # and INT2 from opset 25 (a file holding INT2 declares IR version 13 or later)


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
    with scratch_folder(out_path.parent, ".ptqcal-prepare-") as tmp, _ort_temporary_files(tmp):
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


def _weight_type(bits: int) -> QuantType:
    """The type ORT writes b-bit weight codes in: int4 for the widths stored as INT4, else int8 (2-bit
    codes are repacked as INT2 afterwards: ORT's quantizer has no 2-bit type)."""
    return QuantType.QInt4 if stored_bits(bits) == 4 else QuantType.QInt8


def _with_opset_for_weights(model: onnx.ModelProto, spec: QuantSpec) -> onnx.ModelProto:
    """``model`` converted to the opset its weight types need: 25 if a quantized layer gets 2-bit
    weights (INT2), else 21 if ``spec`` has a width stored as INT4 (below 21 ORT would write int4 as
    com.microsoft contrib Q/DQ ops), else ``model`` itself."""
    held = {spec.bits_of(node.name) for node in weighted_nodes(model) if node.name not in spec.exclude}
    target = INT2_OPSET if 2 in map(stored_bits, held) \
        else INT4_OPSET if 4 in map(stored_bits, spec.all_weight_bits) else 0
    return version_converter.convert_version(model, target) if _opset(model) < target else model


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
    with scratch_folder(out_path.parent, ".ptqcal-quant-") as tmp:
        model = _with_opset_for_weights(onnx.load(str(prepared_path)), spec)
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


# tempfile.tempdir and the root logger are one per process: one ORT call changes them at a time
# (Ray's driver threads and the pipeline's configuration threads quantize side by side)
_PROCESS_STATE = threading.RLock()


@contextmanager
def _ort_temporary_files(folder: str | Path) -> Iterator[None]:
    """``quant_pre_process`` and ``quantize_static`` make their own temporary folders in
    ``tempfile.gettempdir()`` and take no folder argument. For the call, point them at ours (inside
    the run's cache), so a killed run leaves nothing in $TMPDIR; restored after, whatever happens."""
    with _PROCESS_STATE:
        previous = tempfile.tempdir
        tempfile.tempdir = str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = previous


class _FromOrtQuantizer(logging.Filter):
    """Drops the records logged by ORT's quantization package (told apart by their source file)."""

    def __init__(self) -> None:
        super().__init__()
        import onnxruntime.quantization

        self._folder = os.path.normcase(os.path.dirname(onnxruntime.quantization.__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not os.path.normcase(record.pathname).startswith(self._folder)


@contextmanager
def _ort_warnings_held() -> Iterator[None]:
    """ORT's quantizer warns with ``logging.warning``, on the root logger, one line per layer (e.g.
    each int32 bias it clips): what they say is read from the graph instead (``clipped_biases``) and
    reported once. For the call only, a filter on the root logger drops ORT's records (whatever
    handlers are configured), and a NullHandler keeps ``logging.warning`` from calling
    ``basicConfig``, which would leave a stderr handler on an unconfigured root logger for good.
    Both are removed after, whatever happens. Meanwhile another thread's record that no handler
    takes is not printed by Python's last resort either."""
    root, records, handler = logging.getLogger(), _FromOrtQuantizer(), logging.NullHandler()
    with _PROCESS_STATE:
        root.addFilter(records)
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.removeFilter(records)


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
    ``b = bits_of(layer)``, in the type :func:`.spec.stored_bits` says (2-bit codes, which ORT wrote
    in int8, as packed INT2: :func:`_store_int2`).

    ORT rounds ``w / scale`` and clips to the container's range, which is not the b-bit grid. With
    PyTorch's scale convention every channel's largest weight sits on a rounding tie (+-(qmax + 0.5));
    multiplying by the float32 reciprocal, as PyTorch's fake-quant kernels do, settles those ties
    the way PyTorch does.
    """
    float_inits = {init.name: init for init in float_model.graph.initializer}
    float_weight_of = {n.name: n.input[1] for n in weighted_nodes(float_model)}
    initializers = {init.name: init for init in quantized.graph.initializer}
    producers = {out: node for node in quantized.graph.node for out in node.output}
    int2_dequantizers = []
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
        bits = bits_of(node.name)
        qmin, qmax = weight_grid(bits)
        q = np.clip(np.rint(weight * inverse), qmin, qmax)
        dtype = {2: ml_dtypes.int2, 4: ml_dtypes.int4}.get(stored_bits(bits), np.int8)
        codes.CopyFrom(numpy_helper.from_array(q.astype(dtype), codes.name))
        if dtype is ml_dtypes.int2:
            int2_dequantizers.append(dq)
    if int2_dequantizers:
        _store_int2(quantized, int2_dequantizers)


def _store_int2(quantized: onnx.ModelProto, dequantizers: list[onnx.NodeProto]) -> None:
    """Put ``Cast(to=INT8)`` between each of ``dequantizers`` and its INT2 codes, and declare the IR
    version INT2 needs (13).

    ORT 1.32 runs DequantizeLinear on INT2 itself, but its QDQ fusion (Conv, Gemm and MatMul
    selectors) checks weights for int4, not int2: an INT2 weight DequantizeLinear between quantized
    activations is fused into a QLinearConv/QGemm that takes no int2, and the session fails to load.
    The Cast keeps the file's codes packed four to a byte; ORT folds it into an int8 initializer
    when the session is made, so both paths compute what the int8 container did (the deployed one on
    the same integer kernels), and the DequantizeLinear keeps its int8 zero point.
    """
    casts = {}
    for dq in dequantizers:
        unpacked = f"{dq.input[0]}_int8"
        casts[dq.output[0]] = helper.make_node("Cast", [dq.input[0]], [unpacked], name=f"{unpacked}_cast",
                                               to=onnx.TensorProto.INT8)
        dq.input[0] = unpacked
    nodes = [new for node in quantized.graph.node
             for new in ((casts[node.output[0]], node) if node.output and node.output[0] in casts else (node,))]
    del quantized.graph.node[:]
    quantized.graph.node.extend(nodes)
    int2_ir = helper.find_min_ir_version_for([helper.make_opsetid("", INT2_OPSET)])
    quantized.ir_version = max(quantized.ir_version, int2_ir)


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
