"""The paper's figures, plotted from computed results (compute with ptqcal.evaluate, plot here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ptqcal.evaluate import ConfigResult, ReliabilityCurve, reliability_curve, softmax  # noqa: E402

FLOAT_COLOR = "#1f4e79"
FEW_SWAPS = 10


def plot_reliability(curve: ReliabilityCurve, confidences: np.ndarray, title: str = "") -> Figure:
    """Figure 1: reliability diagram over the confidence histogram, sharing the confidence axis."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]}, constrained_layout=True)
    centers = (curve.edges[:-1] + curve.edges[1:]) / 2
    width = np.diff(curve.edges)
    filled = curve.counts > 0
    top.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    top.bar(centers[filled], curve.accuracy[filled], width=width[filled], color=FLOAT_COLOR,
            edgecolor="white", alpha=0.85, label="accuracy")
    top.bar(centers[filled], (curve.confidence - curve.accuracy)[filled], bottom=curve.accuracy[filled],
            width=width[filled], color="#d1495b", alpha=0.35, edgecolor="#d1495b", hatch="//",
            label="gap to confidence")
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1)
    top.set_title(title or "Reliability")
    top.text(0.03, 0.95, f"ECE = {100 * curve.ece:.2f}%  ({len(curve.edges) - 1} bins)",
             transform=top.transAxes, va="top")
    top.legend(loc="lower right", fontsize=8)
    bottom.hist(confidences, bins=curve.edges, color=FLOAT_COLOR, alpha=0.85, edgecolor="white")
    bottom.set_yscale("log")
    accuracy = np.sum(curve.accuracy[filled] * curve.counts[filled]) / curve.counts.sum()
    bottom.axvline(accuracy, color="k", ls="--", lw=1, label=f"accuracy {100 * accuracy:.1f}%")
    bottom.axvline(confidences.mean(), color="#d1495b", lw=1.5,
                   label=f"mean confidence {100 * confidences.mean():.1f}%")
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("# predictions (log)")
    bottom.set_xlim(0, 1)
    bottom.legend(loc="upper left", fontsize=8)
    return fig


def reliability_from_logits(logits: np.ndarray, labels: np.ndarray, title: str = "") -> Figure:
    probabilities = softmax(logits.astype(np.float64))
    confidences = probabilities.max(axis=1)
    curve = reliability_curve(confidences, probabilities.argmax(axis=1) == labels)
    return plot_reliability(curve, confidences, title)


@dataclass(frozen=True)
class SwapPanel:
    """What Figure 2 shows for one model, one entry per quantized configuration."""

    model: str
    configs: list[str]
    swapped_pct: list[float]
    delta_error_pp: list[float]
    ratio: list[float]
    swapped_confidences: list[np.ndarray]

    @classmethod
    def from_results(cls, model: str, results: Sequence[ConfigResult]) -> "SwapPanel":
        quantized = [r for r in results if r.change is not None]
        return cls(model, [r.name for r in quantized], [r.change.swapped_pct for r in quantized],
                   [r.change.delta_top1_error_pp for r in quantized], [r.change.ratio for r in quantized],
                   [r.change.swapped_confidences for r in quantized])


def plot_swap_panels(panels: Sequence[SwapPanel]) -> Figure:
    """Figure 2: per model (column), % swapped and delta error, their ratio, and the float
    confidence of the swapped predictions per precision."""
    fig, axes = plt.subplots(3, len(panels), figsize=(4.6 * len(panels), 9), squeeze=False,
                             constrained_layout=True)
    bins = np.linspace(0, 1, 16)
    for column, panel in enumerate(panels):
        x = np.arange(len(panel.configs))
        top, middle, bottom = axes[:, column]
        top.plot(x, panel.swapped_pct, "o-", color="#d1495b", label="% predictions swapped")
        top.plot(x, panel.delta_error_pp, "s-", color=FLOAT_COLOR, label="Δ top-1 error (pp)")
        top.axhline(0, color="0.6", lw=0.8)
        top.set_ylabel("% of evaluation set")
        top.set_title(panel.model)
        top.legend(fontsize=8)
        counts = np.array([len(c) for c in panel.swapped_confidences])
        ratio = np.array(panel.ratio, dtype=float)
        middle.plot(x, ratio, "-", color="#00798c")
        few = counts < FEW_SWAPS
        middle.plot(x[~few], ratio[~few], "o", color="#00798c")
        if few.any():
            middle.plot(x[few], ratio[few], "o", mfc="white", color="#00798c",
                        label=f"fewer than {FEW_SWAPS} swaps (noisy)")
            middle.legend(fontsize=8)
        middle.axhline(0, color="0.6", lw=0.8)
        middle.set_ylabel("Δ error / % swapped")
        for axis in (top, middle):
            axis.set_xticks(x, panel.configs)
            axis.set_xlabel("precision")
        colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(panel.configs), 1)))
        shown = FEW_SWAPS if counts.max(initial=0) >= FEW_SWAPS else 1  # hide histograms of a handful
        for name, confidences, color in zip(panel.configs, panel.swapped_confidences, colors):
            if len(confidences) >= shown:
                bottom.hist(confidences, bins=bins, histtype="step", lw=1.8, color=color,
                            weights=np.full(len(confidences), 100 / len(confidences)),
                            label=f"{name} ({len(confidences)} swapped)")
        bottom.set_xlabel("float model's confidence of swapped predictions")
        bottom.set_ylabel("% of that precision's swaps")
        bottom.set_xlim(0, 1)
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=8, loc="upper left")
        else:
            bottom.text(0.5, 0.5, "no prediction swapped", ha="center", transform=bottom.transAxes)
    return fig


def save_figure(fig: Figure, path) -> None:
    fig.savefig(path, dpi=130)
    plt.close(fig)
