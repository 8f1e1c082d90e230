"""Tables, ``report.md`` and a self-contained ``report.html`` for one or several runs."""

from __future__ import annotations

import base64
from importlib import metadata
import csv
import html
import io
import json
import math
import os
import platform
import re
import threading
from pathlib import Path
from typing import Any, Sequence

from ptqcal import __version__
from ptqcal.atomic import atomic_path
from ptqcal.evaluate.attribution import CONFIDENT as ATTRIBUTION_CONFIDENT, EFFECT_FIELDS
from ptqcal.evaluate.deploy import Deployment
from ptqcal.evaluate.metrics import FRACTION, Metrics, changes_by_confidence, reliability_of_logits
from ptqcal.evaluate.results import FLOAT_NAME
from ptqcal.quantize.spec import MIXED_NAME

import matplotlib
from matplotlib.figure import Figure

from .figures import (STYLE, DeploymentPoints, LayerMap, MarginCurves, ParetoPoints, SwapPanel, TemperatureEffect,
                      TransitionTable, plot_pareto,
                      plot_deployment, plot_layers, plot_margin, plot_reliability, plot_swap_panels, plot_temperature,
                      plot_transitions, save_figure)
from .results import HEADLINE, RunAnalysis, analyse_run

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
FIGURES = {
    "fig1_reliability": ("Figure 1 — calibration of the float model",
                         "One column per model. Bars: accuracy per confidence bin (number of predictions above each "
                         "bar); hatched: the gap between the bin's accuracy and its mean confidence (above the bar: "
                         "overconfident; below its top: underconfident); the line is the lowest precision. Below: "
                         "how many predictions fall in each bin."),
    "fig2_swaps": ("Figure 2 — what quantization changed",
                   "Top: % of predictions swapped and the change in top-1 error per precision. Middle: their ratio; "
                   "it stays low while only unsure predictions flip. Bottom: the float model's confidence in the "
                   "predictions each precision swapped."),
    "fig3_transitions": ("Figure 3 — what the swaps were",
                         "Each bar is % swapped, split into predictions quantization broke, fixed, or moved from one "
                         "wrong class to another; only the first two move the error."),
    "fig4_margin": ("Figure 4 — which predictions swap",
                    "Top: the probability that a prediction swaps, against the float model's top-1 minus top-2 "
                    "logit: small margins flip, large ones hold. Bottom: the share of each float-confidence bin "
                    "that swaps."),
    "fig6_deployment": ("Figure 6 — what to ship",
                        "Each configuration's weight bytes and throughput on this machine against the % of "
                        "predictions it swapped (the float model at 0): the lower left of the size panel and the "
                        "upper left of the speed panel are what a deployment wants."),
    "fig7_layers": ("Figure 7 — which layers flip confident predictions",
                    "Each weight layer quantized alone (everything else float) at each weight bit width, on a "
                    "seeded subset of the evaluation images. Left: % of the float model's confident predictions "
                    "that swap; right: the SQNR of the layer's output against float."),
    "fig8_pareto": ("Figure 8 — size against confident swaps",
                    "Each configuration's weight bytes against the % of the float model's confident predictions it "
                    "swapped (left) and its change in top-1 error (right), on the evaluation images; the grey steps "
                    "join the configurations nothing beats on both. The star is the mixed-precision model, chosen on "
                    "held-out images."),
    "fig5_temperature": ("Figure 5 — post-hoc temperature scaling",
                         "A temperature cross-fitted on the float model's evaluation logits (fitted on one half of "
                         "the images, applied to the other), applied to every "
                         "precision: ECE before and after, and where the swapped predictions' confidences move. "
                         "Temperature changes no prediction, so the swaps stay the same."),
}


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_rows(run: RunAnalysis) -> list[dict[str, Any]]:
    """One row per configuration, in fractions (as :class:`~ptqcal.evaluate.Metrics`): the
    metrics, their bootstrap intervals (``_ci95``), their std over calibration draws (``_std``)
    and, for quantized ones, the swap rate per float-confidence bin."""
    rows = []
    for config in run.configs:
        bits = re.fullmatch(r"a(\d+)w(\d+)", config.name.split("#")[0])
        row = {"model": run.name, "config": config.name, "weight_bits": int(bits[2]) if bits else None,
               "act_bits": int(bits[1]) if bits else None}
        row.update({k: _clean(v) for k, v in config.metrics.as_dict().items()})
        row.update({f"{k}_ci95": list(v) for k, v in config.intervals.items()})
        if config.spread is not None:
            row.update({f"{k}_std": _clean(getattr(config.spread, k)) for k in HEADLINE})
        numbers = run.record.deployment.get(config.name)
        if numbers is not None:
            row.update(vars(numbers))
        if config.change is not None:
            bins = changes_by_confidence(config.change)
            row["by_float_confidence"] = {key: [_clean(float(v)) for v in values] for key, values in bins.items()}
        rows.append(row)
    return rows


