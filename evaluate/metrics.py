"""Accuracy, likelihood, calibration and what quantization changed: pure numpy functions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def top_k_error(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is not among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(1.0 - np.mean(np.any(top == labels[:, None], axis=1)))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    return float(-np.mean(log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels]))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin mean confidence, accuracy and count over equal-width confidence bins."""

    edges: np.ndarray  # (bins + 1,)
    confidence: np.ndarray  # (bins,), NaN where a bin is empty
    accuracy: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(gaps * self.counts[filled]) / self.counts.sum())


def reliability_curve(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> ReliabilityCurve:
    """Bin predictions by confidence into (lo, hi] bins (the first bin also holds 0)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=confidences, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins) / counts
    return ReliabilityCurve(edges, confidence, accuracy, counts)


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width bins: sum over bins of |accuracy - confidence| x bin share."""
    return reliability_curve(confidences, correct, n_bins).ece


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Errors and calibration of one model; errors and ECE in %, NLL in nats."""
    probabilities = softmax(logits.astype(np.float64))
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    return {
        "top1_error": 100 * top_k_error(logits, labels, 1),
        "top5_error": 100 * top_k_error(logits, labels, 5),
        "nll": nll(logits, labels),
        "ece": 100 * expected_calibration_error(confidences, correct),
        "mean_confidence": 100 * float(confidences.mean()),
    }


@dataclass(frozen=True)
class QuantizationChange:
    """What a quantized model changed relative to the float model on the same inputs."""

    swapped_pct: float  # % of top-1 predictions that changed
    delta_top1_error_pp: float  # quantized minus float top-1 error, percentage points
    swapped: np.ndarray  # (N,) bool
    float_confidence: np.ndarray  # (N,) the float model's confidence in its own prediction

    @property
    def ratio(self) -> float:
        """Delta error / % swapped: how much of the churn turned into extra error (NaN if no swaps)."""
        return self.delta_top1_error_pp / self.swapped_pct if self.swapped_pct > 0 else float("nan")

    @property
    def swapped_confidences(self) -> np.ndarray:
        return self.float_confidence[self.swapped]

    def summary(self) -> dict[str, float]:
        return {"swapped_pct": self.swapped_pct, "delta_top1_error_pp": self.delta_top1_error_pp,
                "delta_error_per_swapped": self.ratio,
                "mean_float_conf_swapped": 100 * float(self.swapped_confidences.mean())
                if self.swapped.any() else float("nan")}


def quantization_change(float_logits: np.ndarray, quant_logits: np.ndarray, labels: np.ndarray) -> QuantizationChange:
    float_pred = float_logits.argmax(axis=1)
    quant_pred = quant_logits.argmax(axis=1)
    swapped = float_pred != quant_pred
    delta = 100 * (np.mean(quant_pred != labels) - np.mean(float_pred != labels))
    confidence = softmax(float_logits.astype(np.float64)).max(axis=1)
    return QuantizationChange(100 * float(swapped.mean()), float(delta), swapped, confidence)
