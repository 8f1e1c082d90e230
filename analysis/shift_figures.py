"""Figures 11 and 12, under shift: what quantization changes as the corruption grows, and which
float confidences flip there. Built and drawn like the others (:mod:`.figures`): a data class
``from_run`` (the computation, from :mod:`.shift`), a ``plot_*`` function that draws into ``ax=``
or a new figure; fractions until drawn."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ptqcal.evaluate.metrics import changes_by_confidence
from ptqcal.evaluate.results import FLOAT_NAME

from .figures import FLOAT_COLOR, MIN_BIN, _axes, _colors, _legend, _percent, plain
from .under_shift import changes_at, corruptions, first_draw, pooled_change, severities

SHIFT_METRICS = (("swapped", "% predictions swapped"), ("delta_top1_error", "Δ top-1 error (pp)"), ("ece", "ECE (%)"))
COLUMNS_12 = 3  # Figure 12's panels a row
MAX_PANELS = 6  # Figure 12's panels per model: more quantized configurations are sampled evenly, first and last kept


def _level_ticks(axis: Axes, levels: Sequence[int]) -> None:
    axis.set_xticks(list(levels), ["clean" if s == 0 else str(s) for s in levels])


# --- Figure 11: under shift ------------------------------------------------------------------------

@dataclass(frozen=True)
class ShiftCurves:
    """Each configuration's % swapped, Δ error and ECE at clean (first draws) and at each severity of
    each corruption: ``values[metric]`` is (corruptions, configs, levels), NaN where a cell is
    missing or a metric undefined (the float model swaps nothing). ``configs``: float first."""

    model: str
    configs: list[str]
    levels: list[int]  # 0 (clean), then the run's severities
    corruptions: list[str]
    values: dict[str, np.ndarray]

    @classmethod
    def from_run(cls, run) -> "ShiftCurves | None":
        """``None`` for a run without corrupted images."""
        if not run.shift:
            return None
        present = {r.name for cell in run.shift for r in cell.configs}
        configs = [c for c in run.configs if c.name in present]
        levels, names = [0, *severities(run.shift)], corruptions(run.shift)
        values = {key: np.full((len(names), len(configs), len(levels)), np.nan) for key, _ in SHIFT_METRICS}
        for j, config in enumerate(configs):
            for key in values:
                clean = getattr(first_draw(config), key)
                values[key][:, j, 0] = np.nan if clean is None else clean
        for cell in run.shift:
            for j, config in enumerate(configs):
                result = cell.result(config.name)
                for key in values:
                    value = None if result is None else getattr(result.metrics, key)
                    values[key][names.index(cell.corruption), j, levels.index(cell.severity)] = \
                        np.nan if value is None else value
        return cls(run.name, [c.name for c in configs], levels, names, values)

    def summary(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, lowest and highest over corruptions of ``key``: (configs, levels) each."""
        values = self.values[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN line (float's swaps) is meant: not drawn
            return np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def _shift_panel(axis: Axes, curves: ShiftCurves, key: str, values: np.ndarray, band=None) -> None:
    """One metric against severity, a line per configuration (the float model dashed)."""
    colors = _colors(len(curves.configs) - 1)
    for j, name in enumerate(curves.configs):
        y = values[j]
        if np.isnan(y).all():
            continue
        float_model = name == FLOAT_NAME
        color = FLOAT_COLOR if float_model else colors[j - 1]
        axis.plot(curves.levels, _percent(y), "--" if float_model else "o-", ms=3, color=color, label=plain(name))
        if band is not None:
            axis.fill_between(curves.levels, _percent(band[0][j]), _percent(band[1][j]), color=color, alpha=0.15, lw=0)
    if key != "ece":
        axis.axhline(0, color="0.6", lw=0.8)
    _level_ticks(axis, curves.levels)


def plot_shift(curves: Sequence[ShiftCurves], ax: Sequence[Axes] | None = None) -> Figure:
    """Figure 11: per model three columns (% swapped, Δ error, ECE against severity); the first row
    the mean over corruptions with the lowest-to-highest corruption shaded, then a row per
    corruption. ``ax``: (1 + most corruptions) x (3 x len(curves)) axes."""
    rows = 1 + max(len(c.corruptions) for c in curves)
    fig, axes = _axes(ax, rows, 3 * len(curves), (3.3 * 3 * len(curves) + 1.6, 1.9 * rows + 0.8), sharex=True)
    for index, c in enumerate(curves):
        for m, (key, label) in enumerate(SHIFT_METRICS):
            column = axes[:, 3 * index + m]
            mean, low, high = c.summary(key)
            _shift_panel(column[0], c, key, mean, (low, high))
            column[0].set_ylabel(label)
            for r, name in enumerate(c.corruptions, start=1):
                _shift_panel(column[r], c, key, c.values[key][r - 1])
                if m == 0:
                    column[r].set_title(plain(name), loc="left")
            for axis in column[1 + len(c.corruptions):]:
                axis.set_visible(False)  # this model has fewer corruptions than another of the report
            column[len(c.corruptions)].set_xlabel("severity")
        axes[0, 3 * index].set_title(f"{plain(c.model)}: mean over {len(c.corruptions)} corruption"
                                     f"{'s' if len(c.corruptions) > 1 else ''} (band: lowest to highest)", loc="left")
        _legend(axes[0, 3 * index + 2])
    return fig


# --- Figure 12: which confidences flip under shift ------------------------------------------------

def panel_configs(names: Sequence[str], cap: int = MAX_PANELS) -> list[str]:
    """At most ``cap`` of ``names``, evenly spread, the first and last kept (all when few)."""
    if len(names) <= cap:
        return list(names)
    return [names[i] for i in sorted(set(np.linspace(0, len(names) - 1, cap).round().astype(int)))]


@dataclass(frozen=True)
class ShiftConfidence:
    """Swap rate by float-confidence bin, clean and pooled over the corruptions of each severity, for
    each drawn quantized configuration (``left_out``: those beyond :data:`MAX_PANELS`). ``rates``:
    per configuration, per level, a fraction per bin (NaN where fewer than ``MIN_BIN`` predictions)."""

    model: str
    configs: list[str]
    left_out: list[str]
    levels: list[int]
    edges: np.ndarray
    rates: list[list[np.ndarray]]

    @classmethod
    def from_run(cls, run) -> "ShiftConfidence | None":
        """``None`` without a quantized configuration under shift."""
        present = {r.name for cell in run.shift for r in cell.quantized}
        names = [c.name for c in run.quantized if c.name in present]
        if not names:
            return None
        drawn, levels = panel_configs(names), [0, *severities(run.shift)]
        rates, edges = [], np.linspace(0, 1, 11)
        for name in drawn:
            per_level = []
            for level in levels:
                change = pooled_change(changes_at(run.shift, run.quantized, [name], level))
                if change is None:  # not evaluated at this severity: no line
                    per_level.append(np.full(len(edges) - 1, np.nan))
                    continue
                bins = changes_by_confidence(change)
                edges = bins["edges"]
                per_level.append(np.where(bins["counts"] >= MIN_BIN, bins["swap_rate"], np.nan))
            rates.append(per_level)
        return cls(run.name, drawn, [n for n in names if n not in drawn], levels, edges, rates)


def plot_shift_confidence(panels: Sequence[ShiftConfidence], ax: Sequence[Axes] | None = None) -> Figure:
    """Figure 12: per model, a panel per quantized configuration (rows of :data:`COLUMNS_12`): % of
    each float-confidence bin swapped, clean (black) and at each severity (pooled over corruptions).
    ``ax``: (sum of each model's rows) x (at most COLUMNS_12) axes."""
    columns = min(COLUMNS_12, max(len(p.configs) for p in panels))
    heights = [math.ceil(len(p.configs) / columns) for p in panels]
    fig, axes = _axes(ax, sum(heights), columns, (3.4 * columns + 1.4, 2.8 * sum(heights)))
    for axis in axes.flat:
        axis.set_visible(False)  # each panel drawn below shows itself
    first = 0
    for panel, height in zip(panels, heights):
        centers = (panel.edges[:-1] + panel.edges[1:]) / 2
        shades = matplotlib.colormaps["plasma"](np.linspace(0.15, 0.85, max(len(panel.levels) - 1, 1)))
        for index, name in enumerate(panel.configs):
            axis = axes[first + index // columns, index % columns]
            axis.set_visible(True)
            for i, level in enumerate(panel.levels):
                color, label = ("k", "clean") if level == 0 else (shades[i - 1], f"severity {level}")
                axis.plot(centers, _percent(panel.rates[index][i]), "o-", ms=3, lw=1.4, color=color, label=label)
            axis.set_title(f"{plain(panel.model)}: {plain(name)}", loc="left")
            axis.set_xlim(0, 1)
            axis.set_xlabel("float confidence")
            if index % columns == 0:
                axis.set_ylabel("% of the bin swapped")
        _legend(axes[first, min(columns, len(panel.configs)) - 1])
        first += height
    return fig
