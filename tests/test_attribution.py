"""Attribution against truth known by construction: a layer whose weights lie exactly on the b-bit
grid changes nothing when quantized alone; a layer's fake-quantized weights are what the deployed
QDQ graph dequantizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import save_classifier
from ptqcal.data import Split
from ptqcal.models.preprocess import PreprocessCfg
from ptqcal.data.pixels import Pixels


def _two_layer_model(path):
    """Conv(1->4, 3x3) whose weights are -c, 0 or c per channel (exact on ORT's 2-bit grid:
    scale = max|w| / 1), then Gemm(4->6) with Gaussian weights (far from any 2-bit grid)."""
    rng = np.random.default_rng(0)
    conv = rng.integers(-1, 2, (4, 1, 3, 3)).astype(np.float32)
    conv[:, 0, 0, 0] = 1.0  # every channel reaches its scale
    conv *= np.array([0.5, 1.0, 2.0, 0.25], np.float32)[:, None, None, None]
    inits = [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "fc_w")]
    nodes = [helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1, name="fc")]
    return save_classifier(path, "g", nodes, inits, 6)


def test_a_layer_on_the_grid_changes_nothing_and_the_other_is_ranked_first(tmp_path):
    from ptqcal.evaluate.attribution import attribute
    from ptqcal.evaluate.record import ConfigInfo, ConfigKind

    model = _two_layer_model(tmp_path / "m.onnx")
    preprocess = PreprocessCfg((1, 8, 8), (0.5,), (0.25,))
    images = np.random.default_rng(1).integers(0, 256, (400, 8, 8), dtype=np.uint8)
    pixels = Pixels(Split(images, np.random.default_rng(2).integers(0, 6, 400)), preprocess)
    result = attribute(model, lambda limit: pixels.batches(64, preprocess, limit), pixels.labels, (2,), "ort")
    effects = {e.layer: e for e in result.effects}
    assert effects["conv"].swapped == 0.0 and effects["conv"].delta_top1_error == 0.0
    assert effects["conv"].sqnr_db > 100  # no quantization noise at all: ORT's measure caps at its epsilon
    assert effects["fc"].swapped > 0.05 and effects["fc"].sqnr_db < 30
    assert result.ranked()[0].layer == "fc" and result.images == 400


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantized_weights_are_what_the_qdq_graph_dequantizes(bits, tmp_path, digits_onnx, digits_inputs):
    from ptqcal.quantize import QuantSpec, collect_histograms, compute_ranges, prepare, quantize_qdq
    from ptqcal.quantize.calibrate import ArrayDataReader
    from ptqcal.quantize.graph import weighted_nodes
    from ptqcal.quantize.qdq import with_layer_weights_quantized

    prepared = prepare(digits_onnx, tmp_path / "prepared.onnx")
    histograms = collect_histograms(prepared, ArrayDataReader("input", digits_inputs[0][:64], 32), progress=False)
    quantized = onnx.load(str(quantize_qdq(prepared, tmp_path / "q.onnx", compute_ranges(histograms, "mse", 8, 64),
                                           QuantSpec(bits, 8))))
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    producers = {out: n for n in quantized.graph.node for out in n.output}
    float_model = onnx.load(str(prepared))
    for node in weighted_nodes(float_model)[:3] + weighted_nodes(float_model)[-1:]:
        ours = next(numpy_helper.to_array(i) for i in with_layer_weights_quantized(float_model, node.name, bits).graph.initializer
                    if i.name == node.input[1])
        qnode = next(n for n in quantized.graph.node if n.name == node.name)
        dq = producers[qnode.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * ours.ndim
        shape[axis] = -1
        theirs = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]].reshape(shape)
        np.testing.assert_array_equal(ours, theirs.astype(np.float32))


@pytest.mark.slow
def test_run_attribute_writes_the_table_the_csv_and_the_figure(tmp_path):
    """Every weight layer at every bit width, kept in run.json so that `ptqcal report` rebuilds the
    table, layers.csv and Figure 7 without running a model."""
    import csv
    import json

    from conftest import tiny_onnx_classifier
    from ptqcal.cli import main

    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    out = tmp_path / "run"
    assert main(["run", "--model", str(model), "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8",
                 "2", "--attribute", "--attribution-size", "200", "--no-timing", "--no-progress", "--quiet",
                 "--out", str(out)]) == 0
    stored = json.loads((out / "run.json").read_text())["attribution"]
    assert stored["images"] == 200 and len(stored["effects"]) == 2 * 2  # Conv and Gemm, 8 and 2 bits
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert {(r["layer"], r["weight_bits"]) for r in rows} == {(e["layer"], str(e["weight_bits"])) for e in stored["effects"]}
    assert "Which layers flip confident predictions" in (out / "report.md").read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "layers.csv").read_text() == (out / "layers.csv").read_text()
    assert (tmp_path / "again" / "fig7_layers.png").exists()


def test_a_graph_without_weight_layers_attributes_nothing_and_the_report_still_builds(tmp_path):
    """Flatten -> identity logits: no Conv/Gemm/MatMul weight, so no effect, no table, no Figure 7."""
    from ptqcal.analysis.report import build_report
    from ptqcal.evaluate import RunRecord
    from ptqcal.evaluate.attribution import attribute
    from ptqcal.evaluate.record import ConfigInfo, ConfigKind

    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["logits"], name="flat")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    preprocess = PreprocessCfg((1, 2, 2), (0.0,), (1.0,))
    images = np.random.default_rng(0).integers(0, 256, (50, 2, 2), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 4, 50)
    pixels = Pixels(Split(images, labels), preprocess)
    result = attribute(tmp_path / "m.onnx", lambda limit: pixels.batches(256, preprocess, limit), labels, (4,), "torch")
    assert result.effects == [] and result.images == 50
    logits = preprocess(images).reshape(50, 4)
    RunRecord("m", labels, {"float": logits, "a8w4": logits}, attribution=result,
              descriptors={"float": ConfigInfo("float", ConfigKind.FLOAT), "a8w4": ConfigInfo("a8w4", ConfigKind.UNIFORM, 4, 8)}).save(tmp_path / "run")
    build_report([tmp_path / "run"], tmp_path / "report")
    assert "Which layers" not in (tmp_path / "report" / "report.md").read_text()
    assert not (tmp_path / "report" / "fig7_layers.png").exists() and not (tmp_path / "report" / "layers.csv").exists()


def test_an_undefined_confident_share_is_null_in_json_and_nan_again_when_read():
    import json
    import math

    from ptqcal.evaluate.attribution import Attribution, LayerEffect

    result = Attribution([LayerEffect("conv", 4, 0.25, float("nan"), 0.01, 20.0)], images=8, confident=0)
    text = json.dumps(result.to_json(), allow_nan=False)  # strict JSON: no NaN token
    assert json.loads(text)["effects"][0]["confident_swapped"] is None
    back = Attribution.from_json(json.loads(text))
    assert math.isnan(back.effects[0].confident_swapped) and back.effects[0].swapped == 0.25
