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
    # Figure 7 is drawn only when a layer swapped a confident prediction (this model holds none)
    assert (tmp_path / "again" / "fig7_layers.png").exists() == (out / "fig7_layers.png").exists()
    assert "Figure 7" in (tmp_path / "again" / "report.md").read_text()


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


# --- the graph cut at each layer against the whole graph ----------------------------------------

def _whole_graph_attribute(model_path, batches, labels, widths, weight_scale):
    """Attribution as it was before the graph was cut, kept here as an independent reference: for
    every (layer, bits) the whole float graph runs over every image with that layer's weights
    quantized, and again over the first SQNR_IMAGES with the layer's output exposed (the float graph
    too, once a layer). Returns the effects and each (layer, bits)'s logits."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    from ptqcal.evaluate.attribution import CONFIDENT, SQNR_IMAGES, LayerEffect
    from ptqcal.evaluate.metrics import quantization_change
    from ptqcal.evaluate.runner import make_session
    from ptqcal.quantize.graph import weighted_nodes
    from ptqcal.quantize.qdq import with_layer_weights_quantized

    def outputs(model, limit=None, tensor=None):
        if tensor is not None:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            copy.graph.output.append(onnx.ValueInfoProto(name=tensor))
            model = copy
        session = make_session(model.SerializeToString())
        feed = session.get_inputs()[0].name
        parts = [session.run(None, {feed: batch}) for batch in batches(limit)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    model = onnx.load(str(model_path))
    float_logits = outputs(model)[0]
    effects, logits = [], {}
    for node in weighted_nodes(model):
        reference = outputs(model, SQNR_IMAGES, node.output[0])[1]
        for bits in widths:
            variant = with_layer_weights_quantized(model, node.name, bits, weight_scale)
            logits[node.name, bits] = outputs(variant)[0]
            change = quantization_change(float_logits, logits[node.name, bits], labels)
            swapped, held = change.confident_swaps(CONFIDENT)
            effects.append(LayerEffect(node.name, bits, change.swap_rate, swapped / held if held else float("nan"),
                                       change.delta_top1_error,
                                       float(sqnr(reference, outputs(variant, SQNR_IMAGES, node.output[0])[1]))))
    return effects, logits


def _assert_cut_equals_whole_graph(model_path, batches, labels, widths, monkeypatch, scale="torch"):
    """Every (layer, bits): the logits agree to float rounding (ORT may fuse a suffix's kernels
    differently from the whole graph's), each image's prediction is the same, and so are the swap
    numbers; the SQNR to 1e-4 relative. Returns the effects."""
    from ptqcal.evaluate import attribution

    reference, whole_logits = _whole_graph_attribute(model_path, batches, labels, widths, scale)
    seen = []
    measured = attribution.quantization_change

    def recording(float_logits, logits, labels):
        seen.append(logits)
        return measured(float_logits, logits, labels)

    monkeypatch.setattr(attribution, "quantization_change", recording)
    result = attribution.attribute(model_path, batches, labels, widths, scale)
    assert len(seen) == 1 + len(reference)  # the float logits against themselves, then one per (layer, bits)
    for effect, expected, logits in zip(result.effects, reference, seen[1:]):
        whole = whole_logits[expected.layer, expected.weight_bits]
        assert (effect.layer, effect.weight_bits) == (expected.layer, expected.weight_bits)
        np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
        np.testing.assert_array_equal(logits.argmax(1), whole.argmax(1))
        assert (effect.swapped, effect.delta_top1_error) == (expected.swapped, expected.delta_top1_error)
        np.testing.assert_equal(effect.confident_swapped, expected.confident_swapped)  # NaN equals NaN
        assert effect.sqnr_db == pytest.approx(expected.sqnr_db, rel=1e-4)
    return result


def _stream(inputs, batch):
    return lambda limit: (inputs[s:min(s + batch, limit or len(inputs))] for s in range(0, limit or len(inputs), batch))


@pytest.mark.parametrize("budget", [None, 0])
def test_cut_attribution_equals_the_whole_graphs_on_hand_built_graphs(budget, tmp_path, monkeypatch):
    """A residual graph with shape arithmetic across the cuts, and a weight two layers share (both
    change together, as before), each cut kept in memory or (a budget of 0 bytes) streamed."""

    from ptqcal.evaluate import cut

    inputs, labels = _graphs_with_cuts(cut, budget, monkeypatch, 3, 90)
    for path in _residual_and_tied(tmp_path):
        result = _assert_cut_equals_whole_graph(path, _stream(inputs, 20), labels, (8, 3, 2), monkeypatch)
        assert any(e.swapped > 0 for e in result.effects)


@pytest.mark.slow
def test_cut_attribution_equals_the_whole_graphs_on_the_real_resnet20(tmp_path, monkeypatch):
    """The authors' CIFAR-100 ResNet20 on the 120 real images of ../shared and their mirror images,
    in batches of 64 (the last one 48)."""
    pytest.importorskip("torch")
    from conftest import shared_file
    from ptqcal.export import export_onnx
    from ptqcal.models import get_model_entry
    from ptqcal.models.preprocess import CIFAR100_PREPROCESS
    from ptqcal.quantize import prepare

    weights = shared_file("models/cifar100_resnet20.pth")
    parts = [np.load(shared_file(f"data/cifar100/{name}.npz")) for name in ("test_head20", "train_subset")]
    images = np.concatenate([p["images"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts] * 2)
    inputs = CIFAR100_PREPROCESS(np.concatenate([images, images[:, :, ::-1]]))
    export_onnx(get_model_entry("cifar_resnet20").build(weights, None, tmp_path), inputs[:8], tmp_path / "r20.onnx")
    prepared = prepare(tmp_path / "r20.onnx", tmp_path / "prepared.onnx")
    result = _assert_cut_equals_whole_graph(prepared, _stream(inputs, 64), labels, (8, 3), monkeypatch)
    assert len(result.effects) == 2 * 22 and result.confident > 50
    assert max(e.confident_swapped for e in result.effects) > 0.05  # 3 bits does swap confident predictions


@pytest.mark.slow
def test_cut_attribution_equals_the_whole_graphs_on_resnet56(tmp_path, monkeypatch):
    """ResNet56 (random weights: its 57 convolutions and the fc, residual stages whose cuts ORT's
    blocked layout fuses differently) on 96 CIFAR-sized images in batches of 64, at 3 bits."""
    pytest.importorskip("torch")
    from ptqcal.export import export_onnx
    from ptqcal.models import RANDOM_WEIGHTS, get_model_entry
    from ptqcal.models.preprocess import CIFAR100_PREPROCESS
    from ptqcal.quantize import prepare

    rng = np.random.default_rng(6)
    inputs = CIFAR100_PREPROCESS(rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8))
    labels = rng.integers(0, 100, 96)
    export_onnx(get_model_entry("cifar_resnet56").build(RANDOM_WEIGHTS, None, tmp_path), inputs[:8],
                tmp_path / "r56.onnx")
    prepared = prepare(tmp_path / "r56.onnx", tmp_path / "prepared.onnx")
    result = _assert_cut_equals_whole_graph(prepared, _stream(inputs, 64), labels, (3,), monkeypatch)
    assert len(result.effects) == 58 and any(e.swapped > 0 for e in result.effects)


@pytest.mark.slow
def test_cut_attribution_equals_the_whole_graphs_on_the_vit(digits, tmp_path, monkeypatch):
    """The digits ViT (attention reshapes its activations with batch-sized shape arithmetic that
    crosses the cuts), in batches of 40. In batches of 24 the SQNR's 32 images are two batches, and
    attention's layer outputs, (tokens, images, width), do not stack along their first axis (the
    whole-graph way failed there): the same numbers, the SQNR to float rounding (its norm sums the
    values in another order)."""
    pytest.importorskip("torch")
    from ptqcal.export import export_onnx
    from ptqcal.models import get_model_entry
    from ptqcal.models.preprocess import DIGITS_PREPROCESS
    from ptqcal.quantize import prepare

    inputs = DIGITS_PREPROCESS(digits.eval.images)
    export_onnx(get_model_entry("digits_vit").build(None, digits.train, tmp_path), inputs[:8], tmp_path / "vit.onnx")
    prepared = prepare(tmp_path / "vit.onnx", tmp_path / "prepared.onnx")
    result = _assert_cut_equals_whole_graph(prepared, _stream(inputs, 40), digits.eval.labels, (4, 2), monkeypatch,
                                            "ort")
    assert len(result.effects) == 2 * 10 and any(e.swapped > 0 for e in result.effects)
    from ptqcal.evaluate.attribution import attribute

    smaller = attribute(prepared, _stream(inputs, 24), digits.eval.labels, (4, 2), "ort")
    for effect, expected in zip(smaller.effects, result.effects):
        assert (effect.swapped, effect.delta_top1_error) == (expected.swapped, expected.delta_top1_error)
        assert effect.sqnr_db == pytest.approx(expected.sqnr_db, rel=1e-5)


def test_a_memoised_layer_runs_nothing_and_a_missing_one_alone_is_computed(tmp_path, monkeypatch):
    from ptqcal.evaluate import attribution, runner

    model = _two_layer_model(tmp_path / "m.onnx")
    inputs = np.random.default_rng(4).normal(size=(50, 1, 8, 8)).astype(np.float32)
    labels = np.random.default_rng(5).integers(0, 6, 50)
    stored, computed, sessions = {}, [], []
    made = runner.make_session

    def counting(*args, **kwargs):
        sessions.append(1)
        return made(*args, **kwargs)

    def memo(layer, bits, compute):
        if (layer, bits) not in stored:
            computed.append((layer, bits))
            stored[layer, bits] = compute()
        return stored[layer, bits]

    def run():
        return attribution.attribute(model, _stream(inputs, 16), labels, (4, 2), "torch", memo=memo).to_json()

    monkeypatch.setattr(runner, "make_session", counting)
    first = run()
    assert len(computed) == 4
    computed.clear(), sessions.clear()
    assert run() == first and computed == [] and len(sessions) == 1  # the float logits alone
    del stored["fc", 2]
    assert run() == first and computed == [("fc", 2)]


@pytest.mark.parametrize("budget", [None, 0, 20_000])
def test_a_layer_measured_alone_equals_the_same_layer_measured_among_all(budget, tmp_path, monkeypatch):
    """What a cluster task (or a resumed run) computes for one (layer, bits) is, bit for bit, what a
    run measuring every layer computes for it: with every cut kept, none kept (streamed), or some."""

    from ptqcal.evaluate import cut
    from ptqcal.evaluate.attribution import Attribution, attribute, float_logits, layer_effect, weight_layers

    inputs, labels = _graphs_with_cuts(cut, budget, monkeypatch, 6, 70)
    for path in _residual_and_tied(tmp_path):
        batches = _stream(inputs, 16)
        together = attribute(path, batches, labels, (8, 3), "torch")
        reference = float_logits(path, batches)
        assert [e.layer for e in together.effects[::2]] == weight_layers(path)
        alone = [layer_effect(path, batches, labels, reference, e.layer, e.weight_bits, "torch")
                 for e in together.effects]
        assert Attribution(alone, together.images, together.confident).to_json() == together.to_json()
        given = attribute(path, batches, labels, (8, 3), "torch", reference=reference)  # the float logits kept
        assert given.to_json() == together.to_json()


def _graphs_with_cuts(cut, budget, monkeypatch, seed: int, count: int):
    """(inputs, labels) for the residual and shared-weight graphs, with ``budget`` bytes of cuts kept."""
    if budget is not None:
        monkeypatch.setattr(cut, "CUT_BYTES", budget)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, 1, 8, 8)).astype(np.float32), rng.integers(0, 6, count)


def _residual_and_tied(tmp_path):
    """The residual graph, then the shared-weight one, each saved to the same file in turn."""
    from test_cut import _residual_model, _tied_model

    for model in (_residual_model(tmp_path / "r.onnx"), _tied_model(tmp_path / "t.onnx")):
        path = tmp_path / "m.onnx"
        onnx.save(model, str(path))
        yield path


def test_the_sessions_a_measurement_keeps_alive_do_not_spin_while_idle(tmp_path, monkeypatch):
    """Several sessions of one measurement live at once and run in turn: each is made without
    spinning (ORT's own option, read back from the session), while evaluation keeps ORT's default."""
    from ptqcal.evaluate import attribution, runner

    model = _two_layer_model(tmp_path / "m.onnx")
    inputs = np.random.default_rng(4).normal(size=(20, 1, 8, 8)).astype(np.float32)
    made, spinning = runner.make_session, []

    def recording(*args, **kwargs):
        session = made(*args, **kwargs)
        try:
            spinning.append(session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: ORT's default
            spinning.append("default")
        return session

    monkeypatch.setattr(runner, "make_session", recording)
    reference = attribution.float_logits(model, _stream(inputs, 8))
    assert spinning == ["default"]  # ORT's default (spinning): one session, run alone
    spinning.clear()
    attribution.attribute(model, _stream(inputs, 8), np.zeros(20, int), (4,), "torch", reference=reference)
    assert len(spinning) >= 3 and set(spinning) == {"0"}
