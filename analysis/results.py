"""Everything the report shows, computed from a run folder's saved logits (numpy only).

A run folder holds ``logits.npz`` (labels, the float model's logits on the evaluation and the
calibration images, and one array per configuration and repeat, e.g. ``a8w4`` and ``a8w4#r1``)
and ``run.json`` (what was run). Nothing here runs a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptqcal.errors import UserError
from ptqcal.evaluate.metrics import (QuantizationChange, ReliabilityCurve, bootstrap_interval,
                                     expected_calibration_error, reliability_of_logits, softmax)
from ptqcal.evaluate.results import FLOAT_NAME, REPEAT_MARK, evaluate_logits
from ptqcal.evaluate.temperature import fit_temperature

BOOTSTRAP_RESAMPLES = 500
HEADLINE = ("top1_error", "ece", "swapped_pct", "delta_top1_error_pp")


@dataclass
class ConfigAnalysis:
    name: str
    logits: np.ndarray
    metrics: dict[str, float]
    change: QuantizationChange | None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap 95%
    spread: dict[str, float] = field(default_factory=dict)  # std over calibration repeats
    repeats: list[dict[str, float]] = field(default_factory=list)  # metrics of every repeat


@dataclass
class RunAnalysis:
    name: str
    folder: Path
    info: dict
    notes: list[str]
    labels: np.ndarray
    temperature: float | None  # fitted on the float model's calibration-split logits
    configs: list[ConfigAnalysis]

    @property
    def float(self) -> ConfigAnalysis:
        return self.configs[0]

    @property
    def quantized(self) -> list[ConfigAnalysis]:
        return self.configs[1:]


def load_run(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    folder = Path(folder)
    if not (folder / "run.json").is_file() or not (folder / "logits.npz").is_file():
        raise UserError(f"{folder} is not a ptqcal run folder (no run.json and logits.npz)")
    with np.load(folder / "logits.npz") as arrays:
        return json.loads((folder / "run.json").read_text()), {k: arrays[k] for k in arrays.files}


def _with_temperature(logits: np.ndarray, labels: np.ndarray, temperature: float | None) -> dict[str, float]:
    if temperature is None:
        return {}
    curve, confidence = reliability_of_logits(logits, labels, temperature)
    return {"ece_temperature": 100 * curve.ece, "mean_confidence_temperature": 100 * float(confidence.mean())}


def _intervals(logits: np.ndarray, labels: np.ndarray, change: QuantizationChange | None,
               seed: int) -> dict[str, tuple[float, float]]:
    probabilities = softmax(logits.astype(np.float64))
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    arrays = (confidence, correct)
    out = {"top1_error": bootstrap_interval(lambda c, k: 100 * (1 - k.mean()), arrays, BOOTSTRAP_RESAMPLES, seed),
           "ece": bootstrap_interval(lambda c, k: 100 * expected_calibration_error(c, k), arrays,
                                     BOOTSTRAP_RESAMPLES, seed)}
    if change is not None:
        pair = (change.swapped, change.float_correct.astype(float) - change.quant_correct.astype(float))
        out["swapped_pct"] = bootstrap_interval(lambda s, d: 100 * s.mean(), pair, BOOTSTRAP_RESAMPLES, seed)
        # d = float correct - quantized correct per image: its mean is the added error
        out["delta_top1_error_pp"] = bootstrap_interval(lambda s, d: 100 * d.mean(), pair, BOOTSTRAP_RESAMPLES, seed)
    return out


def _config_metrics(logits, labels, float_logits, temperature):
    result = evaluate_logits("", logits, labels, float_logits)
    metrics = {k: v for k, v in result.row().items() if k != "config"}
    metrics.update(_with_temperature(logits, labels, temperature))
    return metrics, result.change


def analyse_run(folder: str | Path, seed: int = 0) -> RunAnalysis:
    """Metrics (with bootstrap intervals and the spread over calibration repeats), what
    quantization changed, and temperature scaling, for every configuration of a run."""
    info, arrays = load_run(folder)
    labels = arrays["labels"]
    float_logits = arrays[FLOAT_NAME]
    temperature = None
    if "calib_float" in arrays and len(arrays["calib_labels"]):
        temperature = fit_temperature(arrays["calib_float"], arrays["calib_labels"])
    names = [n for n in info["configs"] if REPEAT_MARK not in n]
    configs = []
    for name in names:
        is_float = name == FLOAT_NAME
        metrics, change = _config_metrics(arrays[name], labels, None if is_float else float_logits, temperature)
        analysis = ConfigAnalysis(name, arrays[name], metrics, change,
                                  _intervals(arrays[name], labels, change, seed))
        repeat_keys = [k for k in info["configs"] if k.startswith(name + REPEAT_MARK)]
        if repeat_keys:
            analysis.repeats = [metrics] + [_config_metrics(arrays[k], labels, float_logits, temperature)[0]
                                            for k in repeat_keys]
            keys = [k for k, v in metrics.items() if isinstance(v, float)]
            values = {k: np.array([r[k] for r in analysis.repeats], dtype=float) for k in keys}
            # a ratio is NaN for a repeat without swaps: average the repeats that have one
            analysis.metrics = {k: float(np.mean(v[~np.isnan(v)])) if (~np.isnan(v)).any() else float("nan")
                                for k, v in values.items()}
            analysis.spread = {k: float(np.std(v[~np.isnan(v)])) if (~np.isnan(v)).any() else float("nan")
                               for k, v in values.items()}
        configs.append(analysis)
    return RunAnalysis(info.get("model", Path(folder).name), Path(folder), info, list(info.get("notes", [])),
                       labels, temperature, configs)


def float_reliability(run: RunAnalysis, config: ConfigAnalysis | None = None,
                      temperature: float | None = None) -> tuple[ReliabilityCurve, np.ndarray]:
    """The reliability curve and confidences of a configuration (the float model by default)."""
    return reliability_of_logits((config or run.float).logits, run.labels, temperature or 1.0)
