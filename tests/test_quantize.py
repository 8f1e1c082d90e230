"""The QDQ graphs ORT gets from us: what is quantized, how, and that ORT runs it fused."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from ptqcal.evaluate import make_session, optimized_op_types, predict
from ptqcal.quantize import (ArrayDataReader, CalibrationRanges, QuantSpec, collect_histograms, compute_ranges,
                             prepare, quantize_qdq)
from ptqcal.errors import InputError


@pytest.fixture(scope="module")
def prepared(digits_onnx, tmp_path_factory):
    return prepare(digits_onnx, tmp_path_factory.mktemp("prep") / "prepared.onnx")


@pytest.fixture(scope="module")
def ranges(prepared, digits_inputs):
    histograms = collect_histograms(prepared, ArrayDataReader("input", digits_inputs[0][:128], 32), progress=False)
    return compute_ranges(histograms, "mse", 8, 128)


@pytest.fixture(scope="module", params=[8, 7, 6, 5, 4, 3, 2])
def quantized(request, prepared, ranges, tmp_path_factory):
    bits = request.param
    path = quantize_qdq(prepared, tmp_path_factory.mktemp("q") / f"a8w{bits}.onnx", ranges, QuantSpec(bits))
    return bits, path


def b_bit_per_channel(weight, bits, convention="torch"):
    """PyTorch's own b-bit per-channel (axis 0) symmetric fake quantizer: the independent truth."""
    import torch

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = torch.from_numpy(np.array(weight))
    absmax = w.reshape(len(w), -1).abs().amax(dim=1)
    scale = absmax / ((qmax - qmin) / 2 if convention == "torch" else qmax)
    zero = torch.zeros(len(w), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, qmin, qmax).numpy()


def _weight_dequantizers(model):
    """(layer, its weight's DequantizeLinear, initializers) with the DequantizeLinear's inputs as
    initializer names: 2-bit codes reach it through a Cast (INT2 -> INT8), stored under the Cast's input."""
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers.get(node.input[1])
            cast = producers.get(dq.input[0]) if dq is not None else None
            if cast is not None and cast.op_type == "Cast":
                dq = onnx.helper.make_node(dq.op_type, [cast.input[0], *dq.input[1:]], dq.output, name=dq.name,
                                           axis=next(a.i for a in dq.attribute if a.name == "axis"))
            yield node, dq, initializers


# The type each width's codes are stored in: packed INT2, packed INT4 (3 and 4 bits), int8
STORED_TYPE = {2: onnx.TensorProto.INT2, 3: onnx.TensorProto.INT4, 4: onnx.TensorProto.INT4}


def test_every_conv_and_gemm_weight_is_per_channel_symmetric_on_the_b_bit_grid(quantized, prepared):
    bits, path = quantized
    model = onnx.load(str(path))
    float_weights = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(prepared)).graph.initializer}
    expected_type = STORED_TYPE.get(bits, onnx.TensorProto.INT8)
    count = 0
    for node, dq, initializers in _weight_dequantizers(model):
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{node.name} weight is not dequantized"
        codes, scale, zero = (initializers[name] for name in dq.input)
        assert codes.data_type == expected_type
        out_channels = codes.dims[0]
        assert list(scale.dims) == [out_channels], "per-channel: one scale per output channel"
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert axis == 0
        assert not np.any(numpy_helper.to_array(zero)), "symmetric: zero points are 0"
        assert zero.data_type == (onnx.TensorProto.INT8 if bits == 2 else expected_type)  # the Cast's output type
        q = numpy_helper.to_array(codes).astype(np.int32)
        qmax = 2 ** (bits - 1) - 1
        assert q.min() >= -qmax - 1 and q.max() <= qmax
        scale_shape = (-1,) + (1,) * (q.ndim - 1)
        dequantized = q * numpy_helper.to_array(scale).reshape(scale_shape)
        np.testing.assert_allclose(dequantized, b_bit_per_channel(float_weights[node.input[1]
                                   .removesuffix("_DequantizeLinear_Output")], bits), rtol=1e-5, atol=1e-7)
        count += 1
    assert count == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node) > 5


def test_logits_stay_float(quantized):
    model = onnx.load(str(quantized[1]))
    producer = next(n for n in model.graph.node if "logits" in n.output)
    assert producer.op_type == "Gemm"
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_opset_is_raised_only_for_int4_and_int2(quantized, prepared):
    bits, path = quantized
    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    exported = next(o.version for o in onnx.load(str(prepared)).opset_import if o.domain in ("", "ai.onnx"))
    assert opset == {2: 25, 3: 21, 4: 21}.get(bits, exported)
    assert model.ir_version == (13 if bits == 2 else onnx.load(str(prepared)).ir_version)


def test_int8_and_int2_run_fused_on_cpu_and_int4_does_not(quantized, tmp_path):
    bits, path = quantized
    ops = optimized_op_types(path, tmp_path)
    if bits not in (3, 4):  # INT2 codes reach the kernel through a Cast to int8, which ORT folds
        assert "QLinearConv" in ops and "Conv" not in ops
    else:  # ORT has no int4 Conv kernel on CPU: the weights are dequantized and the Conv runs in float
        assert "QLinearConv" not in ops and "Conv" in ops


def test_quantized_model_tracks_the_float_model(quantized, digits_onnx, digits_inputs):
    bits, path = quantized
    eval_inputs = digits_inputs[1]
    float_pred = predict(make_session(digits_onnx), eval_inputs, progress=False).argmax(1)
    # the simulated path: the quantizer's arithmetic, not this CPU's integer kernels (on AVX2 without
    # VNNI ORT's uint8 x int8 kernels saturate; test_cpu_kernels covers that)
    quant_pred = predict(make_session(path, fused=False), eval_inputs, progress=False).argmax(1)
    agreement = np.mean(float_pred == quant_pred)
    assert agreement > {8: 0.99, 7: 0.99, 6: 0.98, 5: 0.97, 4: 0.95, 3: 0.9, 2: 0.3}[bits]


