"""Attribution ranking and confidence-guided mixed precision against truth known by construction.

The model is a digits MLP (scikit-learn, four Gemm layers) in which one layer is made fragile
without changing what the float model computes: the layer before it gets one extra unit whose
weights and bias are zero (after Relu it is always 0), and the fragile layer gives that unit a
weight 8x its largest real one in every output channel. Float: the unit multiplies zero. Quantized
per channel: the scale follows the outlier, so at 4 bits (step ~1.07x the largest real weight)
the real weights round to 0 or one step, and the layer is destroyed; at 8 bits it is mildly hurt.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import save_classifier
from ptqcal.evaluate.attribution import Attribution, LayerEffect
from ptqcal.evaluate.mixed import MixedChoice, assignment, ordered_moves
from ptqcal.evaluate.record import finite
from ptqcal.quantize.spec import stored_bytes

FRAGILE = "fc3"
OUTLIER = 8.0


def _mlp_with_a_fragile_layer(path, digits):
    """fc1 (64->48) fc2 (48->48, +1 dead unit) fc3 (49->32, fragile) fc4 (32->10)."""
    sklearn = pytest.importorskip("sklearn.neural_network")
    from ptqcal.models.preprocess import DIGITS_PREPROCESS

    x = DIGITS_PREPROCESS(digits.train.images).reshape(len(digits.train), -1)
    mlp = sklearn.MLPClassifier((48, 48, 32), max_iter=600, random_state=0).fit(x, digits.train.labels)
    weights = [w.T.astype(np.float32) for w in mlp.coefs_]  # Gemm with transB: (out, in)
    biases = [b.astype(np.float32) for b in mlp.intercepts_]
    weights[1] = np.vstack([weights[1], np.zeros((1, 48), np.float32)])  # the dead unit: always 0 after Relu
    biases[1] = np.append(biases[1], np.float32(0))
    outlier = OUTLIER * np.abs(weights[2]).max(axis=1, keepdims=True)
    weights[2] = np.hstack([weights[2], outlier.astype(np.float32)])
    names = ["fc1", "fc2", "fc3", "fc4"]
    inits, nodes, current = [], [helper.make_node("Flatten", ["input"], ["x0"], name="flat")], "x0"
    for index, (name, w, b) in enumerate(zip(names, weights, biases)):
        inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
        out = "logits" if name == "fc4" else f"{name}_out"
        nodes.append(helper.make_node("Gemm", [current, f"{name}_w", f"{name}_b"], [out], transB=1, name=name))
        if name != "fc4":
            nodes.append(helper.make_node("Relu", [out], [f"x{index + 1}"], name=f"relu{index + 1}"))
            current = f"x{index + 1}"
    return save_classifier(path, "mlp", nodes, inits, 10)


@pytest.fixture(scope="module")
def fragile_mlp(digits, tmp_path_factory):
    return _mlp_with_a_fragile_layer(tmp_path_factory.mktemp("mlp") / "mlp.onnx", digits)


def _run(model, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0]


def _all_quantized(model, layers, bits):
    from ptqcal.quantize.qdq import with_layer_weights_quantized

    for layer in layers:
        model = with_layer_weights_quantized(model, layer, bits)
    return model


def test_the_fragile_layer_ranks_first_and_the_bottom_half_swaps_less_than_the_top(fragile_mlp, digits, tmp_path):
    from ptqcal.data.pixels import Pixels
    from ptqcal.evaluate.attribution import attribute
    from ptqcal.models.preprocess import DIGITS_PREPROCESS

    pixels = Pixels(digits.eval, DIGITS_PREPROCESS)
    result = attribute(fragile_mlp, lambda limit: pixels.batches(256, DIGITS_PREPROCESS, limit), pixels.labels, (4,),
                       "torch")
    ranking = [e.layer for e in result.ranked()]
    assert ranking[0] == FRAGILE and result.confident > 0.5 * result.images
    model, inputs = onnx.load(str(fragile_mlp)), DIGITS_PREPROCESS(digits.eval.images)
    float_top = _run(model, inputs).argmax(1)
    swaps = {half: np.mean(_run(_all_quantized(model, layers, 4), inputs).argmax(1) != float_top)
             for half, layers in (("top", ranking[:2]), ("bottom", ranking[2:]))}
    assert swaps["bottom"] < swaps["top"]


def test_moves_go_least_sensitive_per_byte_first_and_skip_widths_that_store_no_fewer_bytes():
    """By hand: widths 8, 6, 4; 6 stores as many bytes as 8 (int8 container), so each layer has one
    move, 8 -> 4. Confident swaps per byte saved: a 0.02/50, b 0.01/500, c 0.00/5 (ties on nothing)."""
    def effects(layer, at8, at4):
        return [LayerEffect(layer, 8, 0.0, at8, 0.0, 40.0), LayerEffect(layer, 6, 0.0, at8, 0.0, 30.0),
                LayerEffect(layer, 4, 0.1, at4, 0.0, 20.0)]

    attribution = Attribution(effects("a", 0.0, 0.02) + effects("b", 0.0, 0.01) + effects("c", 0.0, 0.0))
    elements = {"a": 100, "b": 1000, "c": 10}
    moves = ordered_moves(attribution, elements, (8, 6, 4))
    assert [(m.layer, m.from_bits, m.to_bits, m.saved) for m in moves] == [
        ("c", 8, 4, 5), ("b", 8, 4, 500), ("a", 8, 4, 50)]
    assert assignment(elements, (8, 6, 4), moves[:2]) == {"a": 8, "b": 4, "c": 4}
    assert stored_bytes(1001, 4) == 501 and stored_bytes(1001, 6) == 1001


def _codes_and_scales(model):
    """Layer -> (stored codes, per-channel scales) of every DequantizeLinear feeding a Gemm weight."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1] in producers:
            dq = producers[node.input[1]]
            codes = dq.input[0]
            if codes in producers and producers[codes].op_type == "Cast":  # 2-bit codes: INT2 cast to int8
                codes = producers[codes].input[0]
            found[node.name] = (inits[codes].astype(np.int64), inits[dq.input[1]])
    return found


