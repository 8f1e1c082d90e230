"""Accuracy, likelihood and calibration of one model: pure numpy functions and a streaming
accumulator (torchmetrics-style ``update``/``compute``) that never holds more than a chunk of
probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

ECE_BINS = 15
CONFIDENT = 0.9  # a float prediction held with at least this confidence counts as confident (every feature)
CHUNK = 4096  # rows converted to float64 probabilities at a time


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def top_k_error(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is not among the ``k`` largest logits."""
    return float(1.0 - np.mean(_in_top_k(logits, labels, k)))


def _in_top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return np.any(top == labels[:, None], axis=1)


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    return float(-np.mean(log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels]))


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over samples of the squared distance between the probabilities and the one-hot label."""
    onehot = np.zeros_like(probabilities)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin mean confidence, accuracy and count."""

    edges: np.ndarray  # (bins + 1,)
    confidence: np.ndarray  # (bins,), NaN where a bin is empty
    accuracy: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(gaps * self.counts[filled]) / self.counts.sum())

    @property
    def mce(self) -> float:
        """Maximum calibration error: the largest gap of a non-empty bin."""
        filled = self.counts > 0
        return float(np.max(np.abs(self.accuracy[filled] - self.confidence[filled])))


def _equal_width_bin(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value in ``n_bins`` (lo, hi] bins over [0, 1] (the first also holds 0)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1)


def reliability_curve(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS,
                      strategy: str = "uniform") -> ReliabilityCurve:
    """Bin predictions by confidence: ``uniform`` equal-width (lo, hi] bins (the first also holds
    0), or ``quantile`` bins holding equal numbers of predictions (equal mass)."""
    confidences = np.asarray(confidences, dtype=np.float64)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        index = _equal_width_bin(confidences, n_bins)
    elif strategy == "quantile":
        order = np.argsort(confidences, kind="stable")
        index = np.empty(len(confidences), dtype=np.int64)
        index[order] = np.arange(len(confidences)) * n_bins // max(len(confidences), 1)
        edges = np.concatenate([[0.0], [confidences[index == b].max() if np.any(index == b) else np.nan
                                        for b in range(n_bins)]])
    else:
        raise ValueError(f"unknown binning strategy {strategy!r}")
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=confidences, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=np.asarray(correct, dtype=np.float64), minlength=n_bins) / counts
    return ReliabilityCurve(edges, confidence, accuracy, counts)


def reliability_of_logits(logits: np.ndarray, labels: np.ndarray, temperature: float | np.ndarray = 1.0,
                          n_bins: int = ECE_BINS) -> tuple[ReliabilityCurve, np.ndarray]:
    """The top-label reliability curve of ``softmax(logits / temperature)`` and its confidences
    (``temperature``: one value, or one per row)."""
    temperature = np.asarray(temperature, dtype=np.float64)
    probabilities = softmax(logits.astype(np.float64) / (temperature[:, None] if temperature.ndim else temperature))
    confidence = probabilities.max(axis=1)
    return reliability_curve(confidence, probabilities.argmax(axis=1) == labels, n_bins), confidence


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS,
                               strategy: str = "uniform") -> float:
    """Top-label ECE: sum over bins of |accuracy - confidence| x the bin's share of predictions."""
    return reliability_curve(confidences, correct, n_bins, strategy).ece


