"""Every configuration's numbers as rows, and the files made of them: ``metrics.csv``,
``metrics.json`` and ``layers.csv`` (fractions throughout, as computed; percent is for drawing)."""

from __future__ import annotations

import io
import json
import math
from typing import Any, Sequence

from ptqcal import csvsafe
from ptqcal.evaluate.attribution import EFFECT_FIELDS
from ptqcal.evaluate.deploy import Deployment, Ratio, latency_ratio, speed_ratio
from ptqcal.evaluate.metrics import FRACTION, Metrics, changes_by_confidence
from ptqcal.evaluate.results import FLOAT_NAME
from ptqcal.evaluate.record import finite

from .run_analysis import HEADLINE, RunAnalysis
from .under_shift import CLEAN, ShiftCell, first_draw, meets

# The columns of the report's tables (key, Markdown title, format of the value in percent); their
# keys, in this order, are also the columns of metrics.csv.
COLUMNS = [
    ("config", "config", "{}"),
    ("top1_error", "top-1 err %", "{:.2f}"),
    ("top5_error", "top-5 err %", "{:.2f}"),
    ("nll", "NLL", "{:.4f}"),
    ("brier", "Brier", "{:.4f}"),
    ("ece", "ECE %", "{:.2f}"),
    ("ece_equal_mass", "ECE eq-mass %", "{:.2f}"),
    ("mce", "MCE %", "{:.1f}"),
    ("classwise_ece", "classwise ECE %", "{:.3f}"),
    ("mean_confidence", "mean conf %", "{:.2f}"),
    ("ece_temperature", "ECE after T %", "{:.2f}"),
    ("ece_own_temperature", "ECE after own T %", "{:.2f}"),
    ("swapped", "% swapped", "{:.2f}"),
    ("delta_top1_error", "Δ err (pp)", "{:+.2f}"),
    ("delta_error_per_swapped", "Δ err / % swapped", "{:.3f}"),
    ("mean_float_conf_swapped", "float conf of swapped %", "{:.1f}"),
    ("correct_to_wrong", "correct→wrong %", "{:.2f}"),
    ("wrong_to_correct", "wrong→correct %", "{:.2f}"),
    ("wrong_to_other_wrong", "wrong→wrong %", "{:.2f}"),
    ("median_float_margin_swapped", "median margin swapped", "{:.2f}"),
    ("median_float_margin_kept", "median margin kept", "{:.2f}"),
]
# selective prediction (evaluate/selective.py): in metrics.csv and metrics.json, and a table of its own
SELECTIVE = ("aurc", "aurc_margin", "aurc_entropy", "eaurc", "risk_at_80", "risk_at_90", "coverage_at_float_risk")
DEPLOYMENT_UNITS = {"file_bytes": "bytes", "weight_bytes": "bytes", "threads": "count", "batch_size": "images",
                    "latency_ms": "milliseconds", "latency_p90_ms": "milliseconds", "latency_runs": "count",
                    "latency_vs_float": "ratio", "latency_vs_float_low": "ratio", "latency_vs_float_high": "ratio",
                    "throughput": "images/s", "throughput_runs": "count", "throughput_images": "images",
                    "speed_vs_float": "ratio", "speed_vs_float_low": "ratio", "speed_vs_float_high": "ratio"}
SIZES = ("file_bytes", "weight_bytes")  # what one seed decides; every other deployment number is this machine's
# this machine's timings and what is made of them: in metrics.csv and run.json, never in metrics.json
TIMINGS = tuple(sorted((set(Deployment.__dataclass_fields__) | set(DEPLOYMENT_UNITS)) - set(SIZES)))
# a cell's row: these metrics minus the configuration's own clean ones (its first calibration draw)
VS_CLEAN = ("top1_error", "ece", "ece_temperature", "ece_own_temperature", "swapped", "delta_top1_error")
# the float fallback guard's clean-chosen threshold judged on the row's images (fractions; met: 1 or 0)
GUARD_FIELDS = {"guard_routed": "routed", "guard_differing": "differing", "guard_error": "guarded_error"}


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_rows(run: RunAnalysis) -> list[dict[str, Any]]:
    """One row per configuration, in fractions (as :class:`~ptqcal.evaluate.Metrics`): its bit
    widths (from the record's descriptor), the metrics, their bootstrap intervals (``_ci95``), their
    std over calibration draws (``_std``) and, for quantized ones, the swap rate per
    float-confidence bin."""
    rows = []
    for config in run.configs:
        info = run.descriptor(config.name)
        row = {"model": run.name, "config": config.name, "corruption": CLEAN, "severity": 0,
               "weight_bits": info.weight_bits, "act_bits": info.act_bits, "calibrated_on": info.calibrated_on}
        row.update({k: _clean(v) for k, v in config.metrics.as_dict().items()})
        if config.name in run.guards:
            guard = run.guards[config.name][0]
            row.update(_guard_fields(guard.evaluation, meets(guard.target, guard.evaluation)))
        row.update({f"{k}_ci95": list(v) for k, v in config.intervals.items()})
        if config.spread is not None:
            row.update({f"{k}_std": _clean(getattr(config.spread, k)) for k in HEADLINE})
        row.update(deployment_fields(run, config.name))
        if config.change is not None:
            bins = changes_by_confidence(config.change)
            row["by_float_confidence"] = {key: [_clean(float(v)) for v in values] for key, values in bins.items()}
        rows.append(row)
    return rows


def _guard_fields(rates, met: bool) -> dict[str, Any]:
    return {**{key: _clean(getattr(rates, name)) for key, name in GUARD_FIELDS.items()}, "guard_met": int(met)}


