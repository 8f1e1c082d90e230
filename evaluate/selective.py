"""Selective prediction: how a model's error falls when it may abstain on its least confident inputs
(pure numpy). A configuration whose confidence ranks its own errors last can keep most inputs at
the float model's error, however many predictions quantization changed.

Thresholds are on a confidence score (higher: more confident); a threshold ``t`` accepts every
input with ``score >= t``. Inputs with equal scores are accepted or rejected together: no
deployable threshold splits them, so no curve point or area here does either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import CHUNK, bootstrap_interval, log_softmax, logit_margin, softmax

SCORES = ("msp", "margin", "entropy")
_TOLERANCE = 1e-12  # k / N against a target given as a decimal fraction (0.7 * 10 != 7 in floats)


def confidence_score(logits: np.ndarray, kind: str = "msp") -> np.ndarray:
    """Per-row confidence, higher meaning more confident: ``msp`` the maximum softmax probability,
    ``margin`` the top-1 minus top-2 logit, ``entropy`` minus the softmax entropy (nats).

    Probabilities are float64, :data:`~ptqcal.evaluate.metrics.CHUNK` rows at a time, so that
    50,000 rows of 1,000 classes never hold more than a chunk of them.
    """
    if kind not in SCORES:
        raise ValueError(f"unknown confidence score {kind!r} (known: {', '.join(SCORES)})")
    if kind == "margin":
        return logit_margin(np.asarray(logits, dtype=np.float64))
    out = np.empty(len(logits), dtype=np.float64)
    for start in range(0, len(logits), CHUNK):
        chunk = np.asarray(logits[start:start + CHUNK], dtype=np.float64)
        if kind == "msp":  # as QuantizationChange computes the float model's confidence
            out[start:start + CHUNK] = softmax(chunk).max(axis=1)
        else:  # log_p is finite for finite logits, so an underflowed p adds 0 * finite = 0
            log_p = log_softmax(chunk)
            out[start:start + CHUNK] = np.sum(np.exp(log_p) * log_p, axis=1)
    return out


@dataclass(frozen=True)
class RiskCoverage:
    """The risk-coverage curve at every distinct score threshold, most confident first.

    Point ``i`` accepts the ``accepted[i]`` inputs with ``score >= threshold[i]``; ``coverage[i]``
    is their share of all inputs and ``risk[i]`` their error (fractions). The last point accepts
    everything (coverage 1, risk = the top-1 error); accepting nothing is not a point (its risk is
    undefined).
    """

    threshold: np.ndarray  # (G,) distinct scores, descending
    accepted: np.ndarray  # (G,) int, increasing to N
    coverage: np.ndarray
    risk: np.ndarray

    @property
    def area(self) -> float:
        """:func:`aurc` of this curve."""
        return float(np.sum(np.diff(self.accepted, prepend=0) * self.risk) / self.accepted[-1])


def _ranked(correct: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    correct, score = np.asarray(correct, dtype=bool), np.asarray(score, dtype=np.float64)
    if correct.ndim != 1 or correct.shape != score.shape or not len(score):
        raise ValueError(f"need one score per prediction, got {correct.shape} correctness and {score.shape} scores")
    if not np.all(np.isfinite(score)):
        raise ValueError("confidence scores must be finite to rank predictions")
    return correct, score


def risk_coverage(correct: np.ndarray, score: np.ndarray) -> RiskCoverage:
    """The :class:`RiskCoverage` of predictions ``correct`` (bool, (N,)) ranked by ``score``.

    One point per distinct score: inputs with equal scores enter together, at the risk of the
    whole group, because a threshold can only accept all of them or none.
    """
    correct, score = _ranked(correct, score)
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # last index of each tie group
    errors = np.cumsum(~correct[order])[ends]
    accepted = ends + 1
    return RiskCoverage(ranked[ends], accepted, accepted / len(score), errors / accepted)


def aurc(correct: np.ndarray, score: np.ndarray) -> float:
    """Area under the risk-coverage curve: the integral over coverage c in (0, 1] of
    :func:`risk_at_coverage` (c), a step function.

    Without ties this is Geifman et al. (2019)'s mean over the N acceptance prefixes of the
    prefix's risk. A tie group counts each of its members at the risk of the whole group (the
    prefix that ends with it): sum over groups of (group size / N) x (risk once the group is in).
    """
    return risk_coverage(correct, score).area


def oracle_aurc(correct: np.ndarray) -> float:
    """The :func:`aurc` of the best ranking of predictions ``correct``: every correct one first,
    each at its own score. No ranking, ties or not, does better (a tie group's risk is at least the
    oracle's risk at the group's end, and that only grows with coverage)."""
    correct = np.asarray(correct, dtype=bool)
    n, errors = len(correct), int(np.sum(~correct))
    k = np.arange(n - errors + 1, n + 1, dtype=np.float64)  # prefixes that must hold an error
    return float(np.sum((k - (n - errors)) / k) / n)


def excess_aurc(correct: np.ndarray, score: np.ndarray) -> float:
    """:func:`aurc` minus :func:`oracle_aurc` at the same error rate (0 for a perfect ranking)."""
    return aurc(correct, score) - oracle_aurc(correct)


def risk_at_coverage(correct: np.ndarray, score: np.ndarray, coverage: float) -> float:
    """Risk of the smallest threshold set that accepts at least ``coverage`` (in (0, 1]) of inputs."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    curve = risk_coverage(correct, score)
    return float(curve.risk[np.searchsorted(curve.coverage, coverage - _TOLERANCE, side="left")])