def _shown(key: str, value: float) -> float:
    """A metric as drawn: fractions in percent (or percentage points), others as they are."""
    return 100 * value if key in Metrics.__dataclass_fields__ and Metrics.unit(key) == FRACTION else value


def confidence_table(run: RunAnalysis) -> str:
    """% of each float-confidence bin's predictions that each precision swapped."""
    if not run.quantized:
        return ""
    bins = [changes_by_confidence(c.change) for c in run.quantized]
    edges, counts = bins[0]["edges"], bins[0]["counts"]
    head = "| float confidence | predictions | " + " | ".join(md(c.name) for c in run.quantized) + " |"
    lines = [head, "|" + "---|" * (2 + len(run.quantized))]
    for i in range(len(counts)):
        if counts[i]:
            cells = [f"{100 * b['swap_rate'][i]:.1f}" for b in bins]
            lines.append(f"| {edges[i]:.1f}–{edges[i + 1]:.1f} | {counts[i]} | " + " | ".join(cells) + " |")
    return "\n".join(["**Which confidences flip** (% of the bin's predictions swapped)", "\n".join(lines)])


DEPLOYMENT_UNITS = {"file_bytes": "bytes", "weight_bytes": "bytes", "threads": "count", "batch_size": "images",
                    "latency_ms": "milliseconds", "latency_p90_ms": "milliseconds", "throughput": "images/s"}


def metrics_csv(runs: Sequence[RunAnalysis]) -> str:
    """The table of every run's configurations as CSV, in fractions like ``metrics.json``."""
    keys = ["model", "config", "weight_bits", "act_bits"] + [key for key, _, _ in COLUMNS[1:]] + list(DEPLOYMENT_UNITS)
    keys += [f"{key}_{part}" for key in HEADLINE for part in ("ci95_low", "ci95_high", "std")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for run in runs:
        for row in metrics_rows(run):
            for key in HEADLINE:  # intervals and spreads as plain numeric columns
                low, high = row.pop(f"{key}_ci95", (None, None))
                row.update({f"{key}_ci95_low": low, f"{key}_ci95_high": high})
            writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in keys})
    return buffer.getvalue()


TIMINGS = ("threads", "batch_size", "latency_ms", "latency_p90_ms", "throughput")


def metrics_json(runs: Sequence[RunAnalysis]) -> str:
    """Every metric of every run as JSON (fractions; ``units`` names each metric's unit). It holds
    only what one seed decides, byte for byte: the timings of this machine are in ``metrics.csv``
    and ``run.json``."""
    units = {**{key: Metrics.unit(key) for key in Metrics.__dataclass_fields__},
             **{k: v for k, v in DEPLOYMENT_UNITS.items() if k not in TIMINGS}}
    rows = [{"model": r.name, "run": r.record.summary, "temperature": r.temperature,
             "configs": [{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics_rows(r)]} for r in runs]
    return json.dumps({"units": units, "runs": rows}, indent=2)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, str):
        return md(value)
    text = fmt.format(_shown(key, value))
    if row.get(f"{key}_std") is not None:
        text += f" ± {_shown(key, row[f'{key}_std']):.2f}"
    elif row.get(f"{key}_ci95") is not None:
        lo, hi = (_shown(key, v) for v in row[f"{key}_ci95"])
        text += f" [{lo:.1f}, {hi:.1f}]"
    return text