def test_ranges_round_trip_and_cover_every_activation(ranges, prepared, tmp_path):
    path = ranges.save(tmp_path / "ranges.json")
    again = CalibrationRanges.load(path)
    assert again == ranges
    assert "input" in ranges.ranges and len(ranges.ranges) > 10
    assert all(lo <= 0 <= hi or lo <= hi for lo, hi in ranges.ranges.values())


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_activation_codes_stay_on_the_b_bit_grid(bits, prepared, ranges, digits_inputs, tmp_path):
    path = quantize_qdq(prepared, tmp_path / "a.onnx", ranges, QuantSpec(8, bits))
    model = onnx.load(str(path))
    codes = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(codes) > 5
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in codes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(codes, {"input": digits_inputs[1][:256] * 1.5})  # also beyond the calibrated range
    assert max(int(o.max()) for o in outputs) <= 2 ** bits - 1
    if bits < 8:
        assert max(int(o.max()) for o in outputs) == 2 ** bits - 1  # the clip is reached, not avoided


def test_ort_scale_convention_is_max_over_qmax(prepared, ranges, tmp_path):
    path = quantize_qdq(prepared, tmp_path / "ort.onnx", ranges, QuantSpec(5, weight_scale="ort"))
    model = onnx.load(str(path))
    float_weights = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(prepared)).graph.initializer}
    node, dq, initializers = next(_weight_dequantizers(model))
    weight = float_weights[node.input[1].removesuffix("_DequantizeLinear_Output")]
    scale = numpy_helper.to_array(initializers[dq.input[1]])
    np.testing.assert_allclose(scale, np.abs(weight.reshape(len(weight), -1)).max(axis=1) / 15, rtol=1e-6)
    codes = numpy_helper.to_array(initializers[dq.input[0]]).astype(np.float32)
    np.testing.assert_allclose(codes * scale.reshape(-1, 1, 1, 1), b_bit_per_channel(weight, 5, "ort"), atol=1e-7)


def test_unsupported_bit_widths_are_rejected():
    for bits in (1, 9, 16):
        with pytest.raises(InputError, match="bit width"):
            QuantSpec(bits).validate()
        with pytest.raises(InputError, match="activation"):
            QuantSpec(8, bits).validate()


def _tiny_bias_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A Conv whose weights are tiny and whose bias is not: its bias scale (input scale x weight
    scale) is ~1e-12, so the bias's int32 code would be ~1e12 and ORT clips it (and warns); the other
    layer's bias is left alone. Returns the prepared model and calibration images."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.normal(size=(4, 1, 3, 3)) * 1e-9).astype(np.float32), "tiny_w"),
             numpy_helper.from_array(np.ones(4, np.float32), "tiny_b"),
             numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.full(3, 0.1, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["input", "tiny_w", "tiny_b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    return prepare(tmp_path / "m.onnx", tmp_path / "prepared.onnx"), rng.uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)


def test_clipped_int32_biases_are_found_in_the_graph_and_not_printed(tmp_path, capfd):
    """ORT's per-layer warning is held back (the report says it once)."""
    from ptqcal.quantize.graph import clipped_biases

    prepared, x = _tiny_bias_model(tmp_path)
    ranges = compute_ranges(collect_histograms(prepared, ArrayDataReader("input", x, 16), progress=False), "minmax", 8,
                            16)
    capfd.readouterr()
    path = quantize_qdq(prepared, tmp_path / "q.onnx", ranges, QuantSpec(8, 8))
    assert "exceeds the range" not in capfd.readouterr().err
    assert [name.split("_quantized")[0] for name in clipped_biases(path)] == ["tiny_b"]


def test_ort_warnings_leave_an_unconfigured_root_logger_unconfigured(tmp_path):
    """``logging.warning`` on a root logger without handlers calls ``basicConfig``, which would leave
    a stderr handler behind for good: in a fresh interpreter (pytest configures the root logger),
    ORT's warning prints nothing and the root logger ends as it began."""
    import subprocess
    import sys

    prepared, x = _tiny_bias_model(tmp_path)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import logging, tempfile
import numpy as np
from ptqcal.quantize import ArrayDataReader, QuantSpec, collect_histograms, compute_ranges, quantize_qdq
from ptqcal.quantize.graph import clipped_biases
x = np.load({str(tmp_path / "x.npy")!r})
ranges = compute_ranges(collect_histograms({str(prepared)!r}, ArrayDataReader("input", x, 16), progress=False), "minmax")
root = logging.getLogger()
before = (list(root.handlers), list(root.filters), root.level, tempfile.tempdir)
path = quantize_qdq({str(prepared)!r}, {str(tmp_path / "q.onnx")!r}, ranges, QuantSpec(8, 8))
assert clipped_biases(path), "ORT clipped (and warned about) a bias"
assert (list(root.handlers), list(root.filters), root.level, tempfile.tempdir) == before
logging.getLogger("elsewhere").warning("after the call, the last resort prints again")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "after the call, the last resort prints again"


def test_the_report_says_which_configurations_had_biases_clipped():
    from ptqcal.config import RunConfig
    from ptqcal.report_text import run_notes

    notes = [n for n in run_notes(RunConfig(), (), [], [], clipped_biases={"a8w8": 2, "a8w4": 0, "a8w6": 1})
             if "clipped int32 biases" in n]
    assert len(notes) == 1 and notes[0].endswith("a8w8 2 layers, a8w6 1 layer.")