def coverage_at_risk(correct: np.ndarray, score: np.ndarray, risk: float) -> float:
    """Largest coverage of a threshold whose accepted inputs' risk is at most ``risk`` (0 if none).

    Risk need not fall monotonically with the threshold, so every threshold is considered.
    """
    curve = risk_coverage(correct, score)
    meets = curve.risk <= risk + _TOLERANCE
    return float(curve.coverage[meets].max()) if meets.any() else 0.0


@dataclass(frozen=True)
class SelectiveSummary:
    """A configuration's selective prediction under one confidence score (fractions)."""

    score: str
    error: float  # risk at full coverage: the top-1 error
    aurc: float
    eaurc: float  # aurc minus the oracle's at the same error
    risk_at_80: float  # at coverage 0.8
    risk_at_90: float
    # coverage kept while the risk is at most the reference (the float model's error): how much
    # coverage quantization costs at float's risk. None without a reference.
    coverage_at_float_risk: float | None = None


def selective_summary(logits: np.ndarray, labels: np.ndarray, score: str = "msp",
                      reference_risk: float | None = None) -> SelectiveSummary:
    """The :class:`SelectiveSummary` of ``logits`` on ``labels`` ranked by ``score`` (see
    :data:`SCORES`); ``reference_risk`` is typically the float model's top-1 error."""
    correct = np.asarray(logits).argmax(axis=1) == np.asarray(labels)
    s = confidence_score(logits, score)
    curve = risk_coverage(correct, s)
    return SelectiveSummary(
        score=score, error=float(curve.risk[-1]), aurc=curve.area, eaurc=excess_aurc(correct, s),
        risk_at_80=risk_at_coverage(correct, s, 0.8), risk_at_90=risk_at_coverage(correct, s, 0.9),
        coverage_at_float_risk=None if reference_risk is None else coverage_at_risk(correct, s, reference_risk))


def selective_intervals(logits: np.ndarray, labels: np.ndarray, score: str = "msp", n_resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``aurc`` and ``risk_at_90`` over resampled images (seeded:
    both statistics see the same resamples). Resampling repeats images, so their scores tie and
    enter together, as every tie does."""
    correct = np.asarray(logits).argmax(axis=1) == np.asarray(labels)
    arrays = (correct, confidence_score(logits, score))
    return {"aurc": bootstrap_interval(aurc, arrays, n_resamples, seed, level),
            "risk_at_90": bootstrap_interval(lambda c, s: risk_at_coverage(c, s, 0.9), arrays, n_resamples, seed,
                                             level)}
