"""Under shift: every configuration on the evaluation images corrupted (a *cell*: one corruption at
one severity, keyed ``"gaussian_noise@3"``), measured against the float model on the same corrupted
images, and the summaries the report and its figures draw (numpy only; no model is run).

Everything is a fraction. Clean numbers are severity 0 of corruption :data:`CLEAN`. Cells hold
first calibration draws only, so every comparison with clean uses each configuration's first draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ptqcal.evaluate.guard import GuardRates, GuardTarget, judge
from ptqcal.evaluate.metrics import Metrics, QuantizationChange
from ptqcal.evaluate.record import CELL, ConfigKind, RunRecord
from ptqcal.evaluate.results import FLOAT_NAME, ConfigResult, FloatFirst, evaluate_logits

CLEAN = "clean"  # the corruption of the clean rows of metrics.csv / metrics.json; their severity is 0
# what the report's per-severity tables average over corruptions (fractions; the ratio is pooled)
SHIFT_KEYS = ("swapped", "delta_top1_error", "delta_error_per_swapped", "top1_error", "ece", "ece_temperature",
              "ece_own_temperature")
GUARD_KEYS = ("swapped", "routed", "swaps_caught", "differing", "guarded_error")
_TOLERANCE = 1e-12  # a count / N against a target given as a decimal fraction (as the guard's)


def parse_cell(key: str) -> tuple[str, int]:
    """(corruption, severity) of a cell key as the record names it (``ValueError`` otherwise)."""
    match = CELL.fullmatch(key)
    if match is None:
        raise ValueError(f"not a corruption at a severity: {key[:40]!r}")
    return match[1], int(match[2])


@dataclass(frozen=True)
class ShiftCell(FloatFirst):
    """Every configuration of a run on the evaluation images under one corruption at one severity.

    ``configs``: the float model first, then each quantized configuration the cell holds (in the
    run's order), evaluated against the float model's logits on the same corrupted images, with the
    float model's and each configuration's own temperature fitted on clean logits. ``float_error_drop``
    and ``float_ece_drop``: the float model's top-1 error and ECE here minus clean (positive: worse).
    ``guards``: each guarded configuration's clean-chosen threshold judged on this cell.
    """

    key: str
    corruption: str
    severity: int
    configs: list[ConfigResult]
    float_error_drop: float
    float_ece_drop: float
    guards: dict[str, GuardRates] = field(default_factory=dict)


def analyse_shift(record: RunRecord, clean: Sequence[ConfigResult], temperatures: np.ndarray | None,
                  own: Mapping[str, np.ndarray], guards: Mapping[str, tuple]) -> list[ShiftCell]:
    """A :class:`ShiftCell` per cell of ``record.shifted`` that holds the float model's logits (a
    cell without them has nothing to measure against), in the record's order.

    ``clean``: the run's clean results, float first (the order of the configurations, and the float
    model's clean numbers); ``temperatures`` the float model's per-image temperature and ``own``
    each configuration's, both fitted on clean logits (a deployment calibrates on clean data);
    ``guards``: configuration -> (the guard to deploy, ...), as :attr:`RunAnalysis.guards`.
    """
    cells, order = [], [c.name for c in clean]
    for key, logits in record.shifted.items():
        if FLOAT_NAME not in logits:
            continue
        corruption, severity = parse_cell(key)
        reference = logits[FLOAT_NAME]
        results = [evaluate_logits(name, logits[name], record.labels, None if name == FLOAT_NAME else reference,
                                   temperatures, own.get(name)) for name in order if name in logits]
        judged = {name: judge(guard.threshold, logits[name], reference, record.labels, guard.score)
                  for name, (guard, *_) in guards.items() if name in logits}
        float_clean = clean[0].metrics
        cells.append(ShiftCell(key, corruption, severity, results,
                               results[0].metrics.top1_error - float_clean.top1_error,
                               results[0].metrics.ece - float_clean.ece, judged))
    return cells


def severities(cells: Sequence[ShiftCell]) -> list[int]:
    """The severities the cells hold, ascending."""
    return sorted({c.severity for c in cells})


def corruptions(cells: Sequence[ShiftCell]) -> list[str]:
    """The corruptions the cells hold, in the order they first appear."""
    return list(dict.fromkeys(c.corruption for c in cells))


def first_draw(result: ConfigResult) -> Metrics:
    """A clean result's first calibration draw: the one the cells were computed with."""
    return result.draws[0] if result.draws else result.metrics


