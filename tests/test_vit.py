"""The built-in Vision Transformer: a real trained non-CNN model through the whole sweep."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    pytest.importorskip("torch")
    from ptqcal.cli import main

    out = tmp_path_factory.mktemp("vit")
    assert main(["run", "--model", "digits_vit", "--weight-bits", "8", "4", "--no-progress", "--quiet",
                 "--out", str(out)]) == 0
    return out


def _configs(out):
    return {c["config"]: c for c in json.loads((out / "metrics.json").read_text())["runs"][0]["configs"]}


def test_vit_trains_to_a_useful_classifier(vit_run):
    configs = _configs(vit_run)
    assert configs["float"]["top1_error"] < 0.08  # 1,197 held-out digits; the ResNet8 makes ~4%
    assert configs["a8w4"]["top1_error"] < 0.12


def test_attention_weights_are_quantized_per_channel_at_the_swept_bits(vit_run):
    """Every MatMul/Gemm weight of the a8w4 graph has one scale per output channel and int4 codes."""
    model = onnx.load(str(vit_run / "model_a8w4.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    checked = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in producers:
            continue
        dq = producers[node.input[1]]
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        codes, scales = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        channels = codes.shape[0] if node.op_type == "Gemm" and trans_b else codes.shape[1]
        assert scales.shape == (channels,), node.name
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        assert np.asarray(codes, np.int8).min() >= -8 and np.asarray(codes, np.int8).max() <= 7
        checked += 1
    assert checked >= 6  # q/k/v in-projections, out-projections, MLP layers and the head


def test_deployed_vit_runs_integer_kernels_and_the_report_names_what_stays_float(vit_run, tmp_path):
    from ptqcal.evaluate.runner import optimized_op_types

    ops = optimized_op_types(vit_run / "model_a8w8.onnx", tmp_path)
    assert {"QLinearMatMul", "QLinearConv"} <= ops or {"QGemm", "QLinearConv"} <= ops
    report = (vit_run / "report.md").read_text()
    assert "LayerNormalization ×5" in report and "Erf ×2" in report  # 2 layers x 2 + the final norm; GELU
    assert "Convs" not in report
