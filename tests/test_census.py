"""The census of a graph against ops counted by hand in graphs that ORT's own quantizers make."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import tiny_onnx_classifier
from ptqcal.quantize.census import census_lines, graph_census, tensor_bytes

CLASSES = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Conv(8 filters, 3x3) - Relu - GlobalAveragePool - Flatten - Gemm(10 classes), input (N, 1, 8, 8)."""
    return tiny_onnx_classifier(tmp_path_factory.mktemp("census") / "tiny.onnx", classes=CLASSES)


@pytest.fixture(scope="module")
def calibration():
    return np.random.default_rng(1).normal(size=(32, 1, 8, 8)).astype(np.float32)


def _static(tiny, calibration, fmt: str):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from ptqcal.quantize.calibrate import ArrayDataReader

    out = tiny.with_name(f"tiny_{fmt}.onnx")
    if not out.exists():
        quantize_static(str(tiny), str(out), ArrayDataReader("input", calibration, 8),
                        quant_format=getattr(QuantFormat, fmt), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def test_qoperator_graph_counted_by_hand(tiny, calibration):
    census = graph_census(_static(tiny, calibration, "QOperator"))
    # ORT fuses the Relu into QLinearConv; the Flatten moves uint8 codes between the integer ops
    assert census.integer_ops == {"QuantizeLinear": 1, "QLinearConv": 1, "QLinearGlobalAveragePool": 1,
                                  "Flatten": 1, "QGemm": 1, "DequantizeLinear": 1}
    assert census.float_ops == {} and census.qdq_ops == {}
    assert census.format == "qoperator" and census.activations_quantized and not census.simulated_twin
    assert (census.producer, census.producer_version) == ("onnx.quantize", "0.1.0")
    # int8: weights 8*1*3*3 + 10*8, per-channel zero points 8 + 10; int32 biases 8 + 10; float32 scales:
    # 8 + 10 per channel and 4 activations (input, conv, pool, logits), each with a uint8 zero point
    assert census.weight_bytes == {"INT8": 72 + 80 + 18, "INT32": 4 * 18, "FLOAT": 4 * (18 + 4), "UINT8": 4}


def test_qdq_graph_has_a_simulated_twin(tiny, calibration):
    census = graph_census(_static(tiny, calibration, "QDQ"))
    # Q/DQ on the input, conv(+relu), pool, flatten and logits; DQ on two weights and two biases
    assert census.integer_ops == {"QuantizeLinear": 5, "DequantizeLinear": 5 + 4}
    assert census.qdq_ops == {"Conv": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert census.float_ops == {}
    assert census.format == "qdq" and census.activations_quantized and census.simulated_twin


def test_dynamic_graph_counted_by_hand(tiny):
    from onnxruntime.quantization import quantize_dynamic

    out = tiny.with_name("tiny_dynamic.onnx")
    quantize_dynamic(str(tiny), str(out))
    census = graph_census(out)
    # per weight layer: DynamicQuantizeLinear, ConvInteger/MatMulInteger, Cast of the int32 sums,
    # two Muls (input scale x weight scale, then the sums) and the bias Add (the conv's reshaped)
    assert census.integer_ops == {"DynamicQuantizeLinear": 2, "ConvInteger": 1, "MatMulInteger": 1, "Cast": 2}
    assert census.float_ops == {"Mul": 4, "Add": 2, "Reshape": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1}
    assert census.format == "dynamic" and census.activations_quantized and not census.simulated_twin


def test_float_and_float16_graphs(tiny, tmp_path):
    from ptqcal.quantize.fp16 import convert_fp16

    census = graph_census(tiny)
    assert census.format == "float" and not census.activations_quantized and not census.integer_ops
    assert census.float_ops == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert census.weight_bytes == {"FLOAT": 4 * (72 + 8 + 80 + 10)}
    half = graph_census(convert_fp16(tiny, tmp_path / "half.onnx"))
    assert half.format == "float16" and half.weight_bytes["FLOAT16"] == 2 * (72 + 8 + 80 + 10)


def test_packed_sizes():
    def tensor(data_type, count):
        return helper.make_tensor("t", data_type, [count], [1] * count)

    assert tensor_bytes(tensor(TensorProto.INT4, 5)) == 3  # two codes to a byte
    assert tensor_bytes(tensor(TensorProto.UINT4, 8)) == 4
    assert tensor_bytes(tensor(TensorProto.INT2, 5)) == 2  # four codes to a byte
    assert tensor_bytes(tensor(TensorProto.INT8, 5)) == 5
    assert tensor_bytes(tensor(TensorProto.FLOAT16, 5)) == 10


def test_weight_only_qdq_int4(tmp_path):
    """DequantizeLinear of stored int4 weights into MatMul: weights quantized, activations float."""
    codes = helper.make_tensor("w_q", TensorProto.INT4, [8, 10], np.zeros(80, np.int8).tolist())
    scale = helper.make_tensor("w_s", TensorProto.FLOAT, [], [0.1])
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [codes, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    census = graph_census(model)
    assert census.format == "qdq" and not census.activations_quantized and census.simulated_twin
    assert census.weight_bytes == {"INT4": 40, "FLOAT": 4}
    assert census.qdq_ops == {"MatMul": 1} and census.integer_ops == {"DequantizeLinear": 1}


def test_census_lines(tiny, calibration, tmp_path):
    model = onnx.load(str(_static(tiny, calibration, "QOperator")))
    model.metadata_props.add(key="made_with", value="a test")
    lines = census_lines(graph_census(model))
    assert lines[0] == "Made by onnx.quantize 0.1.0."
    assert lines[1].startswith("Format: QOperator")
    assert "Integer ops: " in lines[2] and "QLinearConv 1" in lines[2]
    assert "Activations are quantized." in lines
    assert any(line.startswith("Metadata: ") and "made_with=a test" in line for line in lines)
    assert all("\n" not in line for line in lines)
