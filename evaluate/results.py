"""One evaluated configuration: its logits, its metrics and, if quantized, what it changed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import QuantizationChange, classification_metrics, quantization_change

# How a run names its configurations (``logits.npz`` keys): the float reference, and calibration
# repeats after the first as ``a8w4#r1``, ``a8w4#r2``...
FLOAT_NAME = "float"
REPEAT_MARK = "#r"


@dataclass(frozen=True)
class ConfigResult:
    name: str  # "float", "a8w8", ...
    logits: np.ndarray
    metrics: dict[str, float]
    change: QuantizationChange | None = None  # None for the float reference

    def row(self) -> dict[str, float | str]:
        row: dict[str, float | str] = {"config": self.name, **self.metrics}
        if self.change is not None:
            row.update(self.change.summary())
        return row


def evaluate_logits(name: str, logits: np.ndarray, labels: np.ndarray,
                    float_logits: np.ndarray | None = None) -> ConfigResult:
    change = None if float_logits is None else quantization_change(float_logits, logits, labels)
    return ConfigResult(name, logits, classification_metrics(logits, labels), change)