@pytest.mark.slow
def test_mixed_meets_its_target_on_the_held_out_images_and_stores_each_layer_on_its_grid(fragile_mlp, digits,
                                                                                           tmp_path):
    from ptqcal.cli import main
    from ptqcal.data import select
    from ptqcal.quantize.graph import weight_bytes
    from ptqcal.evaluate.metrics import softmax
    from ptqcal.models.preprocess import DIGITS_PREPROCESS
    from ptqcal.quantize.qdq import weight_scales
    from ptqcal.quantize.spec import weight_grid

    out = tmp_path / "run"
    assert main(["run", "--model", str(fragile_mlp), "--dataset", "digits", "--preprocess", "digits", "--weight-bits",
                 "8", "4", "--max-confident-swaps", "1", "--attribution-size", "400", "--no-timing", "--check-images",
                 "0", "--no-progress", "--quiet", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    chosen = dict(record["mixed"]["layer_bits"])
    assert chosen[FRAGILE] == 8 and 4 in chosen.values()  # the fragile layer keeps its bits, others give theirs up
    # the constraint, measured apart from ptqcal's search: the held-out images are the ones select() holds out
    held = select(digits, None, 0, search_size=400).search
    inputs = DIGITS_PREPROCESS(held.images)
    float_logits = _run(onnx.load(str(fragile_mlp)), inputs)
    confident = softmax(float_logits.astype(np.float64)).max(1) >= 0.9
    mixed = onnx.load(str(out / "model_mixed.onnx"))
    swapped = _run(mixed, inputs).argmax(1) != float_logits.argmax(1)
    assert confident.sum() > 100 and swapped[confident].mean() <= 0.01
    uniform = _run(onnx.load(str(out / "model_a8w4.onnx")), inputs).argmax(1) != float_logits.argmax(1)
    assert uniform[confident].mean() > 0.01  # the target was binding: every layer at 4 bits misses it
    float_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fragile_mlp)).graph.initializer}
    stored = _codes_and_scales(mixed)
    assert set(stored) == set(chosen) == {"fc1", "fc2", "fc3", "fc4"}
    for layer, (codes, scales) in stored.items():
        qmin, qmax = weight_grid(chosen[layer])
        assert codes.min() >= qmin and codes.max() <= qmax
        weight = float_weights[f"{layer}_w"]  # (out, in): the channel axis is 0
        np.testing.assert_array_equal(scales, weight_scales(weight, 0, chosen[layer]))  # the b-bit grid's step
        assert (np.abs(codes * scales[:, None] - weight) <= 0.5001 * scales[:, None]).all()  # nearest point on it
    assert weight_bytes(out / "model_mixed.onnx") == record["mixed"]["steps"][-1]["weight_bytes"]
    assert "Mixed precision" in (out / "report.md").read_text() and (out / "fig8_pareto.png").exists()