def _value(metrics: Metrics, key: str) -> float:
    value = getattr(metrics, key)
    return float("nan") if value is None else float(value)


@dataclass(frozen=True)
class SeverityStat:
    """One configuration at one severity (0: clean): each of :data:`SHIFT_KEYS` as the mean over the
    corruptions of that severity (the ratio pooled: mean Δ error over mean swapped, NaN without a
    swap) and its lowest and highest corruption (``low``/``high``; NaN: undefined everywhere)."""

    config: str
    severity: int
    corruptions: int  # 0 for clean
    mean: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]


def _stat(config: str, severity: int, metrics: list[Metrics]) -> SeverityStat:
    columns = {key: np.array([_value(m, key) for m in metrics]) for key in SHIFT_KEYS}
    mean = {key: float(np.mean(v)) if not np.isnan(v).any() else float("nan") for key, v in columns.items()}
    swapped = mean["swapped"]
    mean["delta_error_per_swapped"] = mean["delta_top1_error"] / swapped if swapped > 0 else float("nan")
    low, high = {}, {}
    for key, values in columns.items():
        kept = values[~np.isnan(values)]
        low[key], high[key] = (float(kept.min()), float(kept.max())) if len(kept) else (math.nan, math.nan)
    return SeverityStat(config, severity, 0 if severity == 0 else len(metrics), mean, low, high)


def severity_stats(cells: Sequence[ShiftCell], clean: Sequence[ConfigResult]) -> list[SeverityStat]:
    """Every configuration's :class:`SeverityStat` at clean (its first draw) and at each severity,
    configuration by configuration (float first), severity ascending."""
    stats = []
    for result in clean:
        stats.append(_stat(result.name, 0, [first_draw(result)]))
        for severity in severities(cells):
            found = [c.result(result.name) for c in cells if c.severity == severity]
            found = [r.metrics for r in found if r is not None]
            if found:
                stats.append(_stat(result.name, severity, found))
    return stats


def pooled_change(changes: Sequence[QuantizationChange]) -> QuantizationChange | None:
    """Several changes (configurations, corruptions) as one over all their predictions: each
    prediction of each counts once. ``None`` for none."""
    if not changes:
        return None
    join = lambda key: np.concatenate([getattr(c, key) for c in changes])  # noqa: E731
    swapped, float_correct, quant_correct = join("swapped"), join("float_correct"), join("quant_correct")
    n = max(len(swapped), 1)
    return QuantizationChange(float(swapped.sum() / n), float((~quant_correct).sum() / n - (~float_correct).sum() / n),
                              swapped, join("float_confidence"), float_correct, quant_correct, join("float_margin"))


def changes_at(cells: Sequence[ShiftCell], clean: Sequence[ConfigResult], names: Sequence[str],
               severity: int) -> list[QuantizationChange]:
    """The changes of configurations ``names`` at ``severity`` (0: clean, first draws), over every
    corruption of that severity."""
    if severity == 0:
        return [c.change for c in clean if c.name in names and c.change is not None]
    return [r.change for cell in cells if cell.severity == severity for r in cell.quantized
            if r.name in names and r.change is not None]


@dataclass(frozen=True)
class Concentration:
    """Where the swaps of some configurations fall, pooled over them and the corruptions of one
    severity (0: clean): the float model's median confidence in swapped and kept predictions, and
    the share swapped of the predictions it held with at least ``confident`` confidence and of the
    others (NaN where there is none)."""

    severity: int
    predictions: int
    swaps: int
    median_swapped: float
    median_kept: float
    confident_rate: float
    unsure_rate: float
    ratio: float  # Δ error over swapped, pooled (NaN without a swap)


def concentration(change: QuantizationChange, severity: int, confident: float) -> Concentration:
    held = change.float_confidence >= confident

    def median(mask):
        return float(np.median(change.float_confidence[mask])) if mask.any() else float("nan")

    def rate(mask):
        return float(change.swapped[mask].mean()) if mask.any() else float("nan")

    return Concentration(severity, len(change.swapped), int(change.swapped.sum()), median(change.swapped),
                         median(~change.swapped), rate(held), rate(~held), change.ratio)


