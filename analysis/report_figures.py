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
from .run_analysis import RunAnalysis

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

_DRAWING = threading.Lock()  # matplotlib's style is one per process (rc_context): one report draws at a time


def figure_reading(key: str, runs: Sequence[RunAnalysis]) -> str:
    """The caption of figure ``key``, with what Figure 1 shows of these runs."""
    reading = FIGURES[key][1]
    if key == "fig1_reliability":
        reading += " " + reliability_reading(runs)
    return reading


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
    return written
