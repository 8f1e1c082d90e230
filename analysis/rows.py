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
from ptqcal.evaluate.metrics import Metrics, changes_by_confidence
from ptqcal.evaluate.results import FLOAT_NAME
from ptqcal.evaluate.record import finite

from .run_analysis import HEADLINE, RunAnalysis

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
        row = {"model": run.name, "config": config.name, "weight_bits": info.weight_bits, "act_bits": info.act_bits}
        row.update({k: _clean(v) for k, v in config.metrics.as_dict().items()})
        row.update({f"{k}_ci95": list(v) for k, v in config.intervals.items()})
        if config.spread is not None:
            row.update({f"{k}_std": _clean(getattr(config.spread, k)) for k in HEADLINE})
        row.update(deployment_fields(run, config.name))
        if config.change is not None:
            bins = changes_by_confidence(config.change)
            row["by_float_confidence"] = {key: [_clean(float(v)) for v in values] for key, values in bins.items()}
        rows.append(row)
    return rows


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
    """The table of every run's configurations as CSV, in fractions like ``metrics.json``."""
    keys = ["model", "config", "weight_bits", "act_bits"] + [key for key, _, _ in COLUMNS[1:]] + list(SELECTIVE)
    keys += list(DEPLOYMENT_UNITS)
    keys += [f"{key}_{part}" for key in HEADLINE for part in ("ci95_low", "ci95_high", "std")]
    buffer = io.StringIO()
    writer = csvsafe.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for run in runs:
        for row in metrics_rows(run):
            for key in HEADLINE:  # intervals and spreads as plain numeric columns
                low, high = row.pop(f"{key}_ci95", (None, None))
                row.update({f"{key}_ci95_low": low, f"{key}_ci95_high": high})
            writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in keys})
    return buffer.getvalue()


def metrics_json(runs: Sequence[RunAnalysis]) -> str:
    """Every metric of every run as JSON (fractions; ``units`` names each metric's unit). It holds
    only what one seed decides, byte for byte: the timings of this machine are in ``metrics.csv``
    and ``run.json``."""
    units = {**{key: Metrics.unit(key) for key in Metrics.__dataclass_fields__},
             **{k: v for k, v in DEPLOYMENT_UNITS.items() if k not in TIMINGS}}
    rows = [{"model": r.name, "run": r.record.summary, "temperature": r.temperature,
             "configs": [{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics_rows(r)]} for r in runs]
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
