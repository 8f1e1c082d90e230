"""The paper's figures 1 to 5 and the ones it leaves out, each plotted from computed results
(figures 6 to 8, what to ship, are in :mod:`.deploy_figures`).

Every figure has a small data class built ``from_run`` (the computation) and a ``plot_*``
function (the drawing), as scikit-learn's ``Display.from_predictions``: restyle or re-plot from
saved runs without recomputing. Each ``plot_*`` draws into the axes it is given (``ax=``) or into a
new figure, and returns the figure. Figures are drawn with matplotlib's object API, so nothing
here picks a backend or touches pyplot's global state.

The data classes hold fractions, like every result; percent is applied here, where it is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ptqcal.evaluate import ReliabilityCurve, reliability_of_logits
from ptqcal.evaluate.metrics import changes_by_confidence, swap_probability_by_margin

FLOAT_COLOR = "#1f4e79"
HIGHLIGHT_COLOR = "#c0392b"  # the configuration a figure singles out (the mixed-precision one)
QUANT_COLOR = "#d1495b"
FEW_SWAPS = 10
MIN_BIN = 5  # predictions a confidence bin needs before its swap rate is drawn
STYLE = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
         "font.size": 9, "axes.titlesize": 10, "legend.frameon": False}


def plain(text) -> str:
    """``text`` (a model, configuration or layer name) drawn as it is: every ``$`` escaped, so
    matplotlib never parses a name as mathtext."""
    return str(text).replace("$", r"\$")


def _colors(n: int) -> np.ndarray:
    return matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(n, 1)))


def _axes(ax, rows: int, columns: int, figsize: tuple[float, float], **kwargs) -> tuple[Figure, np.ndarray]:
    """The given axes as a (rows, columns) grid, or a new figure's (no pyplot: nothing global)."""
    if ax is not None:
        grid = np.asarray(ax, dtype=object).reshape(rows, columns)
        return grid[0, 0].figure, grid
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, np.asarray(fig.subplots(rows, columns, squeeze=False, **kwargs), dtype=object)


def _legend(axis: Axes) -> None:
    """A legend beside the axes, never over the data."""
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=7.5)


def _config_ticks(axis: Axes, x: np.ndarray, names: Sequence[str]) -> None:
    """One tick per configuration, slanted when there are too many, or too long, to stand side by side."""
    slanted = len(names) > 5 or sum(len(n) for n in names) > 32
    axis.set_xticks(x, [plain(n) for n in names], rotation=40 if slanted else 0, ha="right" if slanted else "center",
                    rotation_mode="anchor")


def _percent(values) -> np.ndarray:
    return 100 * np.asarray(values, dtype=float)


# --- Figure 1: reliability -----------------------------------------------------------------------