CHANGE_KEYS = {"swapped", "delta_top1_error", "delta_error_per_swapped", "mean_float_conf_swapped",
               "correct_to_wrong", "wrong_to_correct", "wrong_to_other_wrong",
               "median_float_margin_swapped", "median_float_margin_kept"}


def markdown_table(run: RunAnalysis, columns: Sequence[tuple[str, str, str]] = COLUMNS,
                   quantized_only: bool = False) -> str:
    """A Markdown table of ``columns`` (key, title, format) for every configuration, in percent."""
    rows = [r for r in metrics_rows(run) if not quantized_only or r["config"] != FLOAT_NAME]
    present = [c for c in columns if c[0] == "config" or any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in present) + " |", "|" + "---|" * len(present)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in present) + " |" for r in rows]
    return "\n".join(lines)


def markdown_tables(run: RunAnalysis) -> list[str]:
    """Accuracy and calibration of every configuration; then what quantization changed."""
    quality = [c for c in COLUMNS if c[0] not in CHANGE_KEYS]
    change = [c for c in COLUMNS if c[0] == "config" or c[0] in CHANGE_KEYS]
    tables = ["**Accuracy and calibration**", markdown_table(run, quality)]
    if run.quantized:
        tables += ["**What quantization changed** (against the float model on the same images)",
                   markdown_table(run, change, quantized_only=True)]
    return tables


