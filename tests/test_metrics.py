"""Every metric against a hand-worked example or an independent computation."""

import math

import numpy as np
import pytest

from ptqcal.evaluate import (Metrics, classification_metrics, expected_calibration_error, nll, quantization_change,
                             reliability_curve, top_k_error)


def logits_of(probabilities):
    return np.log(np.asarray(probabilities, dtype=np.float64))


def test_ece_hand_worked():
    # 15 bins of width 1/15. 0.9 and 0.9 share bin (0.867, 0.933]: accuracy 0.5, gap 0.4, weight 2/4.
    # 0.62 alone (correct): gap 0.38, weight 1/4. 0.31 alone (wrong): gap 0.31, weight 1/4.
    confidences = np.array([0.9, 0.9, 0.62, 0.31])
    correct = np.array([True, False, True, False])
    expected = 0.4 * 2 / 4 + 0.38 / 4 + 0.31 / 4
    assert expected_calibration_error(confidences, correct) == pytest.approx(expected)


def test_reliability_bins_are_right_closed():
    curve = reliability_curve(np.array([0.0, 1 / 15 + 1e-9, 1.0]), np.array([True, True, False]))
    assert curve.counts[0] == 1 and curve.counts[1] == 1 and curve.counts[-1] == 1
    assert curve.counts.sum() == 3


def test_perfectly_calibrated_model_has_ece_near_zero():
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.1, 1.0, 200_000)
    correct = rng.uniform(size=confidences.size) < confidences
    assert expected_calibration_error(confidences, correct) < 0.005


def test_nll_hand_worked():
    logits = logits_of([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    labels = np.array([0, 2])
    assert nll(logits, labels) == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2)


def test_nll_is_shift_invariant_and_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0]])
    assert nll(logits, np.array([0])) == pytest.approx(0.0, abs=1e-12)
    assert nll(logits, np.array([1])) == pytest.approx(1000.0)


def test_top_k_error():
    logits = np.array([[0.1, 0.5, 0.3, 0.05], [0.9, 0.05, 0.03, 0.02], [0.2, 0.3, 0.4, 0.1]])
    labels = np.array([2, 0, 3])
    assert top_k_error(logits, labels, 1) == pytest.approx(2 / 3)
    assert top_k_error(logits, labels, 2) == pytest.approx(1 / 3)
    assert top_k_error(logits, labels, 5) == 0.0  # k larger than the class count


def test_classification_metrics_units():
    logits = logits_of([[0.8, 0.2], [0.4, 0.6]])
    metrics = classification_metrics(logits, np.array([0, 0]))
    # fractions, not percent
    assert metrics.top1_error == pytest.approx(0.5)
    assert metrics.mean_confidence == pytest.approx(0.7)
    # bins: 0.8 correct (gap 0.2), 0.6 wrong (gap 0.6), weights 1/2 each
    assert metrics.ece == pytest.approx((0.2 + 0.6) / 2)
    assert metrics.swapped is None  # no reference: nothing changed
    assert Metrics.unit("ece") == "fraction" and Metrics.unit("nll") == "nats"


def test_quantization_change_hand_worked():
    float_probs = [[0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]]
    quant_probs = [[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4], [0.6, 0.1, 0.3]]
    labels = np.array([0, 1, 0, 1])
    change = quantization_change(logits_of(float_probs), logits_of(quant_probs), labels)
    # swapped: rows 1 and 3; float wrong on row 2 only (25%), quantized wrong on rows 1, 2, 3 (75%)
    assert change.swap_rate == pytest.approx(0.5)
    assert change.delta_top1_error == pytest.approx(0.5)
    assert change.ratio == pytest.approx(1.0)
    np.testing.assert_allclose(change.swapped_confidences, [0.5, 0.6])


def test_a_model_compared_with_itself_swaps_nothing():
    logits = np.random.default_rng(1).normal(size=(100, 10))
    change = quantization_change(logits, logits.copy(), np.zeros(100, dtype=int))
    assert change.swap_rate == 0 and change.delta_top1_error == 0
    assert math.isnan(change.ratio)


# --- the rest of issue 5's metrics ---------------------------------------------------------------

from ptqcal.evaluate.metrics import (ClassificationAccumulator, bootstrap_interval, brier, changes_by_confidence,  # noqa: E402
                                     classwise_ece, logit_margin, softmax, swap_probability_by_margin)
from ptqcal.evaluate.temperature import fit_temperature  # noqa: E402


def test_brier_hand_worked():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.5² + 0.25² + 0.75²) = 0.875
    assert brier(probabilities, np.array([0, 2])) == pytest.approx((0.14 + 0.875) / 2)