def shift_rows(run: RunAnalysis) -> list[dict[str, Any]]:
    """One row per cell (corruption at a severity) and configuration, in fractions: as
    :func:`metrics_rows` (without bootstrap intervals, spreads or timings: one draw, one pass) plus
    the change from the configuration's own clean numbers (``<metric>_vs_clean``) and, for a guarded
    configuration, its clean-chosen guard judged on the cell."""
    rows = []
    for cell in run.shift:
        for config in cell.configs:
            rows.append(_shift_row(run, cell, config))
    return rows


def _shift_row(run: RunAnalysis, cell: ShiftCell, config) -> dict[str, Any]:
    info = run.descriptor(config.name)
    clean = first_draw(next(c for c in run.configs if c.name == config.name))
    row = {"model": run.name, "config": config.name, "corruption": cell.corruption, "severity": cell.severity,
           "weight_bits": info.weight_bits, "act_bits": info.act_bits, "calibrated_on": info.calibrated_on}
    row.update({k: _clean(v) for k, v in config.metrics.as_dict().items()})
    for key in VS_CLEAN:
        now, before = getattr(config.metrics, key), getattr(clean, key)
        row[f"{key}_vs_clean"] = None if now is None or before is None else _clean(now - before)
    if config.name in cell.guards:
        row.update(_guard_fields(cell.guards[config.name], meets(run.guards[config.name][0].target,
                                                                 cell.guards[config.name])))
    if config.change is not None:
        bins = changes_by_confidence(config.change)
        row["by_float_confidence"] = {key: [_clean(float(v)) for v in values] for key, values in bins.items()}
    return row


def _ratio_fields(key: str, value: Ratio | None) -> dict[str, float | None]:
    if value is None:
        return {}
    return {key: _clean(value.value), f"{key}_low": value.low, f"{key}_high": value.high}


def deployment_fields(run: RunAnalysis, config: str) -> dict[str, Any]:
    """``config``'s size and speed as recorded, and its speed and batch-1 latency over the float
    model's with their ranges (:func:`~ptqcal.evaluate.deploy.ratio`); empty when unrecorded."""
    numbers, reference = run.record.deployment.get(config), run.record.deployment.get(FLOAT_NAME)
    if numbers is None:
        return {}
    fields = dict(vars(numbers))
    if reference is not None:
        fields.update(_ratio_fields("speed_vs_float", speed_ratio(numbers, reference)))
        fields.update(_ratio_fields("latency_vs_float", latency_ratio(numbers, reference)))
    return fields


def metrics_csv(runs: Sequence[RunAnalysis]) -> str:
    """The table of every run's configurations as CSV, in fractions like ``metrics.json``: a row per
    configuration on the clean evaluation images (``corruption`` ``"clean"``, ``severity`` 0), then
    one per corruption, severity and configuration the run computed (``*_vs_clean``: the change from
    the configuration's clean row, of its first calibration draw)."""
    keys = ["model", "config", "corruption", "severity", "weight_bits", "act_bits", "calibrated_on"]
    keys += [key for key, _, _ in COLUMNS[1:]] + list(SELECTIVE) + list(DEPLOYMENT_UNITS)
    keys += [f"{key}_{part}" for key in HEADLINE for part in ("ci95_low", "ci95_high", "std")]
    keys += [f"{key}_vs_clean" for key in VS_CLEAN] + [*GUARD_FIELDS, "guard_met"]
    buffer = io.StringIO()
    writer = csvsafe.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for run in runs:
        for row in metrics_rows(run) + shift_rows(run):  # clean rows first, then each cell's
            for key in HEADLINE:  # intervals and spreads as plain numeric columns
                low, high = row.pop(f"{key}_ci95", (None, None))
                row.update({f"{key}_ci95_low": low, f"{key}_ci95_high": high})
            writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in keys})
    return buffer.getvalue()


def metrics_json(runs: Sequence[RunAnalysis]) -> str:
    """Every metric of every run as JSON (fractions; ``units`` names each metric's unit). It holds
    only what one seed decides, byte for byte: the timings of this machine are in ``metrics.csv``
    and ``run.json``. Each run has ``configs`` (clean rows), ``shift`` (a row per corruption,
    severity and configuration, as in ``metrics.csv``; empty without corruptions) and
    ``own_temperatures`` (each configuration's two cross-fitted temperatures)."""
    units = {**{key: Metrics.unit(key) for key in Metrics.__dataclass_fields__},
             **{k: v for k, v in DEPLOYMENT_UNITS.items() if k not in TIMINGS},
             **{f"{key}_vs_clean": Metrics.unit(key) for key in VS_CLEAN}, **dict.fromkeys(GUARD_FIELDS, FRACTION),
             "guard_met": "flag", "severity": "level"}
    rows = [{"model": r.name, "run": r.record.summary, "temperature": r.temperature,
             "own_temperatures": {name: list(halves) for name, halves in r.own_halves.items()},
             "configs": [{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics_rows(r)],
             "shift": shift_rows(r)} for r in runs]
    return json.dumps(finite({"units": units, "runs": rows}), indent=2, allow_nan=False)  # strict JSON: null, not NaN


def layers_csv(runs: Sequence[RunAnalysis]) -> str | None:
    """Every (layer, bits) effect of every run that attributed, worst first (fractions)."""
    rows = [{"model": r.name, **vars(e)} for r in runs if r.record.attribution for e in r.record.attribution.ranked()]
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csvsafe.DictWriter(buffer, fieldnames=["model", *EFFECT_FIELDS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