def deployment_table(run: RunAnalysis) -> list[str]:
    """Size and speed of every configuration on the machine that ran it, and why a quantized one
    is not faster than float where it is not."""
    numbers = run.record.deployment
    reference = numbers.get(FLOAT_NAME)
    if reference is None:
        return []
    timed = reference.throughput is not None
    head = "| config | file MB | weights MB | weights × float |" + (
        " latency ms (batch 1, median / p90) | images/s (batch {}) | speed × float |".format(reference.batch_size)
        if timed else "")
    lines = [head, "|" + "---|" * (7 if timed else 4)]
    for name, d in numbers.items():
        cells = [md(name), f"{d.file_bytes / 1e6:.2f}", f"{d.weight_bytes / 1e6:.3f}",
                 f"{d.weight_bytes / max(reference.weight_bytes, 1):.3f}"]
        if timed and d.throughput is not None:
            cells += [f"{d.latency_ms:.2f} / {d.latency_p90_ms:.2f}", f"{d.throughput:.0f}",
                      f"{d.throughput / reference.throughput:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    threads = "ORT's default thread count, one per physical core" if reference.threads == 0 else \
        f"{reference.threads} ORT thread{'s' if reference.threads > 1 else ''}"
    sources = {d.throughput_source for d in numbers.values() if d.throughput is not None}
    how = {"evaluation": "images/s of session.run over the evaluation's full batches",
           "timed runs": "images/s of timed runs"}
    title = (f"**Deployment on this machine** ({threads}; {os.cpu_count()} CPUs; "
             f"{' or '.join(how.get(s, s) for s in sorted(sources))})") if timed else \
        "**Deployment** (sizes only: timing was skipped)"
    return [title, "\n".join(lines), _not_faster(numbers)] if timed else [title, "\n".join(lines)]


def _not_faster(numbers: dict[str, Deployment]) -> str:
    """Why each quantized configuration that is not faster than float is not."""
    reference, reasons = numbers[FLOAT_NAME], []
    for name, d in numbers.items():
        bits = re.fullmatch(r"a(\d+)w(\d+)", name)
        if bits is None or d.throughput is None or d.throughput > reference.throughput:
            continue
        if int(bits[2]) == 4:
            why = "its int4 weights have no integer kernel on CPU: ORT dequantizes them and runs float layers"
        elif int(bits[1]) < 8:
            why = "its activations below 8 bits keep a Clip in front of each QuantizeLinear, which stops fusion"
        else:
            why = "ORT's integer kernels are not faster than its float ones for this graph on this CPU"
        reasons.append(f"{md(name)} is not faster than float: {why}.")
    return " ".join(reasons)


TOP_LAYERS = 10  # rows of the attribution table in the report (layers.csv has them all)


def attribution_table(run: RunAnalysis) -> list[str]:
    """The layers whose weights, quantized alone, swap the most confident predictions."""
    result = run.record.attribution
    if result is None or not result.effects:  # a graph without Conv/Gemm/MatMul weights has nothing to attribute
        return []
    lines = ["| layer | weight bits | % confident swapped | % swapped | Δ err (pp) | SQNR dB |", "|---|---|---|---|---|---|"]
    for e in result.ranked()[:TOP_LAYERS]:
        confident = "–" if math.isnan(e.confident_swapped) else f"{100 * e.confident_swapped:.1f}"
        lines.append(f"| {md(e.layer)} | {e.weight_bits} | {confident} | {100 * e.swapped:.1f} | "
                     f"{100 * e.delta_top1_error:+.1f} | {e.sqnr_db:.1f} |")
    return [f"**Which layers flip confident predictions** (each weight layer quantized alone, everything else "
            f"float, on {result.images} seeded evaluation images, {result.confident} of them held with at least "
            f"{ATTRIBUTION_CONFIDENT:.0%} confidence; the {TOP_LAYERS} worst; every layer in layers.csv)",
            "\n".join(lines)]


def mixed_section(run: RunAnalysis) -> list[str]:
    """What the mixed-precision search chose, what it measured on its held-out images, and how it
    compares on the evaluation images with the uniform configuration of the same size."""
    choice = run.record.mixed
    if choice is None:
        return []
    target = (f"at most {100 * choice.limit:.2g}% of the confident predictions swapped, fewest weight bytes"
              if choice.target == "max_confident_swaps" else
              f"weights at most {choice.limit:.2g}x float's bytes, fewest confident swaps (greedy)")
    seen = (f"{choice.images} images held out of evaluation ({choice.confident} held with at least "
            f"{ATTRIBUTION_CONFIDENT:.0%} confidence by the float model)")
    lines = ["| moves (one layer one width down) | weight bytes | × float | % confident swapped | % swapped |", "|---|---|---|---|---|"]
    for step in choice.steps:
        confident = f"{100 * step.confident_swapped:.2f}" if choice.confident else "–"  # none to swap
        lines.append(f"| {step.moves} | {step.weight_bytes:,} | {step.weight_bytes / choice.float_weight_bytes:.3f} "
                     f"| {confident} | {100 * step.swapped:.2f} |")
    if not choice.met:
        return [f"**Mixed precision** (target: {target}): no assignment of the run's weight bit widths meets it "
                f"on the {seen}; the search measured:", "\n".join(lines)]
    counts = {}
    for bits in choice.layer_bits.values():
        counts[bits] = counts.get(bits, 0) + 1
    widths = ", ".join(f"{n} at {bits} bits" for bits, n in sorted(counts.items(), reverse=True))
    return [f"**Mixed precision** (target: {target}; activations at {choice.act_bits} bits): {widths} "
            f"(the per-layer widths are in run.json and model_{MIXED_NAME}.onnx). The search saw only the {seen}; "
            f"its steps below are measured there, its last row is the choice. The numbers of {md(MIXED_NAME)} in "
            "every other table and figure come from the evaluation images, which the search never saw.",
            "\n".join(lines)]


def layers_csv(runs: Sequence[RunAnalysis]) -> str | None:
    """Every (layer, bits) effect of every run that attributed, worst first (fractions)."""
    rows = [{"model": r.name, **vars(e)} for r in runs if r.record.attribution for e in r.record.attribution.ranked()]
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["model", *EFFECT_FIELDS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


CONFIDENT = ATTRIBUTION_CONFIDENT  # a float prediction held with at least this confidence counts as confident
COLLAPSED = 0.9  # a configuration that swaps at least this share of predictions has collapsed
FLIPPING = 0.05  # confident predictions "start to flip" once this share of them swaps ...
MIN_FLIPS = 3  # ... and at least this many (one image of a handful is noise)


def _confident_swaps(config) -> tuple[int, int]:
    """Swapped and total float predictions held with at least :data:`CONFIDENT` confidence."""
    return config.change.confident_swaps(CONFIDENT)


def sweep_reading(run: RunAnalysis, mild_ratio: float = 0.5) -> str:
    """Sentences on what the sweep shows, judged from the numbers: which confidences swap (the
    top confidence bin, not an average), and where a configuration collapsed."""
    quantized = [c for c in run.quantized if c.change.swapped.any()]
    if not quantized:
        return "No precision swapped any prediction."
    collapsed = [c for c in quantized if c.metrics.swapped >= COLLAPSED]
    working = [c for c in quantized if c not in collapsed]
    sentences = []
    mild = [c for c in working if c.metrics.delta_error_per_swapped < mild_ratio]
    if mild:
        most = max(mild, key=lambda c: c.metrics.swapped)
        m, (flipped, held) = most.metrics, _confident_swaps(most)
        confident = (f"of the {held} predictions the float model held with at least {100 * CONFIDENT:.0f}% "
                     f"confidence, {flipped} swapped" if held else
                     f"the float model held no prediction with {100 * CONFIDENT:.0f}% confidence or more")
        sentences.append(
            f"At {md(most.name)}, {100 * m.swapped:.2f}% of the predictions changed while the top-1 error moved by "
            f"{100 * m.delta_top1_error:+.2f} pp (ratio {m.delta_error_per_swapped:.2f}); {confident}.")
    flipping = [c for c in working if _confident_swaps(c)[0] >= max(MIN_FLIPS, FLIPPING * _confident_swaps(c)[1])]
    if flipping:
        first = flipping[0]  # in sweep order: the highest precision at which they flip
        flipped, held = _confident_swaps(first)
        sentences.append(f"At {md(first.name)} confident predictions flip: {100 * flipped / held:.1f}% of those held "
                         f"with at least {100 * CONFIDENT:.0f}% confidence swapped ({flipped} of {held}), and the "
                         f"ratio is {first.metrics.delta_error_per_swapped:.2f}.")
    for config in collapsed:
        sentences.append(f"At {md(config.name)} the model collapsed: {100 * config.metrics.swapped:.1f}% of the "
                         f"predictions changed and the top-1 error is {100 * config.metrics.top1_error:.1f}%.")
    return " ".join(sentences)


def environment() -> dict[str, str]:
    """Versions and machine the report was written with."""
    import matplotlib
    import numpy

    info = {"ptqcal": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "matplotlib": matplotlib.__version__}
    for package in ("onnxruntime", "onnx", "torch"):  # the versions that decide the numbers (read, not imported)
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    info.update({"platform": platform.platform(), "cpus": str(os.cpu_count())})
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = cpu.group(1) if cpu else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def _lowest_working(run: RunAnalysis):
    """The lowest precision that has not collapsed (Figure 1 draws it over the float model)."""
    working = [c for c in run.uniform if c.metrics.swapped < COLLAPSED]
    return working[-1] if working else None


def _calibration_words(run: RunAnalysis) -> str:
    m = run.reference.metrics
    gap = m.mean_confidence - (1 - m.top1_error)
    verdict = "overconfident" if gap > 0.01 else "underconfident" if gap < -0.01 else "about as confident as accurate"
    return (f"{md(run.name)}'s float model is {verdict}: mean confidence {100 * m.mean_confidence:.1f}% at "
            f"{100 * (1 - m.top1_error):.1f}% accuracy (ECE {100 * m.ece:.2f}%).")


def _figure_reading(key: str, runs: Sequence[RunAnalysis]) -> str:
    reading = FIGURES[key][1]
    if key == "fig1_reliability":
        collapsed = [md(r.name) for r in runs if r.uniform and _lowest_working(r) is not r.uniform[-1]]
        reading += " " + " ".join(_calibration_words(r) for r in runs)
        if collapsed:
            reading += (f" The lowest precision of {', '.join(collapsed)} collapsed (90% or more of its predictions "
                        "swapped) and is not drawn; the line is the lowest one that did not.")
    return reading


_DRAWING = threading.Lock()  # matplotlib's style is one per process (rc_context): one report draws at a time


def write_figures(runs: Sequence[RunAnalysis], out: Path) -> dict[str, str]:
    """All figures as PNG and SVG in ``out``; returns name -> PNG file name."""
    with _DRAWING:
        return _write_figures(runs, out)


def _write_figures(runs: Sequence[RunAnalysis], out: Path) -> dict[str, str]:
    written = {}
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(5.2 * len(runs), 6.2), layout="constrained")
        grid = fig.subplots(2, len(runs), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 2]})
        for column, run in enumerate(runs):
            curve, confidences = reliability_of_logits(run.reference.logits, run.labels)
            lowest = _lowest_working(run)
            overlay = (lowest.name, *reliability_of_logits(lowest.logits, run.labels)) if lowest else None
            title = f"{run.name}: float" + (f" and {lowest.name}" if lowest else "")
            plot_reliability(curve, confidences, title, overlay, ax=grid[:, column])
    save_figure(fig, out / "fig1_reliability")
    written["fig1_reliability"] = "fig1_reliability.png"
    if any(r.quantized for r in runs):
        with_q = [r for r in runs if r.quantized]
        save_figure(plot_swap_panels([SwapPanel.from_run(r) for r in with_q]), out / "fig2_swaps")
        save_figure(plot_transitions([TransitionTable.from_run(r) for r in with_q]), out / "fig3_transitions")
        save_figure(plot_margin([MarginCurves.from_run(r) for r in with_q]), out / "fig4_margin")
        written.update({k: f"{k}.png" for k in ("fig2_swaps", "fig3_transitions", "fig4_margin")})
        timed = [DeploymentPoints.from_run(r) for r in with_q]
        if all(p is not None for p in timed):
            save_figure(plot_deployment(timed), out / "fig6_deployment")
            written["fig6_deployment"] = "fig6_deployment.png"
        maps = [LayerMap.from_run(r) for r in runs if r.record.attribution and r.record.attribution.effects]
        if maps:
            save_figure(plot_layers(maps), out / "fig7_layers")
            written["fig7_layers"] = "fig7_layers.png"
        mixed = [ParetoPoints.from_run(r, CONFIDENT, MIXED_NAME) for r in with_q if r.record.mixed is not None]
        if mixed:
            save_figure(plot_pareto(mixed), out / "fig8_pareto")
            written["fig8_pareto"] = "fig8_pareto.png"
        effects = [e for e in (TemperatureEffect.from_run(r) for r in with_q) if e is not None]
        if effects:
            save_figure(plot_temperature(effects), out / "fig5_temperature")
            written["fig5_temperature"] = "fig5_temperature.png"
    return written


