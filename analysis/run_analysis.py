"""Everything the report shows, computed from a saved run (numpy only; nothing here runs a model)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ptqcal.evaluate.guard import Guard, GuardTarget, best_guard
from ptqcal.evaluate.metrics import QuantizationChange, bootstrap_interval, expected_calibration_error, softmax
from ptqcal.evaluate.record import ConfigInfo, ConfigKind, RunRecord
from ptqcal.evaluate.results import FLOAT_NAME, REPEAT_MARK, ConfigResult, FloatFirst, evaluate_logits
from ptqcal.evaluate.selective import selective_intervals
from ptqcal.evaluate.temperature import cross_fitted_temperatures

from .under_shift import ShiftCell, analyse_shift

BOOTSTRAP_RESAMPLES = 500
TEMPERATURE_MIN_IMAGES = 20  # fewer evaluation images: no temperature (each half fits one), no Figure 5
HEADLINE = ("top1_error", "ece", "swapped", "delta_top1_error", "aurc", "risk_at_90")  # metrics shown with an interval or a spread


@dataclass
class RunAnalysis(FloatFirst):
    """A run's configurations, evaluated.

    Attributes
    ----------
    record : RunRecord
        What the run saved.
    temperature : float or None
        The temperature, cross-fitted on the evaluation images (the geometric mean of the two
        halves' values); ``None`` for fewer than :data:`TEMPERATURE_MIN_IMAGES` images.
    temperatures : ndarray or None
        The temperature each evaluation image was scaled with: fitted on the other half.
    configs : list of ConfigResult
        The float reference first, then each quantized configuration (calibration draws folded
        into one result each).
    """

    record: RunRecord
    folder: Path
    temperature: float | None
    configs: list[ConfigResult]
    temperatures: np.ndarray | None = None
    halves: tuple[float, float] | None = None  # the temperatures fitted on each half
    # quantized configuration -> (the guard to deploy, its guard under each score): thresholds
    # chosen on the record's held-out images, rates judged on the evaluation images
    guards: dict[str, tuple[Guard, dict[str, Guard]]] = field(default_factory=dict)
    # configuration (and calibration draw) -> its own temperature per evaluation image, cross-fitted
    # on its own clean logits with the float model's seeded halves (empty without a temperature)
    own_temperatures: dict[str, np.ndarray] = field(default_factory=dict)
    own_halves: dict[str, tuple[float, float]] = field(default_factory=dict)
    # every configuration under each corruption at each severity the run computed (:mod:`.shift`)
    shift: list[ShiftCell] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.record.model

    @property
    def labels(self) -> np.ndarray:
        return self.record.labels

    @property
    def notes(self) -> list[str]:
        return self.record.notes

    def descriptor(self, config: str) -> ConfigInfo:
        """What ``config`` is (kind and bit widths), as the run recorded it."""
        return self.record.descriptor(config)

    @property
    def uniform(self) -> list[ConfigResult]:
        """The quantized configurations with one precision everywhere (fp16, or a step of the bit-width
        sweep), in sweep order: not a mixed one, nor a step calibrated again under a corruption."""
        return [c for c in self.quantized if self.descriptor(c.name).kind is ConfigKind.FP16
                or self.descriptor(c.name).swept]

    @property
    def draws(self) -> int:
        """Calibration draws per configuration."""
        return max((len(c.draws) for c in self.quantized), default=1)


def _intervals(logits: np.ndarray, labels: np.ndarray, change: QuantizationChange | None,
               seed: int) -> dict[str, tuple[float, float]]:
    """Bootstrap 95% intervals (fractions) of the headline metrics over evaluation images."""
    probabilities = softmax(logits.astype(np.float64))
    arrays = (probabilities.max(1), probabilities.argmax(1) == labels)
    out = {"top1_error": bootstrap_interval(lambda c, k: 1 - k.mean(), arrays, BOOTSTRAP_RESAMPLES, seed),
           "ece": bootstrap_interval(expected_calibration_error, arrays, BOOTSTRAP_RESAMPLES, seed)}
    out.update(selective_intervals(logits, labels, "msp", BOOTSTRAP_RESAMPLES, seed))
    if change is not None:
        # d = float correct - quantized correct per image: its mean is the added error
        pair = (change.swapped, change.float_correct.astype(float) - change.quant_correct.astype(float))
        out["swapped"] = bootstrap_interval(lambda s, d: s.mean(), pair, BOOTSTRAP_RESAMPLES, seed)
        out["delta_top1_error"] = bootstrap_interval(lambda s, d: d.mean(), pair, BOOTSTRAP_RESAMPLES, seed)
    return out


def analyse_record(record: RunRecord, folder: Path | None = None, seed: int = 0) -> RunAnalysis:
    """Metrics (with bootstrap intervals and the spread over calibration draws), what quantization
    changed, and temperature scaling, for every configuration of ``record``. A configuration
    without a descriptor fails here, loudly (``LookupError``): nothing is guessed from its name."""
    record.require_descriptors()
    labels, float_logits = record.labels, record.logits[FLOAT_NAME]
    fitted = cross_fitted_temperatures(float_logits, labels, seed, TEMPERATURE_MIN_IMAGES)
    temperatures, halves = fitted if fitted else (None, None)
    temperature = float(np.sqrt(halves[0] * halves[1])) if halves else None
    own = {FLOAT_NAME: fitted, **_own_temperatures(record, seed)} if fitted else {}  # float's own is the one above
    configs = []
    for name in (n for n in record.configs if REPEAT_MARK not in n):
        reference = None if name == FLOAT_NAME else float_logits
        result = evaluate_logits(name, record.logits[name], labels, reference, temperatures, _per_image(own, name))
        others = [evaluate_logits(name, record.logits[k], labels, reference, temperatures, _per_image(own, k))
                  for k in record.configs if k.startswith(name + REPEAT_MARK)]
        intervals = _intervals(result.logits, labels, result.change, seed)
        configs.append(replace(result.with_draws(others), intervals=intervals))
    guards = _guards(record)
    shift = analyse_shift(record, configs, temperatures, {k: v for k, (v, _) in own.items()}, guards)
    return RunAnalysis(record, Path(folder) if folder else Path(record.model), temperature, configs, temperatures,
                       halves, guards, {k: v for k, (v, _) in own.items()}, {k: h for k, (_, h) in own.items()}, shift)


def _own_temperatures(record: RunRecord, seed: int) -> dict[str, tuple[np.ndarray, tuple[float, float]]]:
    """Each configuration's (and calibration draw's) own temperature per image and its two fitted
    values: cross-fitted on its own clean logits exactly as the float model's (the same seeded
    halves), so a quantized model recalibrated by itself is judged on images it was not fitted on."""
    own = {}
    for name, logits in record.logits.items():
        if name == FLOAT_NAME:
            continue
        fitted = cross_fitted_temperatures(logits, record.labels, seed, TEMPERATURE_MIN_IMAGES)
        if fitted is not None:
            own[name] = fitted
    return own


def _per_image(own: dict[str, tuple[np.ndarray, tuple[float, float]]], name: str) -> np.ndarray | None:
    return own[name][0] if name in own else None


def _guards(record: RunRecord) -> dict[str, tuple[Guard, dict[str, Guard]]]:
    """Each quantized configuration's float fallback guard (:func:`~ptqcal.evaluate.guard.best_guard`)
    for the record's target, chosen on its held-out images and judged on the evaluation images;
    expected latencies from the batch-1 latencies the run measured (``None`` when untimed)."""
    if record.guard_target is None or FLOAT_NAME not in record.held_out_logits or not len(record.held_out_labels):
        return {}
    target, held_float = GuardTarget(**record.guard_target), record.held_out_logits[FLOAT_NAME]
    float_numbers = record.deployment.get(FLOAT_NAME)
    guards = {}
    for name, held in record.held_out_logits.items():
        if name == FLOAT_NAME:
            continue
        numbers = record.deployment.get(name)
        guards[name] = best_guard(name, target, (held, held_float, record.held_out_labels),
                                  (record.logits[name], record.logits[FLOAT_NAME], record.labels),
                                  numbers.latency_ms if numbers else None,
                                  float_numbers.latency_ms if float_numbers else None)
    return guards


def analyse_run(folder: str | Path, seed: int = 0) -> RunAnalysis:
    """:func:`analyse_record` of the run saved in ``folder``."""
    return analyse_record(RunRecord.load(folder), Path(folder), seed)
