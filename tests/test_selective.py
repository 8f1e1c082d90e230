"""Selective prediction against hand-worked cases and a slow threshold-by-threshold implementation."""

import math

import numpy as np
import pytest

from ptqcal.evaluate.metrics import CHUNK
from ptqcal.evaluate.selective import (SCORES, aurc, confidence_score, coverage_at_risk, excess_aurc, oracle_aurc,
                                       risk_at_coverage, risk_coverage, selective_intervals, selective_summary)

# five predictions; 0.8 is a tie group of one correct and one wrong prediction
SCORE = np.array([0.5, 0.8, 0.9, 0.8, 0.6])
CORRECT = np.array([True, False, True, True, False])


def test_risk_coverage_hand_worked():
    # accept >= 0.9: {0.9} 0 errors of 1; >= 0.8: 1 of 3; >= 0.6: 2 of 4; >= 0.5: 2 of 5
    curve = risk_coverage(CORRECT, SCORE)
    assert curve.threshold.tolist() == [0.9, 0.8, 0.6, 0.5]
    assert curve.accepted.tolist() == [1, 3, 4, 5]
    assert curve.coverage == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert curve.risk == pytest.approx([0, 1 / 3, 1 / 2, 2 / 5])


def test_aurc_hand_worked():
    # each prediction at the risk of the group it enters with: 0.9 -> 0, both 0.8 -> 1/3, 0.6 -> 1/2, 0.5 -> 2/5
    expected = (0 + 2 * (1 / 3) + 1 / 2 + 2 / 5) / 5
    assert aurc(CORRECT, SCORE) == pytest.approx(expected)
    # the oracle puts the 3 correct first: prefixes 4 and 5 hold 1 and 2 errors
    assert oracle_aurc(CORRECT) == pytest.approx((1 / 4 + 2 / 5) / 5)
    assert excess_aurc(CORRECT, SCORE) == pytest.approx(expected - (1 / 4 + 2 / 5) / 5)


def test_risk_at_coverage_hand_worked():
    assert risk_at_coverage(CORRECT, SCORE, 0.2) == 0
    assert risk_at_coverage(CORRECT, SCORE, 0.3) == pytest.approx(1 / 3)  # the tie enters whole: coverage 0.6
    assert risk_at_coverage(CORRECT, SCORE, 0.6) == pytest.approx(1 / 3)
    assert risk_at_coverage(CORRECT, SCORE, 0.61) == pytest.approx(1 / 2)
    assert risk_at_coverage(CORRECT, SCORE, 1.0) == pytest.approx(2 / 5)


def test_coverage_at_risk_hand_worked():
    assert coverage_at_risk(CORRECT, SCORE, 0.4) == pytest.approx(1.0)  # full coverage has risk exactly 2/5
    assert coverage_at_risk(CORRECT, SCORE, 0.39) == pytest.approx(0.6)  # 1/3 at 0.6; 1/2 at 0.8 is too much
    assert coverage_at_risk(CORRECT, SCORE, 0.0) == pytest.approx(0.2)
    assert coverage_at_risk(~CORRECT, SCORE, 0.1) == 0.0  # the most confident prediction is already wrong


def test_computed_coverage_is_not_lost_to_rounding():
    # 0.1 * 7 is 0.7000000000000001 in floats, above 7/10: coverage must still be reached at 7 of 10
    score = np.arange(10, 0, -1.0)
    correct = np.array([True] * 7 + [False] * 3)
    assert 0.1 * 7 > 7 / 10
    assert risk_at_coverage(correct, score, 0.1 * 7) == 0.0
    assert 0.7 - 0.4 < 3 / 10  # a risk target computed as 0.7 - 0.4 must still admit risk 3/10 (full coverage)
    assert coverage_at_risk(correct, score, 0.7 - 0.4) == 1.0


def slow_curve(correct, score):
    """Every distinct threshold, by hand: (coverage, risk) of accepting score >= t."""
    points = []
    for t in sorted(set(score.tolist()), reverse=True):
        accepted = score >= t
        points.append((accepted.mean(), np.mean(~correct[accepted])))
    return points


def slow_aurc(correct, score):
    # each prediction counted at the risk of accepting everything scoring at least as high as it
    return np.mean([np.mean(~correct[score >= s]) for s in score])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [1, 2, None])  # heavy ties, some ties, none
