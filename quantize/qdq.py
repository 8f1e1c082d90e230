"""ONNX Runtime static QDQ quantization from precomputed activation ranges."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from ptqcal.errors import UserError

from .calibrate import CalibrationRanges

SUPPORTED_WEIGHT_BITS = (8, 4)
SUPPORTED_ACT_BITS = (8,)
INT4_OPSET = 21
_WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}


@dataclass(frozen=True)
class QuantSpec:
    """One point of the sweep: per-channel symmetric weights, per-tensor asymmetric activations."""

    weight_bits: int
    act_bits: int = 8

    @property
    def name(self) -> str:
        return f"a{self.act_bits}w{self.weight_bits}"

    def validate(self) -> "QuantSpec":
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise UserError(f"weight bit width {self.weight_bits} is not supported yet: "
                            f"choose from {', '.join(map(str, SUPPORTED_WEIGHT_BITS))}")
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise UserError(f"activation bit width {self.act_bits} is not supported yet: choose 8")
        return self


def prepare(float_path: str | Path, out_path: str | Path) -> Path:
    """ORT's ``quant_pre_process``: shape inference and graph optimisation before quantization.

    Symbolic shape inference is skipped: image classifiers have one symbolic (batch) dimension,
    which ONNX's own shape inference handles, and it would need sympy on torch-free machines.
    """
    out_path = Path(out_path)
    quant_pre_process(str(float_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def quantize_qdq(prepared_path: str | Path, out_path: str | Path, ranges: CalibrationRanges,
                 spec: QuantSpec) -> Path:
    """Write the QDQ model of ``spec`` using ``ranges`` instead of a fresh calibration pass.

    The ranges reach ``quantize_static`` through ORT's own calibration cache, so ORT computes the
    scales and zero points exactly as it would after its own calibration. ORT insists on
    quantizing the graph outputs; their Q/DQ pair is removed afterwards so the logits stay float.
    """
    spec.validate()
    out_path = Path(out_path)
    data = {name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for name, (lo, hi) in ranges.ranges.items()}
    with tempfile.TemporaryDirectory(prefix="ptqcal-quant-") as tmp:
        if spec.weight_bits == 4 and _opset(prepared_path) < INT4_OPSET:
            # Below opset 21 ORT would write int4 as com.microsoft contrib Q/DQ ops; the standard
            # INT4 QuantizeLinear/DequantizeLinear need opset 21.
            upgraded = version_converter.convert_version(onnx.load(str(prepared_path)), INT4_OPSET)
            prepared_path = Path(tmp) / "prepared_opset21.onnx"
            onnx.save(upgraded, str(prepared_path))
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        partial = Path(tmp) / "model.onnx"
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # ORT logs a pre-processing hint at WARNING on every call
        try:
            quantize_static(
                str(prepared_path), str(partial), calibration_data_reader=None,
                calibration_cache_path=cache, calibrate_method=CalibrationMethod.MinMax,
                quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=_WEIGHT_TYPES[spec.weight_bits], activation_type=QuantType.QUInt8,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        finally:
            logger.setLevel(level)
        model = onnx.load(str(partial))
        keep_outputs_float(model)
        onnx.save(model, str(partial))
        os.replace(partial, out_path)
    return out_path


def _opset(model_path: str | Path) -> int:
    model = onnx.load(str(model_path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


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
