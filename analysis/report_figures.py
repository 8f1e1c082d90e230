"""Which figures a report has, their captions, and drawing them into its folder (the plots
themselves are in :mod:`.figures`)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import matplotlib
from matplotlib.figure import Figure

from ptqcal.evaluate.metrics import reliability_of_logits
from ptqcal.evaluate.record import ConfigKind

from .deploy_figures import DeploymentPoints, LayerMap, ParetoPoints, plot_deployment, plot_layers, plot_pareto
from .figures import (STYLE, MarginCurves, SwapPanel, TemperatureEffect, TransitionTable, plot_margin,
                      plot_reliability, plot_swap_panels, plot_temperature, plot_transitions, save_figure)
from .judgement import CONFIDENT, lowest_working, reliability_reading
from .markdown import md
from .run_analysis import RunAnalysis
from .shift_figures import MAX_PANELS, ShiftConfidence, ShiftCurves, plot_shift, plot_shift_confidence
from .trust_figures import GuardCurves, RiskCoverageCurves, any_confident, plot_guard_curves, plot_risk_coverage

FIGURES = {  # in the order of their numbers, which is the order the report discusses them
    "fig1_reliability": ("Figure 1 — calibration of the float model",
                         "One column per model. Bars: accuracy per confidence bin (the number written in or above "
                         "each bar is its number of predictions); hatched: the gap between the bin's accuracy and its "
                         "mean confidence (above the bar: overconfident; below its top: underconfident); the line is "
                         "the lowest precision. Below: how many predictions fall in each bin."),
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
    "fig5_temperature": ("Figure 5 — post-hoc temperature scaling",
                         "A temperature cross-fitted on the float model's evaluation logits (fitted on one half of "
                         "the images, applied to the other), applied to every precision: ECE before and after, and "
                         "where the confidences of the predictions swapped by Figure 1's precision (the lowest one "
                         "that did not collapse) move. Temperature changes no prediction, so the swaps stay the same."),
    "fig6_deployment": ("Figure 6 — what to ship",
                        "Every configuration (the float model, ptqcal's precisions, your own graphs marked \"yours\" "
                        "and other toolchains' marked \"peer\") by its weight bytes (top) and its throughput on this "
                        "machine (bottom), against the % of predictions it swapped (left) and the % of the float "
                        f"model's confident (≥ {100 * CONFIDENT:.0f}%) predictions it swapped (right); the float "
                        "model is at 0. The lower left of the top panels and the upper left of the bottom ones are "
                        "what a deployment wants. Configurations on one spot are set side by side."),
    "fig7_layers": ("Figure 7 — which layers flip confident predictions",
                    "Each weight layer quantized alone (everything else float) at each weight bit width, on a "
                    "seeded subset of the evaluation images. Left: % of the float model's confident predictions "
                    "that swap; right: the SQNR of the layer's output against float."),
    "fig8_pareto": ("Figure 8 — size against confident swaps",
                    "Each configuration's weight bytes against the % of the float model's confident predictions it "
                    "swapped (left) and its change in top-1 error (right), on the evaluation images; the grey steps "
                    "join the configurations nothing beats on both. The star is the mixed-precision model, chosen on "
                    "held-out images; configurations on one spot are set side by side."),
    "fig9_risk_coverage": ("Figure 9 — risk against coverage",
                           "Each configuration keeps its most confident predictions (by its max softmax probability) "
                           "and abstains on the rest: the top-1 error of those it keeps against their share, float "
                           "dashed. Where a quantized curve stays under the dotted line, that configuration keeps "
                           "that share of its predictions at no more than the float model's full error."),
    "fig10_guard": ("Figure 10 — what the float fallback guard catches",
                    "Each quantized configuration's guard, under the score chosen for it on held-out images, on the "
                    "evaluation images: the share of its swaps (left) and of its confident swaps (right) it routes to "
                    "the float model, against the share of all inputs routed, as the threshold rises; the dot is the "
                    "chosen threshold, the diagonal routing at random."),
    "fig11_shift": ("Figure 11 — under shift",
                    "The evaluation images corrupted, severity by severity (clean first): each configuration's % of "
                    "predictions swapped and change in top-1 error against the float model on the same corrupted "
                    "images, and its ECE (the float model dashed). Top row: the mean over corruptions, the band from "
                    "the lowest to the highest corruption; then a row per corruption. First calibration draws."),
    "fig12_shift_confidence": ("Figure 12 — which confidences flip under shift",
                               "The share of each float-confidence bin (10 equal-width bins; bins of fewer than "
                               "5 predictions left out) that each quantized configuration swapped, clean and at each "
                               "severity, pooled over the corruptions of that severity (the float model's confidence "
                               "on the same corrupted images). Where the paper's claim holds the lines fall from "
                               "left to right at every severity."),
}

_DRAWING = threading.Lock()  # matplotlib's style is one per process (rc_context): one report draws at a time


def figure_reading(key: str, runs: Sequence[RunAnalysis]) -> str:
    """The caption of figure ``key``, with what it shows of these runs (and what it leaves out)."""
    reading = FIGURES[key][1]
    if key == "fig1_reliability":
        reading += " " + reliability_reading(runs)
    if key == "fig6_deployment":
        reading += _untimed(runs)
    if key == "fig7_layers":
        reading += "".join(f" {s}" for s in _blank_layer_maps(runs))
    if key == "fig9_risk_coverage" and any(r.draws > 1 for r in runs):
        reading += " Each quantized curve is of its first calibration draw."
    if key == "fig12_shift_confidence":
        reading += "".join(f" {md(p.model)}: {', '.join(md(n) for n in p.left_out)} not drawn (at most {MAX_PANELS} "
                           "panels a model; each cell's bins of every configuration are in metrics.json's by_float_confidence)."
                           for p in (ShiftConfidence.from_run(r) for r in runs) if p is not None and p.left_out)
    if key == "fig10_guard":
        reading += _undrawn_guards(runs)
        if not any_confident([g for g in (GuardCurves.from_run(r) for r in runs) if g is not None]):
            reading += (" No guarded configuration swapped a prediction the float model held confidently, so there "
                        "is no right panel.")
    return reading


def figure_sections(runs: Sequence[RunAnalysis], figures: dict[str, str]) -> list[str]:
    """The report's figure sections, in the order of their numbers: heading, caption and image of
    each figure in ``figures`` (name -> PNG file name, from :func:`write_figures`); heading and one
    sentence for a figure the runs asked for but that has nothing to show (Figure 7 when no layer
    flipped a confident prediction)."""
    parts = []
    for key, (heading, _) in FIGURES.items():
        if key in figures:
            parts += [f"## {heading}", figure_reading(key, runs), f"![{heading}]({figures[key]})"]
        elif key == "fig7_layers" and _blank_layer_maps(runs):
            parts += [f"## {heading}", " ".join(_blank_layer_maps(runs))]
    return parts


def _blank_layer_maps(runs: Sequence[RunAnalysis]) -> list[str]:
    """A sentence per attributed run whose layers, each quantized alone, swapped no confident
    prediction: its map would be blank, so it is not drawn."""
    sentences = []
    for run in runs:
        result = run.record.attribution
        if result is None or not result.effects or LayerMap.from_run(run).flips:
            continue
        why = (f"no weight layer quantized alone swapped any of the {result.confident} predictions the float model "
               f"held with at least {100 * CONFIDENT:.0f}% confidence" if result.confident else
               f"the float model held none of them with at least {100 * CONFIDENT:.0f}% confidence")
        sentences.append(f"{md(run.name)}: on its {result.images} attribution images {why}, so it has no layer map "
                         "(its layers are in the table of its section and in layers.csv).")
    return sentences


def _untimed(runs: Sequence[RunAnalysis]) -> str:
    """Which configurations Figure 6 leaves out of its speed panels (not timed) or entirely (no size)."""
    sentences = []
    for run in runs:
        numbers = run.record.deployment
        unsized = [md(c.name) for c in run.configs if c.name not in numbers]
        untimed = [md(c.name) for c in run.configs if c.name in numbers and numbers[c.name].throughput is None]
        if unsized:
            sentences.append(f" {md(run.name)}: {', '.join(unsized)} has no size or speed, so it is not drawn.")
        if untimed:
            sentences.append(f" {md(run.name)}: {', '.join(untimed)} was not timed, so it is only in the top panels.")
    return "".join(sentences)


def _undrawn_guards(runs: Sequence[RunAnalysis]) -> str:
    """Which guarded configurations Figure 10 leaves out, and why."""
    sentences = []
    for run in runs:
        quiet = [md(c.name) for c in run.quantized if c.name in run.guards and not c.change.swapped.any()]
        if quiet:
            sentences.append(f"{md(run.name)}: {', '.join(quiet)} swapped no prediction, so there is no curve.")
        if not run.guards and run.quantized:
            sentences.append(f"{md(run.name)} has no guard (see its section).")
    return "".join(f" Not drawn: {s}" for s in sentences)


def write_figures(runs: Sequence[RunAnalysis], out: Path) -> dict[str, str]:
    """Every figure the runs have something to show in, as PNG and SVG in ``out``, in the order of
    their numbers; returns name -> PNG file name."""
    written = {}
    with _DRAWING, matplotlib.rc_context(STYLE):
        for key, draw in _DRAWERS.items():
            fig = draw(runs)
            if fig is not None:
                save_figure(fig, out / key)
                written[key] = f"{key}.png"
    return written


def _mixed_name(run: RunAnalysis) -> str | None:
    """The configuration Figure 8 stars: the mixed-precision one, found by its kind."""
    return next((c.name for c in run.quantized if run.descriptor(c.name).kind is ConfigKind.MIXED), None)


def _reliability(runs: Sequence[RunAnalysis]) -> Figure:
    fig = Figure(figsize=(5.2 * len(runs), 6.2), layout="constrained")
    grid = fig.subplots(2, len(runs), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    for column, run in enumerate(runs):
        curve, confidences = reliability_of_logits(run.reference.logits, run.labels)
        lowest = lowest_working(run)
        overlay = (lowest.name, *reliability_of_logits(lowest.logits, run.labels)) if lowest else None
        title = f"{run.name}: float" + (f" and {lowest.name}" if lowest else "")
        plot_reliability(curve, confidences, title, overlay, ax=grid[:, column])
    return fig


def _quantized(runs: Sequence[RunAnalysis]) -> list[RunAnalysis]:
    return [r for r in runs if r.quantized]


def _temperature(runs: Sequence[RunAnalysis]) -> Figure | None:
    """Figure 5; its bottom panel follows Figure 1's precision (the lowest that did not collapse)."""
    chosen = [(r, lowest_working(r)) for r in _quantized(runs)]
    effects = [TemperatureEffect.from_run(r, lowest.name if lowest else "") for r, lowest in chosen]
    effects = [e for e in effects if e is not None]
    return plot_temperature(effects) if effects else None


