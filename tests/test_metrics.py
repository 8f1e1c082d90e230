"""Every metric against a hand-worked example or an independent computation."""

import math

import numpy as np
import pytest

from ptqcal.evaluate import (classification_metrics, expected_calibration_error, nll, quantization_change,
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
    assert metrics["top1_error"] == pytest.approx(50.0)
    assert metrics["mean_confidence"] == pytest.approx(70.0)
    # bins: 0.8 correct (gap 0.2), 0.6 wrong (gap 0.6), weights 1/2 each
    assert metrics["ece"] == pytest.approx(100 * (0.2 + 0.6) / 2)


def test_quantization_change_hand_worked():
    float_probs = [[0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]]
    quant_probs = [[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4], [0.6, 0.1, 0.3]]
    labels = np.array([0, 1, 0, 1])
    change = quantization_change(logits_of(float_probs), logits_of(quant_probs), labels)
    # swapped: rows 1 and 3; float wrong on row 2 only (25%), quantized wrong on rows 1, 2, 3 (75%)
    assert change.swapped_pct == pytest.approx(50.0)
    assert change.delta_top1_error_pp == pytest.approx(50.0)
    assert change.ratio == pytest.approx(1.0)
    np.testing.assert_allclose(change.swapped_confidences, [0.5, 0.6])


def test_a_model_compared_with_itself_swaps_nothing():
    logits = np.random.default_rng(1).normal(size=(100, 10))
    change = quantization_change(logits, logits.copy(), np.zeros(100, dtype=int))
    assert change.swapped_pct == 0 and change.delta_top1_error_pp == 0
    assert math.isnan(change.ratio)
