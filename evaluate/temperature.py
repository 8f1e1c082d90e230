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