def _deployment(runs: Sequence[RunAnalysis]) -> Figure | None:
    """Figure 6, of the runs that timed a configuration."""
    timed = [p for p in (DeploymentPoints.from_run(r, CONFIDENT) for r in _quantized(runs)) if p is not None]
    return plot_deployment(timed) if timed else None


def _layers(runs: Sequence[RunAnalysis]) -> Figure | None:
    """Figure 7, of the attributed runs whose layers flip a confident prediction (a blank map is a
    sentence of the caption instead)."""
    maps = [LayerMap.from_run(r) for r in runs if r.record.attribution and r.record.attribution.effects]
    maps = [m for m in maps if m.flips]
    return plot_layers(maps) if maps else None


def _pareto(runs: Sequence[RunAnalysis]) -> Figure | None:
    mixed = [ParetoPoints.from_run(r, CONFIDENT, _mixed_name(r)) for r in _quantized(runs) if r.record.mixed]
    return plot_pareto(mixed) if mixed else None


def _guard(runs: Sequence[RunAnalysis]) -> Figure | None:
    """Figure 10, of the runs with a guarded configuration that swapped."""
    guarded = [g for g in (GuardCurves.from_run(r) for r in runs) if g is not None]
    return plot_guard_curves(guarded) if guarded else None


def _present(plot, data):
    """A drawer of one figure of the runs whose data class has something (``from_run`` not ``None``)."""
    def draw(runs):
        found = [d for d in (data.from_run(r) for r in runs) if d is not None]
        return plot(found) if found else None

    return draw


def _if_quantized(plot, data):
    """A drawer of one figure per run with a quantized configuration."""
    return lambda runs: plot([data.from_run(r) for r in _quantized(runs)]) if _quantized(runs) else None


_DRAWERS = {  # FIGURES' keys, in its order
    "fig1_reliability": _reliability,
    "fig2_swaps": _if_quantized(plot_swap_panels, SwapPanel),
    "fig3_transitions": _if_quantized(plot_transitions, TransitionTable),
    "fig4_margin": _if_quantized(plot_margin, MarginCurves),
    "fig5_temperature": _temperature,
    "fig6_deployment": _deployment,
    "fig7_layers": _layers,
    "fig8_pareto": _pareto,
    "fig9_risk_coverage": lambda runs: plot_risk_coverage([RiskCoverageCurves.from_run(r) for r in runs]),
    "fig10_guard": _guard,
    "fig11_shift": _present(plot_shift, ShiftCurves),
    "fig12_shift_confidence": _present(plot_shift_confidence, ShiftConfidence),
}
