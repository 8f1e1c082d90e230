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
from .trust_figures import GuardCurves, RiskCoverageCurves, any_confident, plot_guard_curves, plot_risk_coverage

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

_DRAWING = threading.Lock()  # matplotlib's style is one per process (rc_context): one report draws at a time


def figure_reading(key: str, runs: Sequence[RunAnalysis]) -> str:
    """The caption of figure ``key``, with what Figure 1 shows of these runs."""
    reading = FIGURES[key][1]
    if key == "fig1_reliability":
        reading += " " + reliability_reading(runs)
    if key == "fig9_risk_coverage" and any(r.draws > 1 for r in runs):
        reading += " Each quantized curve is of its first calibration draw."
    if key == "fig10_guard":
        reading += _undrawn_guards(runs)
        if not any_confident([g for g in (GuardCurves.from_run(r) for r in runs) if g is not None]):
            reading += (" No guarded configuration swapped a prediction the float model held confidently, so there "
                        "is no right panel.")
    return reading


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
    """All figures as PNG and SVG in ``out``; returns name -> PNG file name."""
    with _DRAWING:
        return _write_figures(runs, out)


def _mixed_name(run: RunAnalysis) -> str | None:
    """The configuration Figure 8 stars: the mixed-precision one, found by its kind."""
    return next((c.name for c in run.quantized if run.descriptor(c.name).kind is ConfigKind.MIXED), None)


def _reliability_figure(runs: Sequence[RunAnalysis]) -> Figure:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(5.2 * len(runs), 6.2), layout="constrained")
        grid = fig.subplots(2, len(runs), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 2]})
        for column, run in enumerate(runs):
            curve, confidences = reliability_of_logits(run.reference.logits, run.labels)
            lowest = lowest_working(run)
            overlay = (lowest.name, *reliability_of_logits(lowest.logits, run.labels)) if lowest else None
            title = f"{run.name}: float" + (f" and {lowest.name}" if lowest else "")
            plot_reliability(curve, confidences, title, overlay, ax=grid[:, column])
    return fig


def _write_figures(runs: Sequence[RunAnalysis], out: Path) -> dict[str, str]:
    written = {}
    save_figure(_reliability_figure(runs), out / "fig1_reliability")
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
        mixed = [ParetoPoints.from_run(r, CONFIDENT, _mixed_name(r)) for r in with_q if r.record.mixed is not None]
        if mixed:
            save_figure(plot_pareto(mixed), out / "fig8_pareto")
            written["fig8_pareto"] = "fig8_pareto.png"
        effects = [e for e in (TemperatureEffect.from_run(r) for r in with_q) if e is not None]
        if effects:
            save_figure(plot_temperature(effects), out / "fig5_temperature")
            written["fig5_temperature"] = "fig5_temperature.png"
    written.update(_trust_figures(runs, out))  # last, as the report discusses them
    return written


def _trust_figures(runs: Sequence[RunAnalysis], out: Path) -> dict[str, str]:
    """Figure 9 for every run; Figure 10 for the runs with a guarded configuration that swapped."""
    save_figure(plot_risk_coverage([RiskCoverageCurves.from_run(r) for r in runs]), out / "fig9_risk_coverage")
    written = {"fig9_risk_coverage": "fig9_risk_coverage.png"}
    guarded = [g for g in (GuardCurves.from_run(r) for r in runs) if g is not None]
    if guarded:
        save_figure(plot_guard_curves(guarded), out / "fig10_guard")
        written["fig10_guard"] = "fig10_guard.png"
    return written