def plot_reliability(curve: ReliabilityCurve, confidences: np.ndarray, title: str = "",
                     overlay: tuple[str, ReliabilityCurve, np.ndarray] | None = None,
                     ax: Sequence[Axes] | None = None) -> Figure:
    """Reliability diagram (bars, with each bin's count) over the confidence histogram; an
    optional second configuration (e.g. the lowest precision) is drawn as a line on both.
    ``ax``: two axes (diagram, histogram) to draw into."""
    fig, grid = _axes(ax, 2, 1, (5.2, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top, bottom = grid[:, 0]
    centers = (curve.edges[:-1] + curve.edges[1:]) / 2
    width = np.diff(curve.edges)
    filled = curve.counts > 0
    top.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    top.bar(centers[filled], curve.accuracy[filled], width=width[filled], color=FLOAT_COLOR, edgecolor="white",
            alpha=0.85, label=f"float accuracy (ECE {100 * curve.ece:.2f}%)")
    top.bar(centers[filled], (curve.confidence - curve.accuracy)[filled], bottom=curve.accuracy[filled],
            width=width[filled], color=QUANT_COLOR, alpha=0.3, edgecolor=QUANT_COLOR, hatch="//",
            label="gap to mean confidence")
    _bin_counts(top, centers[filled], curve.accuracy[filled], curve.counts[filled])
    bottom.hist(confidences, bins=curve.edges, color=FLOAT_COLOR, alpha=0.85, edgecolor="white", label="float")
    if overlay is not None:
        name, other, other_conf = overlay
        ok = other.counts > 0
        other_centers = (other.edges[:-1] + other.edges[1:]) / 2
        top.plot(other_centers[ok], other.accuracy[ok], "o-", color=QUANT_COLOR, ms=3.5,
                 label=f"{plain(name)} accuracy (ECE {100 * other.ece:.2f}%)")
        bottom.hist(other_conf, bins=curve.edges, histtype="step", lw=1.6, color=QUANT_COLOR, label=plain(name))
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1.02)
    top.set_title(plain(title) if title else "Reliability", loc="left")
    _legend(top)
    bottom.set_yscale("log")
    accuracy = np.sum(curve.accuracy[filled] * curve.counts[filled]) / curve.counts.sum()
    bottom.axvline(accuracy, color="k", ls="--", lw=1, label=f"float accuracy {100 * accuracy:.1f}%")
    bottom.axvline(confidences.mean(), color=FLOAT_COLOR, lw=1.5,
                   label=f"float mean confidence {100 * confidences.mean():.1f}%")
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("# predictions (log)")
    bottom.set_xlim(0, 1)
    _legend(bottom)
    return fig


def _bin_counts(axis: Axes, x: np.ndarray, accuracy: np.ndarray, counts: np.ndarray) -> None:
    """Each bin's number of predictions, upright so neighbours never run into each other: inside
    the bar from its foot when the bar is tall enough to hold it, else just above it."""
    for x, y, n in zip(x, accuracy, counts):
        inside = y >= 0.06 + 0.025 * len(str(n))
        axis.text(x, 0.015 if inside else y + 0.015, str(n), rotation=90, ha="center", va="bottom", fontsize=6.5,
                  color="white" if inside else "0.25", zorder=4)


# --- Figure 2: swaps per precision ------------------------------------------------------------------

@dataclass(frozen=True)
class SwapPanel:
    """What Figure 2 shows for one model, one entry per quantized configuration."""

    model: str
    configs: list[str]
    swapped: list[float]  # fractions; the mean over calibration draws
    delta_error: list[float]
    ratio: list[float]
    swapped_confidences: list[np.ndarray]  # of the first draw
    swapped_std: list[float] | None = None  # spread over calibration draws
    delta_std: list[float] | None = None
    ratio_std: list[float] | None = None
    # which configurations are steps of the bit-width sweep (one weight and one activation width),
    # joined by a line; fp16 or a mixed model is a point of its own. None: every one is a step.
    uniform: list[bool] | None = None

    @classmethod
    def from_results(cls, model: str, results: Sequence, uniform: Sequence[bool] | None = None) -> "SwapPanel":
        """From :class:`~ptqcal.evaluate.ConfigResult` s (the float one is skipped); ``uniform``:
        one flag per quantized result (see the field)."""
        q = [r for r in results if r.change is not None]
        spread = bool(q) and all(c.spread is not None for c in q)

        def column(source, key):
            return [getattr(getattr(c, source), key) for c in q]

        return cls(model, [c.name for c in q], column("metrics", "swapped"), column("metrics", "delta_top1_error"),
                   column("metrics", "delta_error_per_swapped"), [c.change.swapped_confidences for c in q],
                   column("spread", "swapped") if spread else None,
                   column("spread", "delta_top1_error") if spread else None,
                   column("spread", "delta_error_per_swapped") if spread else None,
                   None if uniform is None else list(uniform))

    @classmethod
    def from_run(cls, run) -> "SwapPanel":
        return cls.from_results(run.name, run.configs, [run.descriptor(c.name).swept for c in run.quantized])


def _band(axis, x, values, std, color, scale: float = 1.0):
    if std is not None:
        values, std = scale * np.asarray(values, float), scale * np.asarray(std, float)
        axis.fill_between(x, values - std, values + std, color=color, alpha=0.2, lw=0)


def _part(values: Sequence[float] | None, keep: np.ndarray) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=float)[keep]