def test_equal_mass_bins_and_mce_hand_worked():
    confidences = np.array([0.95, 0.9, 0.6, 0.55])
    correct = np.array([True, True, False, True])
    # 2 equal-mass bins: {0.55, 0.6} acc 0.5 conf 0.575; {0.9, 0.95} acc 1 conf 0.925
    curve = reliability_curve(confidences, correct, 2, "quantile")
    assert list(curve.counts) == [2, 2]
    assert curve.ece == pytest.approx((0.075 + 0.075) / 2)
    assert curve.mce == pytest.approx(0.075)
    # 15 equal-width bins: (8/15, 9/15] holds 0.55 and 0.6 (gap 0.075), 0.9 alone (gap 0.1), 0.95 alone (0.05)
    width = reliability_curve(confidences, correct, 15)
    assert width.mce == pytest.approx(0.1)


def test_classwise_ece_hand_worked():
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7]])
    labels = np.array([0, 0])
    # class 0: p = 0.8 (hit) gap 0.2, p = 0.3 (hit) gap 0.7 -> 0.45; class 1: p = 0.2 gap 0.2, 0.7 gap 0.7 -> 0.45
    assert classwise_ece(probabilities, labels) == pytest.approx(0.45)


def test_streaming_accumulator_equals_the_pure_functions():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(10_000, 7)) * 3
    labels = rng.integers(0, 7, 10_000)
    accumulator = ClassificationAccumulator()
    for start in range(0, 10_000, 999):  # uneven chunks
        accumulator.update(logits[start:start + 999], labels[start:start + 999])
    streamed = accumulator.compute()
    p = softmax(logits)
    assert streamed.top1_error == pytest.approx(top_k_error(logits, labels, 1))
    assert streamed.top5_error == pytest.approx(top_k_error(logits, labels, 5))
    assert streamed.nll == pytest.approx(nll(logits, labels))
    assert streamed.brier == pytest.approx(brier(p, labels))
    assert streamed.ece == pytest.approx(expected_calibration_error(p.max(1), p.argmax(1) == labels))
    assert streamed.classwise_ece == pytest.approx(classwise_ece(p, labels))


def test_bootstrap_interval_covers_the_truth_and_is_seeded():
    sample = np.random.default_rng(0).normal(5.0, 1.0, 2000)
    lo, hi = bootstrap_interval(np.mean, (sample,), 500, seed=1)
    assert lo < 5.0 < hi and hi - lo < 0.2
    assert bootstrap_interval(np.mean, (sample,), 500, seed=1) == (lo, hi)


def test_transitions_add_up_to_the_swaps():
    rng = np.random.default_rng(4)
    float_logits = rng.normal(size=(3000, 10)) * 2
    quant_logits = float_logits + rng.normal(size=float_logits.shape)
    labels = rng.integers(0, 10, 3000)
    change = quantization_change(float_logits, quant_logits, labels)
    transitions = change.transitions()
    assert sum(transitions.values()) == change.swapped.sum() > 0
    assert (transitions["correct_to_wrong"] - transitions["wrong_to_correct"]) / 3000 == \
        pytest.approx(change.delta_top1_error)
    by_confidence = changes_by_confidence(change)
    assert by_confidence["counts"].sum() == 3000
    weights = by_confidence["counts"] / 3000
    assert np.nansum(by_confidence["swap_rate"] * weights) == pytest.approx(change.swap_rate)
    assert np.nansum(by_confidence["delta_error"] * weights) == pytest.approx(change.delta_top1_error)
    curve = swap_probability_by_margin(change)
    assert curve["counts"].sum() == 3000
    assert curve["swap_probability"][0] > curve["swap_probability"][-1]  # small margins flip more


def test_logit_margin():
    np.testing.assert_allclose(logit_margin(np.array([[1.0, 5.0, 3.0], [2.0, 2.0, 0.0]])), [2.0, 0.0])


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20_000, 10)) * 3
    probabilities = softmax(logits / 2.5)  # labels drawn from a model whose true temperature is 2.5
    labels = (rng.uniform(size=(20_000, 1)) > probabilities.cumsum(1)).sum(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_ece_of_a_calibrated_model_shrinks_with_n():
    rng = np.random.default_rng(1)
    eces = []
    for n in (500, 5_000, 50_000):
        confidence = rng.uniform(0.2, 1.0, n)
        eces.append(expected_calibration_error(confidence, rng.uniform(size=n) < confidence))
    assert eces[0] > eces[1] > eces[2] and eces[2] < 0.01


def test_margins_of_swapped_and_kept_predictions():
    float_logits = np.array([[5.0, 0.0], [1.0, 0.9], [0.0, 3.0], [2.0, 1.8]])
    quant_logits = np.array([[5.0, 0.0], [0.9, 1.0], [0.0, 3.0], [1.7, 1.8]])
    summary = quantization_change(float_logits, quant_logits, np.array([0, 0, 1, 0])).summary()
    assert summary["median_float_margin_swapped"] == pytest.approx(0.15)  # margins 0.1 and 0.2
    assert summary["median_float_margin_kept"] == pytest.approx(4.0)  # margins 5 and 3
