"""A deployed graph checked against the float model before anything runs; its codes read as logits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_onnx_classifier
from ptqcal.evaluate.compat import (CompatError, Quantization, check_compatible, logits_decoding,
                                    with_float32_output)

CLASSES = 10


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return tiny_onnx_classifier(tmp_path_factory.mktemp("compat") / "float.onnx", classes=CLASSES)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).normal(size=(40, 1, 8, 8)).astype(np.float32)


def _run(path, batch):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def _edited(float_model, target, edit):
    model = onnx.load(str(float_model))
    edit(model)
    onnx.save(model, str(target))
    return target


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_another_input_size_is_refused_naming_both_shapes(float_model, tmp_path):
    other = tiny_onnx_classifier(tmp_path / "big.onnx", classes=CLASSES)
    model = onnx.load(str(other))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 16
    onnx.save(model, str(other))
    with pytest.raises(CompatError) as caught:
        check_compatible(other, float_model, setting="deployed")
    message = _one_line(caught)
    assert "'input' [N, 1, 16, 16] float32" in message and "'input' [N, 1, 8, 8] float32" in message
    assert caught.value.setting == "deployed"


def test_another_class_count_is_refused_naming_both_shapes(float_model, tmp_path):
    other = tiny_onnx_classifier(tmp_path / "five.onnx", classes=5)
    with pytest.raises(CompatError) as caught:
        check_compatible(other, float_model)
    message = _one_line(caught)
    assert "gives 5 classes where the float model gives 10" in message
    assert "[N, 5]" in message and "[N, 10]" in message


def test_other_name_layout_and_fixed_batch_are_refused(float_model, tmp_path):
    def rename(model):
        model.graph.input[0].name = model.graph.node[0].input[0] = "pixels"

    with pytest.raises(CompatError, match="another name"):
        check_compatible(_edited(float_model, tmp_path / "renamed.onnx", rename), float_model)

    def batch_one(model):
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1

    with pytest.raises(CompatError, match=r"\[1, 1, 8, 8\].*\[N, 1, 8, 8\].*batch fixed at 1"):
        check_compatible(_edited(float_model, tmp_path / "one.onnx", batch_one), float_model)

    def channels_last(model):  # only the declared shape is read: the graph need not run
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for dim, value in zip(dims, ("N", "H", "W", 1)):
            dim.Clear()
            setattr(dim, "dim_param" if isinstance(value, str) else "dim_value", value)

    nhwc = _edited(float_model, tmp_path / "nhwc.onnx", channels_last)
    with pytest.raises(CompatError, match="NHWC where the float model is NCHW"):
        check_compatible(nhwc, float_model)


def test_ort_qoperator_graph_fits_as_is(float_model, images, tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    from ptqcal.quantize.calibrate import ArrayDataReader

    out = tmp_path / "qop.onnx"
    quantize_static(str(float_model), str(out), ArrayDataReader("input", images, 8), quant_format=QuantFormat.QOperator)
    fit = check_compatible(out, float_model)
    assert fit.encode.quantization is None and fit.decode.quantization is None
    assert fit.encode(images) is images  # a float input and output: nothing to convert


def _quantized_logits(model, scale=0.05, zero_point=128):
    """The logits through a QuantizeLinear: the graph gives uint8 codes."""
    model.graph.node[-1].output[0] = "float_logits"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "out_scale"),
                                    numpy_helper.from_array(np.array(zero_point, np.uint8), "out_zero")])
    model.graph.node.append(helper.make_node("QuantizeLinear", ["float_logits", "out_scale", "out_zero"], ["logits"]))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8


def test_uint8_output_is_dequantized_with_the_graphs_scale(float_model, images, tmp_path):
    coded = _edited(float_model, tmp_path / "coded.onnx", _quantized_logits)
    fit = check_compatible(coded, float_model)
    assert fit.decode.quantization == Quantization("uint8", (float(np.float32(0.05)),), (128,))
    raw = _run(coded, images)
    assert raw.dtype == np.uint8
    by_hand = (raw.astype(np.float32) - 128) * np.float32(0.05)
    np.testing.assert_array_equal(fit.decode(raw), by_hand)
    reference = _run(float_model, images)  # within half a step of the float logits (none saturates here)
    assert np.abs(reference).max() < 127 * 0.05
    np.testing.assert_allclose(fit.decode(raw), reference, atol=0.05 / 2 + 1e-6)


def test_codes_without_a_scale_are_refused(float_model, tmp_path):
    def cast_logits(model):
        model.graph.node[-1].output[0] = "float_logits"
        model.graph.node.append(helper.make_node("Cast", ["float_logits"], ["logits"], to=TensorProto.UINT8))
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8

    with pytest.raises(CompatError) as caught:
        logits_decoding(_edited(float_model, tmp_path / "cast.onnx", cast_logits))
    assert "does not say (made by Cast)" in _one_line(caught)


def test_uint8_input_is_quantized_with_its_dequantizer_scale(float_model, images, tmp_path):
    scale, zero_point = 0.02, 128

    def coded_input(model):
        model.graph.node[0].input[0] = "dequantized"
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "in_scale"),
                                        numpy_helper.from_array(np.array(zero_point, np.uint8), "in_zero")])
        model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["input", "in_scale", "in_zero"],
                                                    ["dequantized"]))
        model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8

    coded = _edited(float_model, tmp_path / "coded_in.onnx", coded_input)
    fit = check_compatible(coded, float_model)
    fed = fit.encode(images)
    np.testing.assert_array_equal(fed, np.clip(np.rint(images / np.float32(scale)) + zero_point, 0, 255))
    assert fed.dtype == np.uint8
    clipped = np.clip(images, -128 * scale, 127 * scale)  # what the codes can say
    np.testing.assert_allclose(fit.decode(_run(coded, fed)), _run(float_model, clipped), atol=0.05)


def test_float16_and_bfloat16_outputs_become_float32(float_model, images, tmp_path):
    def cast_to(elem):
        def edit(model):
            model.graph.node[-1].output[0] = "float_logits"
            model.graph.node.append(helper.make_node("Cast", ["float_logits"], ["logits"], to=elem))
            model.graph.output[0].type.tensor_type.elem_type = elem
        return edit

    reference = _run(float_model, images)
    half = _edited(float_model, tmp_path / "half.onnx", cast_to(TensorProto.FLOAT16))
    decode = check_compatible(half, float_model).decode
    assert not decode.needs_float_copy
    logits = decode(_run(half, images))
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference, rtol=1e-3, atol=1e-3)
    brain = _edited(float_model, tmp_path / "bf16.onnx", cast_to(TensorProto.BFLOAT16))
    assert check_compatible(brain, float_model).decode.needs_float_copy
    copy = with_float32_output(brain, tmp_path / "bf16_as_float.onnx")
    assert not check_compatible(copy, float_model).decode.needs_float_copy
    np.testing.assert_allclose(_run(copy, images), reference, rtol=1e-2, atol=1e-2)


def test_codes_from_a_qlinear_op_are_read_with_its_output_scale(float_model, images, tmp_path):
    """ORT's QOperator graph without its last DequantizeLinear gives QGemm's uint8 codes: read with
    QGemm's y_scale and y_zero_point they equal what that DequantizeLinear made of them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from ptqcal.quantize.calibrate import ArrayDataReader

    qop = tmp_path / "qop.onnx"
    quantize_static(str(float_model), str(qop), ArrayDataReader("input", images, 8), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8)

    def drop_dequantizer(model):
        last = model.graph.node[-1]
        assert last.op_type == "DequantizeLinear"
        model.graph.node.remove(last)
        model.graph.output[0].name = last.input[0]
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8

    codes = _edited(qop, tmp_path / "codes.onnx", drop_dequantizer)
    decode = logits_decoding(codes)
    assert decode.quantization is not None and decode.quantization.dtype == "uint8"
    np.testing.assert_array_equal(decode(_run(codes, images)), _run(qop, images))