@pytest.mark.slow
def test_a_size_target_fits_the_bytes_and_an_unreachable_one_says_so(fragile_mlp, tmp_path):
    from ptqcal.cli import main
    from ptqcal.quantize.graph import weight_bytes

    base = ["run", "--model", str(fragile_mlp), "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8",
            "4", "--no-timing", "--check-images", "0", "--no-progress", "--quiet"]
    assert main([*base, "--max-size-ratio", "0.2", "--out", str(tmp_path / "fits")]) == 0
    fits = json.loads((tmp_path / "fits" / "run.json").read_text())["mixed"]
    assert weight_bytes(tmp_path / "fits" / "model_mixed.onnx") <= 0.2 * fits["float_weight_bytes"]
    assert weight_bytes(tmp_path / "fits" / "model_float.onnx") == fits["float_weight_bytes"]
    assert {8, 4} == set(dict(fits["layer_bits"]).values())  # 0.2 lies between int4's 0.125 and int8's 0.25
    assert main([*base, "--max-size-ratio", "0.1", "--out", str(tmp_path / "short")]) == 0
    short = json.loads((tmp_path / "short" / "run.json").read_text())
    assert short["mixed"]["layer_bits"] == [] and "mixed" not in short["configs"]
    assert "no assignment of the run's weight bit widths meets it" in (tmp_path / "short" / "report.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--max-confident-swaps", "1", "--max-size-ratio", "0.2"], "give one"),
    (["--max-confident-swaps", "1", "--weight-bits", "4"], "at least two"),
    (["--max-size-ratio", "1.5"], "(0, 1]"),
    (["--max-confident-swaps", "120"], "invalid value"),
    (["--max-confident-swaps", "1", "--attribution-size", "5000"], "leaves no images"),
    (["--mixed-max-latency-ratio", "1.2"], "caps a mixed-precision search"),
    (["--max-confident-swaps", "1", "--mixed-max-latency-ratio", "1.2", "--no-timing"], "drop --no-timing"),
])
def test_a_target_that_cannot_work_is_one_line_and_exit_2(flags, message, tmp_path, capsys):
    from ptqcal.cli import main

    assert main(["run", "--dataset", "digits", "--no-progress", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_cap_on_the_added_error_rules_out_prefixes_beyond_it():
    """By hand: three moves; the whole model's Δ error grows 0, 1, 2, 3 pp with the moves; confident
    swaps stay 0. With a 1.5 pp cap the longest prefix within both targets is 1 move."""
    from ptqcal.evaluate.mixed import search

    def effects(layer):
        return [LayerEffect(layer, 8, 0.0, 0.0, 0.0, 40.0), LayerEffect(layer, 4, 0.0, 0.0, 0.0, 20.0)]

    attribution = Attribution(effects("a") + effects("b") + effects("c"))
    labels = np.arange(100) % 4
    float_logits = np.eye(4, dtype=np.float32)[labels] * 10  # all correct, all confident

    def measure(layer_bits):
        lowered = sum(bits == 4 for bits in layer_bits.values())
        logits = float_logits.copy()
        logits[:lowered, :] = np.roll(logits[:lowered, :], 1, axis=1)  # `lowered` images now wrong
        return logits

    elements = {"a": 100, "b": 100, "c": 100}
    free = search("max_confident_swaps", 1.0, elements, {k: 400 for k in elements}, (8, 4), 8, attribution,
                  float_logits, measure, labels)
    capped = search("max_confident_swaps", 1.0, elements, {k: 400 for k in elements}, (8, 4), 8, attribution,
                    float_logits, measure, labels, max_delta_error=0.015)
    assert sum(b == 4 for b in free.layer_bits.values()) == 3
    assert sum(b == 4 for b in capped.layer_bits.values()) == 1 and capped.steps[-1].delta_top1_error == 0.01


def test_a_cap_on_the_latency_rules_out_prefixes_slower_than_it():
    """By hand: three moves, no swap at all; each int4 layer adds 0.3x float's latency (ORT dequantizes
    int4 on the CPU): 1.0, 1.3, 1.6, 1.9x. A 1.5x cap keeps 1 move for either target, and every step
    measured records its latency."""
    from ptqcal.evaluate.mixed import search

    def effects(layer):
        return [LayerEffect(layer, 8, 0.0, 0.0, 0.0, 40.0), LayerEffect(layer, 4, 0.0, 0.0, 0.0, 20.0)]

    attribution = Attribution(effects("a") + effects("b") + effects("c"))
    labels = np.arange(100) % 4
    float_logits = np.eye(4, dtype=np.float32)[labels] * 10
    elements = {"a": 100, "b": 100, "c": 100}
    timed = []

    def latency(layer_bits):
        timed.append(dict(layer_bits))
        return 1.0 + 0.3 * sum(bits == 4 for bits in layer_bits.values())

    args = (elements, {k: 400 for k in elements}, (8, 4), 8, attribution, float_logits, lambda bits: float_logits,
            labels)
    free = search("max_confident_swaps", 0.0, *args)
    capped = search("max_confident_swaps", 0.0, *args, max_latency_ratio=1.5, latency=latency)
    assert sum(b == 4 for b in free.layer_bits.values()) == 3
    assert sum(b == 4 for b in capped.layer_bits.values()) == 1 and capped.max_latency_ratio == 1.5
    assert [s.latency_ratio for s in capped.steps] == [1.0 + 0.3 * s.moves for s in capped.steps]
    assert capped.steps[-1].latency_ratio == pytest.approx(1.3) and len(timed) == len({s.moves for s in capped.steps})
    # a size target whose smallest fitting model is too slow: no assignment, said by an empty choice
    assert not search("max_size_ratio", 0.2, *args, max_latency_ratio=1.5, latency=latency).met  # 2 moves: 1.6x
    assert MixedChoice.from_json(json.loads(json.dumps(capped.to_json()))) == capped
    untimed = search("max_confident_swaps", 0.0, *args, max_latency_ratio=1.5, latency=lambda bits: float("nan"))
    assert not untimed.met  # a pass that times nothing (several models side by side) meets no latency cap
    with pytest.raises(ValueError, match="latencies"):
        search("max_confident_swaps", 0.0, *args, max_latency_ratio=1.5)


@pytest.mark.parametrize("target, limit", [("max_confident_swaps", 0.04), ("max_confident_swaps", 0.0),
                                           ("max_size_ratio", 0.6)])
def test_the_models_handed_ahead_are_the_ones_measured_next_and_change_no_choice(target, limit):
    """By hand: eight layers, one move each (8 -> 4); each lowered layer swaps one more of 100
    confident predictions. On a cluster the search hands its next models over first: every model it
    measures was handed over before (the two ends of the bisection together), the choice is the
    one it makes without handing anything over, and only the far end may be measured for nothing."""
    from ptqcal.evaluate.mixed import search

    layers = [f"l{i}" for i in range(8)]
    attribution = Attribution([LayerEffect(name, bits, 0.0, 0.0, 0.0, 40.0 - bits) for name in layers
                               for bits in (8, 4)])
    labels = np.arange(100) % 4
    float_logits = np.eye(4, dtype=np.float32)[labels] * 10
    events = []

    def measure(layer_bits):
        events.append(("measured", tuple(sorted(layer_bits.items()))))
        lowered = sum(bits == 4 for bits in layer_bits.values())
        logits = float_logits.copy()
        logits[:lowered] = np.roll(logits[:lowered], 1, axis=1)
        return logits

    def ahead(assignments):
        events.append(("ahead", [tuple(sorted(bits.items())) for bits in assignments]))

    elements = {name: 100 for name in layers}
    args = (target, limit, elements, {k: 400 for k in elements}, (8, 4), 8, attribution, float_logits, measure, labels)
    plain = search(*args)
    measured_plain = [e for e in events if e[0] == "measured"]
    events.clear()
    handed = search(*args, ahead=ahead)
    assert finite(handed.to_json()) == finite(plain.to_json())  # NaN (unmeasured) is null on both sides
    assert [e for e in events if e[0] == "measured"] == measured_plain  # the same models, in the same order
    given = []
    for kind, what in events:
        if kind == "ahead":
            assert not set(what) & set(given)  # nothing handed over twice
            given += what
        else:
            assert what in given  # handed over before it was measured
    measured = {what for kind, what in events if kind == "measured"}
    if target == "max_confident_swaps":
        ends = [tuple(sorted({name: 8 for name in layers}.items())), tuple(sorted({name: 4 for name in layers}.items()))]
        assert events[0] == ("ahead", ends)
        assert set(given) - measured <= {ends[1]}
    else:
        assert set(given) == measured


def test_the_latency_cap_times_every_model_the_search_measures(fragile_mlp, tmp_path):
    """End to end: with a cap no model can miss, the choice is the uncapped one, and every step the search
    measured carries its batch-1 latency over float's, as the report's table shows it."""
    from ptqcal.cli import main

    args = ["run", "--model", str(fragile_mlp), "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8",
            "4", "--max-confident-swaps", "1", "--attribution-size", "400", "--check-images", "0", "--no-progress",
            "--quiet"]
    assert main([*args, "--no-timing", "--out", str(tmp_path / "free")]) == 0
    assert main([*args, "--mixed-max-latency-ratio", "1000", "--out", str(tmp_path / "capped")]) == 0
    free, capped = (json.loads((tmp_path / run / "run.json").read_text())["mixed"] for run in ("free", "capped"))
    assert capped["layer_bits"] == free["layer_bits"] and capped["max_latency_ratio"] == 1000
    assert all(0 < step["latency_ratio"] < 1000 for step in capped["steps"])
    # the chosen step's ratio is the one the report shows: the mixed model's latency over the float model's
    deployed = json.loads((tmp_path / "capped" / "run.json").read_text())["deployment"]
    assert capped["steps"][-1]["latency_ratio"] == deployed["mixed"]["latency_ms"] / deployed["float"]["latency_ms"]
    assert all(step["latency_ratio"] is None for step in free["steps"])  # NaN when not measured: null in JSON
    assert "latency × float" in (tmp_path / "capped" / "report.md").read_text()