def meets(target: GuardTarget, rates: GuardRates) -> bool:
    """Whether ``rates`` meet ``target`` (as the guard's own check)."""
    if target.max_differing is not None:
        return rates.differing <= target.max_differing + _TOLERANCE
    return rates.routed <= target.max_routed + _TOLERANCE


@dataclass(frozen=True)
class GuardShift:
    """A guard's clean-chosen threshold at one severity (0: the clean evaluation images): each of
    :data:`GUARD_KEYS` as the mean over the corruptions of that severity, and in how many of them it
    meets its target."""

    config: str
    severity: int
    corruptions: int
    mean: dict[str, float]
    met: int
    target: GuardTarget


def _mean_defined(values: Sequence[float]) -> float:
    """The mean of the values that are defined (a share of swaps caught is NaN with no swap); NaN if none is."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def guard_shifts(cells: Sequence[ShiftCell], guards: Mapping[str, tuple]) -> list[GuardShift]:
    """Every guarded configuration's :class:`GuardShift` clean and at each severity."""
    out = []
    for name, (guard, *_) in guards.items():
        levels = [(0, [guard.evaluation])] + [(s, [c.guards[name] for c in cells if c.severity == s
                                                   and name in c.guards]) for s in severities(cells)]
        for severity, rates in levels:
            if rates:
                mean = {key: _mean_defined([getattr(r, key) for r in rates]) for key in GUARD_KEYS}
                out.append(GuardShift(name, severity, 0 if severity == 0 else len(rates), mean,
                                      sum(meets(guard.target, r) for r in rates), guard.target))
    return out


@dataclass(frozen=True)
class CalibrationPair:
    """A configuration calibrated on corrupted images and its clean twin (the uniform configuration
    of the same weight and activation widths calibrated on clean images): % swapped and Δ error on
    the clean evaluation images, their mean over the cells both are in, and in the cell it was
    calibrated on (``None`` when the run did not evaluate that one). Pairs are (twin, shifted)."""

    shifted: str
    twin: str
    calibrated_on: str
    clean_swapped: tuple[float, float]
    clean_delta: tuple[float, float]
    shift_swapped: tuple[float, float] | None
    shift_delta: tuple[float, float] | None
    own_cell_swapped: tuple[float, float] | None
    cells: int


def _twin(record: RunRecord, name: str) -> str | None:
    """The clean-calibrated uniform configuration of ``name``'s widths (by descriptor, never by name)."""
    info = record.descriptor(name)
    return next((other for other, o in record.descriptors.items() if o.kind is ConfigKind.UNIFORM
                 and o.calibrated_on is None and (o.weight_bits, o.act_bits) == (info.weight_bits, info.act_bits)),
                None)


def calibration_pairs(record: RunRecord, clean: Sequence[ConfigResult],
                      cells: Sequence[ShiftCell]) -> list[CalibrationPair]:
    """A :class:`CalibrationPair` per configuration calibrated on corrupted images that has a twin."""
    by_name, pairs = {c.name: c for c in clean}, []
    for name, info in record.descriptors.items():
        twin = None if info.calibrated_on is None else _twin(record, name)
        if twin is None or name not in by_name or twin not in by_name:
            continue
        both = [(c.result(twin).metrics, c.result(name).metrics, c.key) for c in cells
                if c.result(twin) is not None and c.result(name) is not None]

        def mean(key):
            return (float(np.mean([getattr(t, key) for t, _, _ in both])),
                    float(np.mean([getattr(s, key) for _, s, _ in both]))) if both else None

        own = next(((t.swapped, s.swapped) for t, s, key in both if key == info.calibrated_on), None)
        twin_m, shifted_m = first_draw(by_name[twin]), first_draw(by_name[name])
        pairs.append(CalibrationPair(name, twin, info.calibrated_on, (twin_m.swapped, shifted_m.swapped),
                                     (twin_m.delta_top1_error, shifted_m.delta_top1_error), mean("swapped"),
                                     mean("delta_top1_error"), own, len(both)))
    return pairs
