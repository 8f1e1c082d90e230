"""Post-hoc calibration by temperature scaling (Guo et al., 2017)."""

from __future__ import annotations

import numpy as np

from .metrics import nll


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0,
                    tolerance: float = 1e-6) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)``.

    The NLL is convex in the inverse temperature 1/T (log-sum-exp minus a linear term), so a
    golden-section search over 1/T finds the global minimum without scipy.
    """
    logits = np.asarray(logits, dtype=np.float64)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = 1.0 / hi, 1.0 / lo
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits * c, labels), nll(logits * d, labels)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits * c, labels)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits * d, labels)
    return float(2.0 / (a + b))


def cross_fitted_temperatures(logits: np.ndarray, labels: np.ndarray, seed: int = 0,
                              minimum: int = 20) -> tuple[np.ndarray, tuple[float, float]] | None:
    """Temperature scaling without fitting on the images it is judged on: the images are split in
    two seeded halves, a temperature is fitted on each and applied to the other.

    Returns each image's temperature ``(N,)`` and the two fitted values, or ``None`` when there
    are fewer than ``minimum`` images.
    """
    n = len(labels)
    if n < minimum:
        return None
    order = np.random.default_rng(seed).permutation(n)
    first, second = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    t_first, t_second = fit_temperature(logits[first], labels[first]), fit_temperature(logits[second], labels[second])
    per_image = np.empty(n)
    per_image[second], per_image[first] = t_first, t_second
    return per_image, (t_first, t_second)
