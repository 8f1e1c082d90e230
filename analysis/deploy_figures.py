"""Figures 6 to 8, what to ship: each configuration's size and speed against its swaps, the
layers that flip confident predictions, and the size each configuration pays for its swaps.
Built and drawn like the others (:mod:`.figures`): a data class ``from_run``, a ``plot_*``
function that draws into ``ax=`` or a new figure; fractions until drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .figures import FLOAT_COLOR, HIGHLIGHT_COLOR, _axes, _colors, _legend, _percent


# --- Figure 6: what to ship ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DeploymentPoints:
    """Every configuration's swap rate (fraction; 0 for float), weight bytes and throughput."""

    model: str
    configs: list[str]
    swapped: list[float]
    weight_bytes: list[int]
    throughput: list[float]

    @classmethod
    def from_run(cls, run) -> "DeploymentPoints | None":
        """``None`` when the run did not time every configuration."""
        numbers = run.record.deployment
        configs = [c for c in run.configs if c.name in numbers]
        if not configs or any(numbers[c.name].throughput is None for c in configs):
            return None
        return cls(run.name, [c.name for c in configs],
                   [0.0 if c.change is None else c.metrics.swapped for c in configs],
                   [numbers[c.name].weight_bytes for c in configs], [numbers[c.name].throughput for c in configs])


def plot_deployment(points: Sequence[DeploymentPoints], ax: Sequence[Axes] | None = None) -> Figure:
    """Weight megabytes (top) and images/s (bottom) against % swapped, one marker per configuration
    (named in the legend: int8-container configurations often share a size). ``ax``: 2 x len(points) axes."""
    fig, axes = _axes(ax, 2, len(points), (5.4 * len(points), 6.4))
    for column, model in enumerate(points):
        top, bottom = axes[:, column]
        x = _percent(model.swapped)
        colors = [FLOAT_COLOR, *_colors(len(x) - 1)]
        markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
        for axis, values, label in ((top, np.asarray(model.weight_bytes) / 1e6, "weights (MB)"),
                                    (bottom, np.asarray(model.throughput), "images/s on this machine")):
            for index, name in enumerate(model.configs):
                axis.scatter(x[index], values[index], color=colors[index], marker=markers[index % len(markers)],
                             s=45, zorder=3, label=name)
            axis.set_ylabel(label)
            axis.set_ylim(bottom=0)
        top.set_title(f"{model.model}: size and speed against swaps")
        bottom.set_xlabel("% of predictions swapped")
        _legend(top)
    return fig


# --- Figure 7: which layers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerMap:
    """Per weight layer (graph order) and bit width: the confident-swap rate and the SQNR."""

    model: str
    layers: list[str]
    bits: list[int]
    confident_swapped: np.ndarray  # (layers, bits) fractions, NaN where no prediction was confident
    sqnr_db: np.ndarray  # (layers, bits)

    @classmethod
    def from_run(cls, run) -> "LayerMap":
        effects = run.record.attribution.effects
        layers = list(dict.fromkeys(e.layer for e in effects))
        bits = sorted({e.weight_bits for e in effects}, reverse=True)
        swapped, sqnr = np.full((len(layers), len(bits)), np.nan), np.full((len(layers), len(bits)), np.nan)
        for e in effects:
            swapped[layers.index(e.layer), bits.index(e.weight_bits)] = e.confident_swapped
            sqnr[layers.index(e.layer), bits.index(e.weight_bits)] = e.sqnr_db
        return cls(run.name, layers, bits, swapped, sqnr)


