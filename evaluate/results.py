"""One evaluated configuration: its logits, its metrics and, if quantized, what it changed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

from .metrics import Metrics, QuantizationChange, classification_metrics, quantization_change, reliability_of_logits
from .selective import SCORES, aurc, confidence_score, selective_summary

# How a run names its configurations (``logits.npz`` keys): the float reference, and calibration
# repeats after the first as ``a8w4#r1``, ``a8w4#r2``...
FLOAT_NAME = "float"
REPEAT_MARK = "#r"


class Execution(StrEnum):
    """Which of ORT's paths evaluates a quantized model."""

    DEPLOYED = "deployed"  # ORT fuses Q/DQ into integer kernels (QLinearConv, ...): what ships
    SIMULATED = "simulated"  # float ops between Q/DQ (basic graph optimisations only)


@dataclass(frozen=True)
class ConfigResult:
    """One configuration of a run, evaluated.

    Attributes
    ----------
    name : str
        ``"float"``, ``"a8w8"``, ``"fp16"``, ...
    logits : ndarray, shape (N, classes)
        The first calibration draw's logits on the evaluation images.
    metrics : Metrics
        Fractions; with several calibration draws, the mean over draws.
    change : QuantizationChange or None
        Per-image change against the float model, of the first draw (``None`` for the float
        reference). Figures of per-image quantities (which confidences swap) draw this one.
    draws : tuple of Metrics
        Every draw's metrics, first draw first; one entry when the calibration was drawn once.
    spread : Metrics or None
        Standard deviation over draws; ``None`` with a single draw.
    intervals : dict of str to (float, float)
        Bootstrap 95% intervals over evaluation images of the first draw, by metric name (fractions).
    """

    name: str
    logits: np.ndarray
    metrics: Metrics
    change: QuantizationChange | None = None
    draws: tuple[Metrics, ...] = ()
    spread: Metrics | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def with_draws(self, others: list["ConfigResult"]) -> "ConfigResult":
        """This (the first draw) with more calibration draws of the same configuration: metrics
        become the mean over all draws, ``spread`` their standard deviation."""
        if not others:
            return self
        draws = (self.metrics, *(other.metrics for other in others))
        return replace(self, metrics=Metrics.aggregate(list(draws)), draws=draws,
                       spread=Metrics.aggregate(list(draws), np.std))


class FloatFirst:
    """Configurations evaluated on the same images, the float model's result first (``configs``):
    what a run and each of its corrupted copies share."""

    configs: list[ConfigResult]

    @property
    def reference(self) -> ConfigResult:
        """The float model's result."""
        return self.configs[0]

    @property
    def quantized(self) -> list[ConfigResult]:
        return self.configs[1:]

    def result(self, name: str) -> ConfigResult | None:
        return next((c for c in self.configs if c.name == name), None)


def selective_fields(logits: np.ndarray, labels: np.ndarray, float_logits: np.ndarray | None = None) -> dict:
    """The :class:`Metrics` fields of selective prediction: AURC under each confidence score, and
    under the max softmax probability its excess, the risk at 80% and 90% coverage and, against
    ``float_logits``, the coverage kept at the float model's error."""
    if not len(labels):
        return {}
    correct = logits.argmax(axis=1) == labels
    reference = None if float_logits is None else float(np.mean(float_logits.argmax(axis=1) != labels))
    summary = selective_summary(logits, labels, "msp", reference)
    areas = {score: aurc(correct, confidence_score(logits, score)) for score in SCORES[1:]}
    return {"aurc": summary.aurc, "aurc_margin": areas["margin"], "aurc_entropy": areas["entropy"],
            "eaurc": summary.eaurc, "risk_at_80": summary.risk_at_80, "risk_at_90": summary.risk_at_90,
            "coverage_at_float_risk": summary.coverage_at_float_risk}


def evaluate_logits(name: str, logits: np.ndarray, labels: np.ndarray, float_logits: np.ndarray | None = None,
                    temperature: float | np.ndarray | None = None,
                    own_temperature: float | np.ndarray | None = None) -> ConfigResult:
    """Metrics of ``logits`` against ``labels``; with ``float_logits``, also what quantization
    changed; with ``temperature``, also the ECE and mean confidence after scaling by it; with
    ``own_temperature``, also the ECE after the configuration's own temperature.

    Parameters
    ----------
    name : str
        The configuration's name.
    logits, float_logits : ndarray, shape (N, classes)
        This configuration's and the float reference's logits on the same images.
    labels : ndarray, shape (N,)
        Integer class labels.
    temperature : float or ndarray of shape (N,), optional
        A temperature fitted on other images, or one per image (it changes no prediction): the
        float model's.
    own_temperature : float or ndarray of shape (N,), optional
        The same, fitted on this configuration's own logits of other images.
    """
    metrics = replace(classification_metrics(logits, labels), **selective_fields(logits, labels, float_logits))
    change = None if float_logits is None else quantization_change(float_logits, logits, labels)
    if change is not None:
        metrics = metrics.with_change(change)
    if temperature is not None:
        curve, confidence = reliability_of_logits(logits, labels, temperature)
        metrics = replace(metrics, ece_temperature=curve.ece, mean_confidence_temperature=float(confidence.mean()))
    if own_temperature is not None:
        metrics = replace(metrics, ece_own_temperature=reliability_of_logits(logits, labels, own_temperature)[0].ece)
    return ConfigResult(name, logits, metrics, change, (metrics,))