def classwise_ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Mean over classes of the ECE of "is it class k" with confidence p_k (Kull et al., 2019)."""
    classes = probabilities.shape[1]
    return float(np.mean([expected_calibration_error(probabilities[:, k], labels == k, n_bins)
                          for k in range(classes)]))


FRACTION, NATS, LOGITS, RATIO = "fraction", "nats", "logits", "ratio"


def _metric(unit: str, default=None):
    return field(default=default, metadata={"unit": unit})


@dataclass(frozen=True)
class Metrics:
    """Accuracy, calibration and, for a quantized model, what it changed against the float model.

    Every rate is a fraction in [0, 1] (``field.metadata["unit"] == "fraction"``); percent appears
    only where a table or figure is drawn. Change fields are ``None`` for the float reference,
    temperature fields ``None`` when no temperature was fitted.
    """

    top1_error: float = _metric(FRACTION)
    top5_error: float = _metric(FRACTION)
    nll: float = _metric(NATS)  # mean negative log-likelihood of the labels
    brier: float = _metric(RATIO)  # mean squared distance to the one-hot label, in [0, 2]
    ece: float = _metric(FRACTION)  # top-label ECE, 15 equal-width bins
    ece_equal_mass: float = _metric(FRACTION)
    mce: float = _metric(FRACTION)
    classwise_ece: float = _metric(FRACTION)
    mean_confidence: float = _metric(FRACTION)
    swapped: float | None = _metric(FRACTION)  # share of top-1 predictions that changed
    delta_top1_error: float | None = _metric(FRACTION)  # quantized minus float top-1 error
    delta_error_per_swapped: float | None = _metric(RATIO)  # NaN without swaps
    mean_float_conf_swapped: float | None = _metric(FRACTION)
    correct_to_wrong: float | None = _metric(FRACTION)  # shares of all predictions; they sum to swapped
    wrong_to_correct: float | None = _metric(FRACTION)
    wrong_to_other_wrong: float | None = _metric(FRACTION)
    median_float_margin_swapped: float | None = _metric(LOGITS)  # float top-1 minus top-2 logit
    median_float_margin_kept: float | None = _metric(LOGITS)
    ece_temperature: float | None = _metric(FRACTION)  # after the float model's temperature
    mean_confidence_temperature: float | None = _metric(FRACTION)
    # after the configuration's own temperature, cross-fitted on its own logits like the float
    # model's (a deployment that recalibrates the quantized model itself)
    ece_own_temperature: float | None = _metric(FRACTION)
    # selective prediction on the model's own confidence (evaluate/selective.py): the area under its
    # risk-coverage curve under each score, the excess over a perfect ranking, the risk when it keeps
    # its 80% / 90% most confident predictions, and the share it can keep at the float model's error
    aurc: float | None = _metric(FRACTION)  # max softmax probability
    aurc_margin: float | None = _metric(FRACTION)  # top-1 minus top-2 logit
    aurc_entropy: float | None = _metric(FRACTION)  # minus the softmax entropy
    eaurc: float | None = _metric(FRACTION)
    risk_at_80: float | None = _metric(FRACTION)
    risk_at_90: float | None = _metric(FRACTION)
    coverage_at_float_risk: float | None = _metric(FRACTION)  # None for the float model itself

    @staticmethod
    def unit(name: str) -> str:
        """The unit of field ``name``: ``fraction``, ``nats``, ``logits`` or ``ratio``."""
        return Metrics.__dataclass_fields__[name].metadata["unit"]

    def as_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_change(self, change: "QuantizationChange") -> "Metrics":
        """These metrics plus what ``change`` says quantization changed."""
        return replace(self, **change.summary())

    @staticmethod
    def aggregate(draws: "list[Metrics]", statistic=np.mean) -> "Metrics":
        """Field by field ``statistic`` over draws (e.g. calibration repeats), skipping NaN (a ratio
        without swaps); ``None`` stays ``None``."""
        values = {}
        for f in fields(Metrics):
            column = [getattr(d, f.name) for d in draws]
            if any(v is None for v in column):
                values[f.name] = None
                continue
            array = np.asarray(column, dtype=float)
            kept = array[~np.isnan(array)]
            values[f.name] = float(statistic(kept)) if len(kept) else float("nan")
        return Metrics(**values)


@dataclass
class ClassificationAccumulator:
    """Streaming state of a model's metrics: ``update`` chunk by chunk, ``compute`` at the end.

    Keeps per-sample confidence, correctness and NLL (three floats a sample, for equal-mass bins
    and bootstrap intervals) and per-class bin sums for the classwise ECE; never the logits.
    """

    n_bins: int = ECE_BINS
    confidence: list = field(default_factory=list)
    correct: list = field(default_factory=list)
    in_top5: list = field(default_factory=list)
    sample_nll: list = field(default_factory=list)
    brier_sum: float = 0.0
    class_bins: np.ndarray | None = None  # (classes, bins, 3): count, sum of p_k, sum of [label == k]

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        for start in range(0, len(labels), CHUNK):
            chunk, y = logits[start:start + CHUNK].astype(np.float64), labels[start:start + CHUNK]
            log_p = log_softmax(chunk)
            p = np.exp(log_p)
            self.confidence.append(p.max(axis=1))
            self.correct.append(p.argmax(axis=1) == y)
            self.in_top5.append(_in_top_k(chunk, y, 5))
            self.sample_nll.append(-log_p[np.arange(len(y)), y])
            self.brier_sum += brier(p, y) * len(y)
            self._update_classwise(p, y)

    def _update_classwise(self, p: np.ndarray, y: np.ndarray) -> None:
        classes = p.shape[1]
        if self.class_bins is None:
            self.class_bins = np.zeros((classes, self.n_bins, 3))
        index = _equal_width_bin(p, self.n_bins)  # (n, classes)
        flat = (np.arange(classes)[None, :] * self.n_bins + index).ravel()
        hit = (y[:, None] == np.arange(classes)[None, :]).ravel().astype(np.float64)
        size = classes * self.n_bins
        self.class_bins[..., 0] += np.bincount(flat, minlength=size).reshape(classes, self.n_bins)
        self.class_bins[..., 1] += np.bincount(flat, weights=p.ravel(), minlength=size).reshape(classes, self.n_bins)
        self.class_bins[..., 2] += np.bincount(flat, weights=hit, minlength=size).reshape(classes, self.n_bins)

    def per_sample(self) -> dict[str, np.ndarray]:
        return {"confidence": np.concatenate(self.confidence), "correct": np.concatenate(self.correct),
                "in_top5": np.concatenate(self.in_top5), "nll": np.concatenate(self.sample_nll)}

    def compute(self) -> Metrics:
        """Errors, ECE, MCE and mean confidence as fractions, NLL in nats, Brier score."""
        s = self.per_sample()
        width = reliability_curve(s["confidence"], s["correct"], self.n_bins)
        mass = reliability_curve(s["confidence"], s["correct"], self.n_bins, "quantile")
        count, p_sum, hits = self.class_bins[..., 0], self.class_bins[..., 1], self.class_bins[..., 2]
        per_class = np.abs(hits - p_sum).sum(axis=1) / count.sum(axis=1)
        return Metrics(
            top1_error=float(1 - s["correct"].mean()),
            top5_error=float(1 - s["in_top5"].mean()),
            nll=float(s["nll"].mean()),
            brier=self.brier_sum / len(s["correct"]),
            ece=width.ece,
            ece_equal_mass=mass.ece,
            mce=width.mce,
            classwise_ece=float(per_class.mean()),
            mean_confidence=float(s["confidence"].mean()),
        )


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> Metrics:
    """All of :class:`ClassificationAccumulator`'s metrics for one set of logits."""
    accumulator = ClassificationAccumulator()
    accumulator.update(logits, labels)
    return accumulator.compute()