def plot_layers(maps: Sequence[LayerMap], ax: Sequence[Axes] | None = None) -> Figure:
    """Left: layers x bit widths coloured by the % of confident predictions that swap; right: the
    SQNR of each layer's output per bit width. ``ax``: len(maps) x 2 axes (left, right per row)."""
    height = max(3.0, 0.22 * max(len(m.layers) for m in maps) + 1.5)
    fig, axes = _axes(ax, len(maps), 2, (10.0, height * len(maps)))
    for row, layer_map in enumerate(maps):
        left, right = axes[row]
        image = left.imshow(_percent(layer_map.confident_swapped), aspect="auto", cmap="magma_r", vmin=0)
        left.set_xticks(range(len(layer_map.bits)), [f"w{b}" for b in layer_map.bits])
        left.set_yticks(range(len(layer_map.layers)), layer_map.layers, fontsize=7)
        left.grid(False)
        left.set_title(f"{layer_map.model}: % confident predictions swapped")
        fig.colorbar(image, ax=left, shrink=0.8)
        y = np.arange(len(layer_map.layers))
        for column, (bits, color) in enumerate(zip(layer_map.bits, _colors(len(layer_map.bits)))):
            right.plot(layer_map.sqnr_db[:, column], y, marker="o", ms=3, color=color, label=f"w{bits}")
        right.set_yticks(y, [])
        right.set_ylim(len(y) - 0.5, -0.5)
        right.set_xlabel("SQNR of the layer's output (dB)")
        _legend(right)
    return fig


# --- Figure 8: the size each configuration pays for its swaps ----------------------------------------

@dataclass(frozen=True)
class ParetoPoints:
    """Per configuration (float first): weight bytes, the share of the float model's confident
    predictions it swapped, and its change in top-1 error (fractions)."""

    model: str
    configs: list[str]
    weight_bytes: list[int]
    confident_swapped: list[float]
    delta_error: list[float]
    highlight: str | None = None  # drawn apart (the mixed-precision configuration)

    @classmethod
    def from_run(cls, run, confident: float, highlight: str | None = None) -> "ParetoPoints":
        numbers = run.record.deployment
        configs = [c for c in run.configs if c.name in numbers]

        def share(config) -> float:
            if config.change is None:
                return 0.0
            flipped, held = config.change.confident_swaps(confident)
            return flipped / held if held else float("nan")

        return cls(run.name, [c.name for c in configs], [numbers[c.name].weight_bytes for c in configs],
                   [share(c) for c in configs],
                   [0.0 if c.change is None else c.metrics.delta_top1_error for c in configs], highlight)

    def front(self, values: Sequence[float]) -> list[int]:
        """Indices of the configurations no other beats on both weight bytes and ``values``, by size."""
        order = sorted(range(len(self.configs)), key=lambda i: (self.weight_bytes[i], values[i]))
        kept, best = [], np.inf
        for i in order:
            if values[i] < best:
                kept.append(i)
                best = values[i]
        return kept


def plot_pareto(points: Sequence[ParetoPoints], ax: Sequence[Axes] | None = None) -> Figure:
    """Weight megabytes against % of confident predictions swapped (left) and Δ top-1 error (right),
    the Pareto front as a step line, the highlighted configuration as a star. ``ax``: len(points) x 2."""
    fig, axes = _axes(ax, len(points), 2, (10.0, 3.8 * len(points)))
    for row, model in enumerate(points):
        megabytes = np.asarray(model.weight_bytes) / 1e6
        for axis, values, label in ((axes[row, 0], model.confident_swapped, "% of confident predictions swapped"),
                                    (axes[row, 1], model.delta_error, "Δ top-1 error (pp)")):
            y = _percent(values)
            front = model.front(np.nan_to_num(values, nan=np.inf))
            axis.step(megabytes[front], y[front], where="post", color="0.6", lw=1, zorder=1, label="Pareto front")
            labels: dict[tuple[float, float], list[str]] = {}  # configurations at one point share a label
            for index, name in enumerate(model.configs):
                star = name == model.highlight
                axis.scatter(megabytes[index], y[index], s=140 if star else 40, marker="*" if star else "o",
                             color=HIGHLIGHT_COLOR if star else FLOAT_COLOR if index == 0 else "0.35", zorder=3)
                labels.setdefault((megabytes[index], y[index]), []).append(name)
            for (x, value), names in labels.items():
                axis.annotate(" = ".join(names), (x, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
            finite = y[np.isfinite(y)]
            low, high = min(0.0, finite.min(initial=0.0)), max(1.0, finite.max(initial=0.0))
            axis.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low))
            axis.set_xlabel("weights (MB)")
            axis.set_ylabel(label)
            axis.set_xlim(left=0)
        axes[row, 0].set_title(f"{model.model}: size against confident swaps and error")
        _legend(axes[row, 0])
    return fig