def _run_section(run: RunAnalysis) -> list[str]:
    info = run.record.summary
    lines = [f"## {md(run.name)}", "\n".join(f"- **{md(k)}**: {md(v)}" for k, v in info.items())]
    if run.halves is not None:
        lines.append(f"- **temperature**: {run.halves[0]:.3f} and {run.halves[1]:.3f}, each fitted on the float "
                     "model's logits of one seeded half of the evaluation images and applied to the other half "
                     "(never fitted on the images it is judged on)")
    lines += ["Errors, ECE and confidences in %, NLL in nats. Brackets: bootstrap 95% interval over evaluation "
              "images; ± : std over calibration repeats.",
              *markdown_tables(run), sweep_reading(run), confidence_table(run), *deployment_table(run),
              *attribution_table(run), *mixed_section(run)]
    if run.notes:
        lines.append("\n".join(f"- {md(note)}" for note in run.notes))
    return lines


def comparison(runs: Sequence[RunAnalysis]) -> list[str]:
    """Several models side by side: float calibration, and how each holds up at its lowest precision."""
    if len(runs) < 2 or not all(r.uniform for r in runs):
        return []
    lines = ["| model | float top-1 err % | float ECE % | float mean conf % | lowest precision | % swapped | "
             "Δ err (pp) | Δ err / % swapped | float conf of swapped % |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        f, q = run.reference.metrics, run.uniform[-1]
        m = q.metrics
        ratio = m.delta_error_per_swapped
        lines.append(f"| {md(run.name)} | {100 * f.top1_error:.2f} | {100 * f.ece:.2f} | {100 * f.mean_confidence:.2f} | "
                     f"{md(q.name)} | {100 * m.swapped:.2f} | {100 * m.delta_top1_error:+.2f} | "
                     f"{'–' if math.isnan(ratio) else f'{ratio:.3f}'} | "
                     f"{100 * m.mean_float_conf_swapped:.1f} |")
    return ["## Comparison", "Each model's float calibration, and what its lowest precision changed.", "\n".join(lines)]


def report_markdown(runs: Sequence[RunAnalysis], figures: dict[str, str]) -> str:
    """The whole report as Markdown, with ``figures`` (name -> PNG file name) embedded by name."""
    title = " vs ".join(md(r.name) for r in runs)
    parts = [f"# ptqcal report: {title}", *comparison(runs)]
    for run in runs:
        parts += _run_section(run)
    for key, file in figures.items():
        heading = FIGURES[key][0]
        parts += [f"## {heading}", _figure_reading(key, runs), f"![{heading}]({file})"]
    parts += ["## Environment", "\n".join(f"- **{k}**: {md(v)}" for k, v in environment().items())]
    return "\n\n".join(p for p in parts if p) + "\n"


HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;font-size:12px;margin:1em 0;display:block;overflow-x:auto}"
              "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
              "td:first-child{text-align:left}img{max-width:100%;height:auto}ul{padding-left:1.2em}"
              "li{margin:.1em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}")

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()!|#<>~])")


