"""ORT's deployed integer kernels against exact integer arithmetic, on this CPU.

On x86 with AVX2 but no VNNI, ORT's uint8 x int8 convolution multiplies with VPMADDUBSW, which adds
pairs of products in int16 with saturation: 255 x 127 + 255 x 127 = 64,770 becomes 32,767. The
report explains a deployed-vs-simulated gap with this; the test checks that the explanation is
right for the CPU it runs on.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcal.evaluate import make_session
from ptqcal.evaluate.cpu import has_vnni
from ptqcal.quantize import CalibrationRanges, QuantSpec, calibration_tensors, prepare, quantize_qdq

CHANNELS = 64


def _conv_model(path):
    weight = np.ones((4, CHANNELS, 1, 1), np.float32)  # every weight is its channel's max: code 127
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["conv"]), helper.make_node("Flatten", ["conv"], ["logits"])],
        "saturate", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHANNELS, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_deployed_int8_kernels_saturate_exactly_where_the_report_says(tmp_path):
    vnni = has_vnni()
    if vnni is None:
        pytest.skip("not an x86 CPU with AVX2: ORT uses other kernels here")
    prepared = prepare(_conv_model(tmp_path / "m.onnx"), tmp_path / "p.onnx")
    tensors = calibration_tensors(onnx.load(str(prepared)))
    ranges = CalibrationRanges("minmax", 8, 1, {name: (0.0, 1.0) if name == "input" else (0.0, 64.0)
                                                for name in tensors})
    quantized = quantize_qdq(prepared, tmp_path / "q.onnx", ranges, QuantSpec(8, quantize_bias=False))
    ones = np.ones((1, CHANNELS, 1, 1), np.float32)  # activation code 255 on every channel
    # exact: 64 products of 255 x 127 codes, times the scales (1/255 and 1/127.5): 64 x 127 / 127.5
    exact = CHANNELS * 127 / 127.5
    simulated = make_session(quantized, fused=False).run(None, {"input": ones})[0]
    deployed = make_session(quantized, fused=True).run(None, {"input": ones})[0]
    np.testing.assert_allclose(simulated, exact, rtol=0.01)
    if vnni:
        np.testing.assert_allclose(deployed, exact, rtol=0.01)
    else:  # each pair saturates at 32,767 of its 64,770: about half the sum survives
        np.testing.assert_allclose(deployed, exact * 32767 / 64770, rtol=0.02)