def test_against_slow_implementation(seed, decimals):
    rng = np.random.default_rng(seed)
    n = 60
    score = rng.uniform(size=n)
    if decimals is not None:
        score = np.round(score, decimals)
    correct = rng.uniform(size=n) < 0.3 + 0.6 * score  # confident predictions tend to be right
    points = slow_curve(correct, score)
    curve = risk_coverage(correct, score)
    assert curve.coverage == pytest.approx([c for c, _ in points])
    assert curve.risk == pytest.approx([r for _, r in points])
    assert aurc(correct, score) == pytest.approx(slow_aurc(correct, score))
    for coverage in (0.05, 0.5, 0.8, 0.9, 1.0):
        smallest = min((c, r) for c, r in points if c >= coverage - 1e-12)
        assert risk_at_coverage(correct, score, coverage) == pytest.approx(smallest[1])
    for risk in (0.0, 0.1, 0.2, 0.35, 1.0):
        kept = [c for c, r in points if r <= risk + 1e-12]
        assert coverage_at_risk(correct, score, risk) == pytest.approx(max(kept) if kept else 0.0)


def test_without_ties_aurc_is_the_mean_prefix_risk():
    # Geifman et al.: sort by confidence, average the risk of every prefix
    rng = np.random.default_rng(7)
    score = rng.permutation(100).astype(float)
    correct = rng.uniform(size=100) < 0.7
    ranked = correct[np.argsort(-score)]
    prefix_risks = [np.mean(~ranked[:k]) for k in range(1, 101)]
    assert aurc(correct, score) == pytest.approx(np.mean(prefix_risks))


def test_oracle_score_has_zero_excess():
    rng = np.random.default_rng(3)
    correct = rng.uniform(size=200) < 0.8
    oracle = correct + rng.uniform(0, 0.5, size=200)  # every correct one above every wrong one, no ties
    assert excess_aurc(correct, oracle) == pytest.approx(0.0, abs=1e-15)
    assert excess_aurc(correct, rng.uniform(size=200)) > 0.01


def test_tied_oracle_pays_for_its_ties():
    # score = correctness: the 2 errors form one group at risk 2/5, so aurc = 2/5 * 2/5, above the oracle
    correct = np.array([True, True, True, False, False])
    assert aurc(correct, correct.astype(float)) == pytest.approx(0.16)
    assert excess_aurc(correct, correct.astype(float)) == pytest.approx(0.16 - (1 / 4 + 2 / 5) / 5)


def test_confidence_scores_hand_worked():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    logits = np.log(p) + 3.0  # softmax is shift-invariant
    assert confidence_score(logits, "msp") == pytest.approx([0.7, 0.4])
    assert confidence_score(logits, "margin") == pytest.approx([math.log(0.7 / 0.2), 0.0])
    entropy = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
               -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))]
    assert confidence_score(logits, "entropy") == pytest.approx([-e for e in entropy])


def test_confidence_scores_across_chunks_and_extremes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(CHUNK + 37, 4)).astype(np.float32)
    logits[5] = [1000.0, 0.0, 0.0, 0.0]  # probabilities underflow to exactly 0
    p = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    assert confidence_score(logits, "msp") == pytest.approx(p.max(axis=1))
    assert confidence_score(logits, "entropy") == pytest.approx(plogp.sum(axis=1))
    assert np.all(np.isfinite(confidence_score(logits, "entropy")))
    for kind in SCORES:
        assert confidence_score(logits, kind).shape == (CHUNK + 37,)
    with pytest.raises(ValueError, match="unknown confidence score"):
        confidence_score(logits, "energy")


def test_summary_agrees_with_the_functions():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 6)) * 2
    labels = np.where(rng.uniform(size=500) < 0.6, logits.argmax(axis=1), rng.integers(0, 6, 500))
    correct = logits.argmax(axis=1) == labels
    s = confidence_score(logits, "margin")
    summary = selective_summary(logits, labels, "margin", reference_risk=0.2)
    assert summary.error == pytest.approx(np.mean(~correct))
    assert summary.aurc == pytest.approx(slow_aurc(correct, s))
    assert summary.risk_at_90 == pytest.approx(risk_at_coverage(correct, s, 0.9))
    assert summary.coverage_at_float_risk == pytest.approx(coverage_at_risk(correct, s, 0.2))
    assert selective_summary(logits, labels).coverage_at_float_risk is None


def test_intervals_are_seeded_and_bracket_the_estimate():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(300, 5)) * 3
    labels = np.where(rng.uniform(size=300) < 0.7, logits.argmax(axis=1), rng.integers(0, 5, 300))
    first = selective_intervals(logits, labels, n_resamples=200, seed=4)
    assert first == selective_intervals(logits, labels, n_resamples=200, seed=4)
    summary = selective_summary(logits, labels)
    assert first["aurc"][0] <= summary.aurc <= first["aurc"][1]
    assert first["risk_at_90"][0] <= summary.risk_at_90 <= first["risk_at_90"][1]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one score per prediction"):
        aurc(CORRECT, SCORE[:3])
    with pytest.raises(ValueError, match="finite"):
        aurc(CORRECT, np.array([0.5, np.nan, 0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="coverage"):
        risk_at_coverage(CORRECT, SCORE, 0.0)