def _joined_points(axis: Axes, x: np.ndarray, y: np.ndarray, joined: np.ndarray, marker: str, color: str,
                   label: str) -> None:
    """Points at every ``x``; the line through the ``joined`` ones only."""
    y = np.asarray(y, dtype=float)
    axis.plot(x[joined], y[joined], f"{marker}-", color=color, label=label)
    axis.plot(x[~joined], y[~joined], marker, color=color)


def plot_swap_panels(panels: Sequence[SwapPanel], ax: Sequence[Axes] | None = None) -> Figure:
    """Figure 2, one column per model: % swapped and Δ error per precision; their ratio; and the
    float confidence of the swapped predictions (first calibration draw). Bands: ± one std over
    calibration draws. ``ax``: 3 x len(panels) axes to draw into."""
    fig, axes = _axes(ax, 3, len(panels), (4.6 * len(panels), 9))
    bins = np.linspace(0, 1, 16)
    for column, panel in enumerate(panels):
        x = np.arange(len(panel.configs))
        # the line joins the uniform precisions only: fp16 and a mixed model are points of their own
        joined = np.ones(len(panel.configs), dtype=bool) if panel.uniform is None else \
            np.array(panel.uniform, dtype=bool)
        top, middle, bottom = axes[:, column]
        _joined_points(top, x, _percent(panel.swapped), joined, "o", QUANT_COLOR, "% predictions swapped")
        _band(top, x[joined], np.asarray(panel.swapped)[joined], _part(panel.swapped_std, joined), QUANT_COLOR, 100)
        _joined_points(top, x, _percent(panel.delta_error), joined, "s", FLOAT_COLOR, "Δ top-1 error (pp)")
        _band(top, x[joined], np.asarray(panel.delta_error)[joined], _part(panel.delta_std, joined), FLOAT_COLOR, 100)
        top.axhline(0, color="0.6", lw=0.8)
        top.set_ylabel("% of evaluation set")
        top.set_title(plain(panel.model), loc="left")
        _legend(top)
        counts = np.array([len(c) for c in panel.swapped_confidences])
        ratio = np.array(panel.ratio, dtype=float)
        middle.plot(x[joined], ratio[joined], "-", color="#00798c")
        _band(middle, x[joined], ratio[joined], _part(panel.ratio_std, joined), "#00798c")
        few = counts < FEW_SWAPS
        middle.plot(x[~few], ratio[~few], "o", color="#00798c")
        if few.any():
            middle.plot(x[few], ratio[few], "o", mfc="white", color="#00798c",
                        label=f"fewer than {FEW_SWAPS} swaps (noisy)")
            _legend(middle)
        middle.axhline(0, color="0.6", lw=0.8)
        middle.set_ylabel("Δ error / % swapped")
        for axis in (top, middle):
            _config_ticks(axis, x, panel.configs)
            axis.set_xlabel("precision")
        shown = FEW_SWAPS if counts.max(initial=0) >= FEW_SWAPS else 1  # hide histograms of a handful
        for name, confidences, color in zip(panel.configs, panel.swapped_confidences, _colors(len(panel.configs))):
            if len(confidences) >= shown:
                bottom.hist(confidences, bins=bins, histtype="step", lw=1.8, color=color,
                            weights=np.full(len(confidences), 100 / len(confidences)),
                            label=f"{plain(name)} ({len(confidences)} swapped)")
        bottom.set_xlabel("float model's confidence of swapped predictions"
                          + (" (first calibration draw)" if panel.swapped_std is not None else ""))
        bottom.set_ylabel("% of that precision's swaps")
        bottom.set_xlim(0, 1)
        if bottom.get_legend_handles_labels()[0]:
            _legend(bottom)
        else:
            bottom.text(0.5, 0.5, "no prediction swapped", ha="center", transform=bottom.transAxes)
    return fig


# --- Figure 3: transitions ---------------------------------------------------------------------

TRANSITIONS = (("correct_to_wrong", "correct → wrong", QUANT_COLOR),
               ("wrong_to_correct", "wrong → correct", "#66a182"),
               ("wrong_to_other_wrong", "wrong → other wrong", "#edae49"))


@dataclass(frozen=True)
class TransitionTable:
    model: str
    configs: list[str]
    shares: dict[str, list[float]]  # transition -> fraction of the evaluation set per config

    @classmethod
    def from_run(cls, run) -> "TransitionTable":
        q = run.quantized
        return cls(run.name, [c.name for c in q], {key: [getattr(c.metrics, key) for c in q]
                                                     for key, _, _ in TRANSITIONS})