def bootstrap_interval(statistic, arrays: tuple[np.ndarray, ...], n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)`` over resampled rows (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    values = [statistic(*(a[index] for a in arrays))
              for index in (rng.integers(0, n, n) for _ in range(n_resamples))]
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


@dataclass(frozen=True)
class QuantizationChange:
    """What a quantized model changed relative to the float model on the same inputs."""

    swap_rate: float  # share of top-1 predictions that changed
    delta_top1_error: float  # quantized minus float top-1 error (fraction)
    swapped: np.ndarray  # (N,) bool
    float_confidence: np.ndarray  # (N,) the float model's confidence in its own prediction
    float_correct: np.ndarray  # (N,) bool
    quant_correct: np.ndarray  # (N,) bool
    float_margin: np.ndarray  # (N,) float top-1 minus top-2 logit

    @property
    def ratio(self) -> float:
        """Δ error / swap rate: how much of the churn turned into extra error (NaN if no swaps)."""
        return self.delta_top1_error / self.swap_rate if self.swap_rate > 0 else float("nan")

    @property
    def swapped_confidences(self) -> np.ndarray:
        return self.float_confidence[self.swapped]

    def confident_swaps(self, threshold: float) -> tuple[int, int]:
        """Swapped and total float predictions held with at least ``threshold`` confidence."""
        held = self.float_confidence >= threshold
        return int(self.swapped[held].sum()), int(held.sum())

    def transitions(self) -> dict[str, int]:
        """Swapped predictions by what happened to them; they add up to the swap count."""
        s = self.swapped
        return {"correct_to_wrong": int(np.sum(s & self.float_correct)),
                "wrong_to_correct": int(np.sum(s & self.quant_correct)),
                "wrong_to_other_wrong": int(np.sum(s & ~self.float_correct & ~self.quant_correct))}

    def summary(self) -> dict[str, float]:
        """The :class:`Metrics` change fields (fractions; margins in logits)."""
        n = len(self.swapped)
        row = {"swapped": self.swap_rate, "delta_top1_error": self.delta_top1_error,
               "delta_error_per_swapped": self.ratio,
               "mean_float_conf_swapped": float(self.swapped_confidences.mean())
               if self.swapped.any() else float("nan")}
        row.update({k: v / n for k, v in self.transitions().items()})
        row["median_float_margin_swapped"] = float(np.median(self.float_margin[self.swapped])) \
            if self.swapped.any() else float("nan")
        row["median_float_margin_kept"] = float(np.median(self.float_margin[~self.swapped])) \
            if not self.swapped.all() else float("nan")
        return row


def logit_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of every row."""
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def quantization_change(float_logits: np.ndarray, quant_logits: np.ndarray, labels: np.ndarray) -> QuantizationChange:
    """What ``quant_logits`` changed against ``float_logits`` on the same ``labels``, per image."""
    float_pred = float_logits.argmax(axis=1)
    quant_pred = quant_logits.argmax(axis=1)
    swapped = float_pred != quant_pred
    float_correct, quant_correct = float_pred == labels, quant_pred == labels
    delta = np.mean(~quant_correct) - np.mean(~float_correct)
    confidence = np.concatenate([softmax(float_logits[i:i + CHUNK].astype(np.float64)).max(axis=1)
                                 for i in range(0, len(labels), CHUNK)]) if len(labels) else np.zeros(0)
    return QuantizationChange(float(swapped.mean()), float(delta), swapped, confidence, float_correct,
                              quant_correct, logit_margin(float_logits))


def changes_by_confidence(change: QuantizationChange, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per float-confidence bin: how many predictions, the share swapped and the Δ error they add
    (fractions of the bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = _equal_width_bin(change.float_confidence, n_bins)
    counts = np.bincount(index, minlength=n_bins)
    swapped = np.bincount(index, weights=change.swapped.astype(float), minlength=n_bins)
    delta = np.bincount(index, weights=change.float_correct.astype(float) - change.quant_correct.astype(float),
                        minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "counts": counts, "swap_rate": swapped / counts, "delta_error": delta / counts}


def swap_probability_by_margin(change: QuantizationChange, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Swap probability per bin of the float logit margin (equal-mass bins)."""
    margins = change.float_margin
    edges = np.unique(np.quantile(margins, np.linspace(0, 1, n_bins + 1))) if len(margins) else np.zeros(2)
    index = np.clip(np.searchsorted(edges, margins, side="right") - 1, 0, max(len(edges) - 2, 0))
    bins = max(len(edges) - 1, 1)
    counts = np.bincount(index, minlength=bins)
    swapped = np.bincount(index, weights=change.swapped.astype(float), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "counts": counts, "swap_probability": swapped / counts}