def md(text: Any) -> str:
    """Text from data, model files or a run record, safe inside the report's Markdown: one line,
    every Markdown character escaped (so no name or path can become a link, an image or a table)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _markdown_to_html(text: str, figures: dict[str, bytes]) -> str:
    """The report's small Markdown subset (headings, bullets, tables, images) as HTML. Only the
    figures the report drew (``figures``: file name -> PNG bytes) are embedded, as data URIs, so the
    page needs nothing else and no text can make it read a file."""
    out, table, items = [], [], []

    def inline(s: str) -> str:
        s = re.sub(r"\*\*(.+?)\*\*", lambda m: f"\x00b{m.group(1)}\x00/b", s)  # bold, before unescaping
        s = html.escape(re.sub(r"\\(.)", r"\1", s))
        return s.replace("\x00b", "<b>").replace("\x00/b", "</b>")

    def flush():
        if table:
            head, *body = table
            out.append("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</tbody></table>")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        image = re.fullmatch(r"!\[(.*)\]\(([^()\\]*)\)", line)
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif image and image.group(2) in figures:
            data = base64.b64encode(figures[image.group(2)]).decode()
            out.append(f'<figure><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">'
                       "</figure>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' " \
           f"content='width=device-width, initial-scale=1'><title>ptqcal report</title><style>{HTML_STYLE}</style>" \
           f"</head><body>{''.join(out)}</body></html>\n"


def build_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Analyse saved runs and write metrics, figures (PNG + SVG), report.md and report.html.

    Needs only the run folders' ``logits.npz`` and ``run.json``: no model is run, and neither
    onnxruntime nor torch is imported.
    """
    out = Path(out)
    runs = [analyse_run(folder) for folder in run_dirs]  # a wrong folder fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(runs, out)
    for name, text in (("metrics.csv", metrics_csv(runs)), ("metrics.json", metrics_json(runs)),
                       ("layers.csv", layers_csv(runs))):
        if text is None:
            continue
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    markdown = report_markdown(runs, figures)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(_markdown_to_html(markdown, {file: (out / file).read_bytes() for file in figures.values()}))
    return out / "report.md"