def plot_transitions(tables: Sequence[TransitionTable], ax: Sequence[Axes] | None = None) -> Figure:
    """Swapped predictions by what happened to them, stacked per precision (they sum to % swapped).
    ``ax``: one axis per table to draw into."""
    fig, axes = _axes(ax, 1, len(tables), (4.6 * len(tables), 3.6))
    for axis, table in zip(axes[0], tables):
        x = np.arange(len(table.configs))
        bottom = np.zeros(len(x))
        for key, label, color in TRANSITIONS:
            values = _percent(table.shares[key])
            axis.bar(x, values, bottom=bottom, color=color, label=label, width=0.7)
            bottom += values
        _config_ticks(axis, x, table.configs)
        axis.set_xlabel("precision")
        axis.set_ylabel("% of evaluation set")
        axis.set_title(f"{plain(table.model)}: what the swaps were", loc="left")
        _legend(axis)
    return fig


# --- Figure 4: swap probability vs margin ----------------------------------------------------------

@dataclass(frozen=True)
class MarginCurves:
    """Which predictions swap: by the float logit margin and by the float confidence."""

    model: str
    configs: list[str]
    centers: list[np.ndarray]  # float logit margin at the middle of each equal-mass bin
    probability: list[np.ndarray]
    confidence_edges: np.ndarray
    swap_rate: list[np.ndarray]  # fraction of each float-confidence bin
    delta_error: list[np.ndarray]

    @classmethod
    def from_run(cls, run, n_bins: int | None = None) -> "MarginCurves":
        # up to 20 equal-mass bins, each of at least 50 predictions
        n_bins = n_bins or min(20, max(2, len(run.labels) // 50))
        curves = [swap_probability_by_margin(c.change, n_bins) for c in run.quantized]
        by_confidence = [changes_by_confidence(c.change) for c in run.quantized]
        return cls(run.name, [c.name for c in run.quantized], [_margin_centers(c["edges"]) for c in curves],
                   [c["swap_probability"] for c in curves], by_confidence[0]["edges"],
                   [np.where(b["counts"] >= MIN_BIN, b["swap_rate"], np.nan) for b in by_confidence],
                   [b["delta_error"] for b in by_confidence])


def _margin_centers(edges: np.ndarray) -> np.ndarray:
    """The geometric middle of each margin bin (drawn on a log axis); one bin at the margin every
    prediction shares when there is a single edge (every image the same)."""
    edges = np.maximum(np.asarray(edges, dtype=float), 1e-3)
    return edges[:1] if len(edges) < 2 else np.sqrt(edges[:-1] * edges[1:])


def plot_margin(curves: Sequence[MarginCurves], ax: Sequence[Axes] | None = None) -> Figure:
    """Top: how likely a prediction is to swap, by the float model's top-1 minus top-2 logit.
    Bottom: the swap rate per float-confidence bin. ``ax``: 2 x len(curves) axes."""
    fig, axes = _axes(ax, 2, len(curves), (4.6 * len(curves), 6.6))
    for column, curve in enumerate(curves):
        top, bottom = axes[:, column]
        colors = _colors(len(curve.configs))
        centers = (curve.confidence_edges[:-1] + curve.confidence_edges[1:]) / 2
        for index, (name, color) in enumerate(zip(curve.configs, colors)):
            top.plot(curve.centers[index], curve.probability[index], "o-", ms=3, color=color, label=plain(name))
            bottom.plot(centers, _percent(curve.swap_rate[index]), "o-", ms=3, color=color, label=plain(name))
        top.set_xscale("log")
        top.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        top.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        bins = len(curve.centers[0]) if curve.centers else 0
        top.set_xlabel("float logit margin (top-1 − top-2), " + (f"{bins} equal-mass bins" if bins > 1 else
                                                                 "one bin: every prediction has the same margin"))
        top.set_ylabel("P(prediction swapped)")
        top.set_ylim(-0.02, 1.02)
        top.set_title(plain(curve.model), loc="left")
        _legend(top)
        bottom.set_xlabel(f"float confidence (10 equal-width bins; bins of fewer than {MIN_BIN} left out)")
        bottom.set_ylabel("% of the bin's predictions swapped")
        bottom.set_xlim(0, 1)
    return fig


# --- Figure 5: temperature scaling ------------------------------------------------------------------

@dataclass(frozen=True)
class TemperatureEffect:
    model: str
    temperature: float
    configs: list[str]
    ece: list[float]  # fractions
    ece_scaled: list[float]
    swapped_name: str
    swapped_confidence: np.ndarray  # float confidence of that config's swaps, before scaling
    swapped_confidence_scaled: np.ndarray

    @classmethod
    def from_run(cls, run, swapped_by: str | None = None) -> "TemperatureEffect | None":
        """``swapped_by``: the configuration whose swaps the bottom panel follows (the report's
        choice is Figure 1's, the lowest precision that did not collapse); ``None``: the one that
        swapped most; a name of none of them: no panel. ``None`` without a fitted temperature or a
        quantized configuration."""
        if run.temperature is None or not run.quantized:
            return None
        chosen = max(run.quantized, key=lambda c: c.change.swapped.sum()) if swapped_by is None else \
            next((c for c in run.quantized if c.name == swapped_by), None)
        _, scaled = reliability_of_logits(run.reference.logits, run.labels, run.temperatures)
        if chosen is None:  # no precision to follow (each one collapsed)
            name, before, after = "", np.zeros(0), np.zeros(0)
        else:
            name, before, after = chosen.name, chosen.change.swapped_confidences, scaled[chosen.change.swapped]
        return cls(run.name, run.temperature, [c.name for c in run.configs], [c.metrics.ece for c in run.configs],
                   [c.metrics.ece_temperature for c in run.configs], name, before, after)


def plot_temperature(effects: Sequence[TemperatureEffect], ax: Sequence[Axes] | None = None) -> Figure:
    """ECE before and after the float model's temperature, and where the swapped predictions'
    confidences move (the swaps themselves do not change). ``ax``: 2 x len(effects) axes."""
    fig, axes = _axes(ax, 2, len(effects), (5.4 * len(effects), 6.4))
    for column, effect in enumerate(effects):
        top, bottom = axes[:, column]
        x = np.arange(len(effect.configs))
        top.bar(x - 0.2, _percent(effect.ece), 0.4, color=QUANT_COLOR, label="as is")
        top.bar(x + 0.2, _percent(effect.ece_scaled), 0.4, color="#66a182",
                label=f"cross-fitted temperature ≈ {effect.temperature:.2f}")
        _config_ticks(top, x, effect.configs)
        top.set_ylabel("ECE (%)")
        top.set_title(f"{plain(effect.model)}: temperature scaling", loc="left")
        _legend(top)
        _temperature_swaps(bottom, effect)
    return fig


def _temperature_swaps(axis: Axes, effect: TemperatureEffect) -> None:
    """Where the confidences of one configuration's swapped predictions move under the temperature."""
    bins = np.linspace(0, 1, 16)
    count = len(effect.swapped_confidence)
    if count:
        axis.hist(effect.swapped_confidence, bins=bins, histtype="step", lw=1.8, color=QUANT_COLOR,
                  label="float confidence")
        axis.hist(effect.swapped_confidence_scaled, bins=bins, histtype="step", lw=1.8, color="#66a182",
                  label=f"after temperature {effect.temperature:.2f}")
        _legend(axis)
    else:
        axis.text(0.5, 0.5, f"{plain(effect.swapped_name)} swapped no prediction" if effect.swapped_name else
                  "no precision to follow", ha="center", va="center", transform=axis.transAxes, color="0.3")
    axis.set_xlabel(f"confidence of the {count} prediction{'' if count == 1 else 's'} {plain(effect.swapped_name)} "
                    "swapped" if effect.swapped_name else "confidence of swapped predictions", loc="left")
    axis.set_ylabel("# predictions")
    axis.set_xlim(0, 1)


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Write ``path`` (PNG) and the same figure as SVG beside it."""
    path = Path(path)
    written = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(written[0], dpi=130)
    fig.savefig(written[1])
    return written
