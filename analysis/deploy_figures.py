"""Figures 6 to 8, what to ship: each configuration's size and speed against its swaps, the
layers that flip confident predictions, and the size each configuration pays for its swaps.
Built and drawn like the others (:mod:`.figures`): a data class ``from_run``, a ``plot_*``
function that draws into ``ax=`` or a new figure; fractions until drawn.

Figures 6 and 8 draw every configuration (float, ptqcal's own, the user's graphs, peer
toolchains') with one marker and colour per configuration, named in a legend; configurations that
land on one spot are set side by side (a few points apart) rather than on top of each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy

from .figures import FLOAT_COLOR, HIGHLIGHT_COLOR, _axes, _colors, _legend, _percent, plain

UNIFORM_MARKERS = ("s", "^", "v", "<", ">", "p", "d", "H")
OTHER_COLORS = ("#e67e22", "#8e44ad", "#16a085", "#b7950b", "#7f8c8d")  # the user's graphs and peers
KIND_MARKERS = {"float": "o", "mixed": "*", "external": "D", "peer": "X"}
KIND_WORDS = {"external": "yours", "peer": "peer"}


@dataclass(frozen=True)
class PointStyle:
    color: str
    marker: str
    label: str
    size: float


def point_styles(configs: Sequence[str], kinds: Sequence[str] | None = None) -> list[PointStyle]:
    """One style per configuration: float a blue circle, the uniform precisions (and fp16) shades
    of viridis with their own markers, the mixed one a red star, the user's graphs diamonds and
    peers crosses in colours of their own, labelled as such. ``kinds``: :class:`ConfigKind` values
    (``None``: float first, every other uniform)."""
    kinds = [str(k) for k in kinds] if kinds is not None else ["float"] + ["uniform"] * (len(configs) - 1)
    shades = iter(_colors(sum(k in ("uniform", "fp16") for k in kinds)))
    others = iter(OTHER_COLORS * len(configs))
    styles = []
    for index, (name, kind) in enumerate(zip(configs, kinds)):
        label = plain(name) + (f" ({KIND_WORDS[kind]})" if kind in KIND_WORDS else "")
        if kind in ("uniform", "fp16"):
            styles.append(PointStyle(next(shades), UNIFORM_MARKERS[index % len(UNIFORM_MARKERS)], label, 45))
        else:
            color = FLOAT_COLOR if kind == "float" else HIGHLIGHT_COLOR if kind == "mixed" else next(others)
            styles.append(PointStyle(color, KIND_MARKERS.get(kind, "o"), label, 150 if kind == "mixed" else 50))
    return styles


def side_by_side(x: np.ndarray, y: np.ndarray, sizes: Sequence[float] | None = None,
                 tolerance: float = 0.03) -> np.ndarray:
    """Horizontal offsets (points) that set configurations on one spot (within ``tolerance`` of
    each axis's span) side by side, centred on it, each as wide as its marker (``sizes``: marker
    areas in points², as ``scatter``'s ``s``); 0 for a configuration alone."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    widths = np.sqrt(np.full(len(x), 45.0) if sizes is None else np.asarray(sizes, dtype=float)) + 1.5
    finite = np.isfinite(x) & np.isfinite(y)
    span = [max(np.ptp(np.append(v[finite], 0.0)), 1e-12) for v in (x, y)]
    groups: list[list[int]] = []
    for i in np.flatnonzero(finite):
        group = next((g for g in groups if abs(x[g[0]] - x[i]) <= tolerance * span[0]
                      and abs(y[g[0]] - y[i]) <= tolerance * span[1]), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    offsets = np.zeros(len(x))
    for group in groups:
        ends = np.cumsum(widths[group])
        offsets[group] = ends - widths[group] / 2 - ends[-1] / 2
    return offsets


def _scatter(axis: Axes, x: np.ndarray, y: np.ndarray, styles: Sequence[PointStyle]) -> None:
    """One marker per configuration, those on one spot side by side."""
    for index, (dx, style) in enumerate(zip(side_by_side(x, y, [s.size for s in styles]), styles)):
        if np.isfinite(x[index]) and np.isfinite(y[index]):
            where = offset_copy(axis.transData, fig=axis.figure, x=dx, y=0, units="points") if dx else axis.transData
            axis.scatter(x[index], y[index], color=style.color, marker=style.marker, s=style.size, zorder=3,
                         edgecolor="white", linewidth=0.5, transform=where)


def _style_legend(axis: Axes, styles: Sequence[PointStyle], extra: Sequence = ()) -> None:
    handles = [*extra, *(Line2D([], [], ls="", marker=s.marker, color=s.color, ms=np.sqrt(s.size), label=s.label)
                         for s in styles)]
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=7.5)


# --- Figure 6: what to ship ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DeploymentPoints:
    """Every configuration with size numbers (float first): its kind, the share of predictions it
    swapped and of the float model's confident ones (fractions; 0 for float, NaN without a
    confident prediction), its weight bytes and its throughput (``None``: not timed)."""

    model: str
    configs: list[str]
    kinds: list[str]
    swapped: list[float]
    confident_swapped: list[float]
    weight_bytes: list[int]
    throughput: list[float | None]
    confident: float = 0.9  # the float confidence a prediction needs to count as confident

    @classmethod
    def from_run(cls, run, confident: float = 0.9) -> "DeploymentPoints | None":
        """``None`` when the run timed no configuration."""
        numbers = run.record.deployment
        configs = [c for c in run.configs if c.name in numbers]
        if not any(numbers[c.name].throughput is not None for c in configs):
            return None
        return cls(run.name, [c.name for c in configs], [str(run.descriptor(c.name).kind) for c in configs],
                   [0.0 if c.change is None else c.metrics.swapped for c in configs],
                   [confident_share(c, confident) for c in configs], [numbers[c.name].weight_bytes for c in configs],
                   [numbers[c.name].throughput for c in configs], confident)


    def confident_note(self) -> str:
        """What the confident-swap panels show when there is nothing in them."""
        shares = np.array([v for v, k in zip(self.confident_swapped, self.kinds) if k != "float"], dtype=float)
        if not np.isfinite(shares).any():
            return "the float model held no\nprediction this confidently"
        return "" if np.nanmax(shares) > 0 else "no configuration swapped\none of these predictions"


def confident_share(config, confident: float) -> float:
    """The share of the float model's predictions held with at least ``confident`` that
    ``config`` swapped (0 for float; NaN when the float model held none)."""
    if config.change is None:
        return 0.0
    flipped, held = config.change.confident_swaps(confident)
    return flipped / held if held else float("nan")


def plot_deployment(points: Sequence[DeploymentPoints], ax: Sequence[Axes] | None = None) -> Figure:
    """Per model, weight megabytes (top) and images/s (bottom) against % of predictions swapped
    (left) and % of confident ones swapped (right), one marker per configuration, named in the
    legend. ``ax``: 2·len(points) x 2 axes."""
    fig, axes = _axes(ax, 2 * len(points), 2, (10.0, 6.4 * len(points)))
    for block, model in enumerate(points):
        styles = point_styles(model.configs, model.kinds)
        rows = axes[2 * block: 2 * block + 2]
        if ax is None:  # one x axis per column of a model's block
            rows[1, 0].sharex(rows[0, 0])
            rows[1, 1].sharex(rows[0, 1])
        speed = np.array([np.nan if t is None else t for t in model.throughput], dtype=float)
        sides = (np.asarray(model.weight_bytes) / 1e6, "weights (MB)"), (speed, "images/s on this machine")
        confident = f"% of confident (≥ {100 * model.confident:.0f}%) float predictions swapped"
        for column, (swaps, words) in enumerate(((model.swapped, "% of predictions swapped"),
                                                 (model.confident_swapped, confident))):
            x = _percent(swaps)
            for row, (values, label) in enumerate(sides):
                axis = rows[row, column]
                _scatter(axis, x, values, styles)
                axis.set_ylabel(label if column == 0 else "")
                axis.set_ylim(bottom=0)
                if column:
                    axis.text(0.5, 0.5, model.confident_note(), transform=axis.transAxes, ha="center",
                              va="center", color="0.3")
            rows[1, column].set_xlabel(words)
            top = max(np.nanmax(x, initial=0.0), 0.1)  # nothing swapped: 0 to 0.1%, never below 0
            for axis in rows[:, column]:
                axis.set_xlim(-0.05 * top, 1.08 * top)
        rows[0, 0].set_title(f"{plain(model.model)}: size and speed against swaps", loc="left")
        _style_legend(rows[0, 1], styles)
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

    @property
    def flips(self) -> bool:
        """Whether any layer, quantized alone, swapped a confident prediction (else the map is
        blank: the report says so in a sentence instead of drawing it)."""
        return bool(np.nan_to_num(self.confident_swapped).max(initial=0.0) > 0)


def plot_layers(maps: Sequence[LayerMap], ax: Sequence[Axes] | None = None) -> Figure:
    """Left: layers x bit widths coloured by the % of confident predictions that swap; right: the
    SQNR of each layer's output per bit width. ``ax``: len(maps) x 2 axes (left, right per row)."""
    height = max(3.0, 0.22 * max(len(m.layers) for m in maps) + 1.5)
    fig, axes = _axes(ax, len(maps), 2, (10.0, height * len(maps)))
    for row, layer_map in enumerate(maps):
        left, right = axes[row]
        image = left.imshow(_percent(layer_map.confident_swapped), aspect="auto", cmap="magma_r", vmin=0)
        left.set_xticks(range(len(layer_map.bits)), [f"w{b}" for b in layer_map.bits])
        left.set_yticks(range(len(layer_map.layers)), [plain(n) for n in layer_map.layers], fontsize=7)
        left.grid(False)
        left.set_title(f"{plain(layer_map.model)}: % confident predictions swapped", loc="left")
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
    kinds: list[str] | None = None  # ConfigKind values; None: float first, every other uniform

    @classmethod
    def from_run(cls, run, confident: float, highlight: str | None = None) -> "ParetoPoints":
        numbers = run.record.deployment
        configs = [c for c in run.configs if c.name in numbers]
        return cls(run.name, [c.name for c in configs], [numbers[c.name].weight_bytes for c in configs],
                   [confident_share(c, confident) for c in configs],
                   [0.0 if c.change is None else c.metrics.delta_top1_error for c in configs], highlight,
                   [str(run.descriptor(c.name).kind) for c in configs])

    def styles(self) -> list[PointStyle]:
        """Figure 6's styles; the highlighted configuration a star whatever its kind."""
        kinds = list(self.kinds) if self.kinds else ["float"] + ["uniform"] * (len(self.configs) - 1)
        kinds = ["mixed" if name == self.highlight else kind for name, kind in zip(self.configs, kinds)]
        return point_styles(self.configs, kinds)

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
    the Pareto front as a step line, one marker per configuration named in the legend, the
    highlighted configuration a star. ``ax``: len(points) x 2."""
    fig, axes = _axes(ax, len(points), 2, (10.0, 3.8 * len(points)))
    for row, model in enumerate(points):
        megabytes, styles = np.asarray(model.weight_bytes) / 1e6, model.styles()
        for axis, values, label in ((axes[row, 0], model.confident_swapped, "% of confident predictions swapped"),
                                    (axes[row, 1], model.delta_error, "Δ top-1 error (pp)")):
            y = _percent(values)
            front = model.front(np.nan_to_num(values, nan=np.inf))
            axis.step(megabytes[front], y[front], where="post", color="0.6", lw=1, zorder=1)
            _scatter(axis, megabytes, y, styles)
            finite = y[np.isfinite(y)]
            low, high = min(0.0, finite.min(initial=0.0)), max(1.0, finite.max(initial=0.0))
            axis.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low))
            axis.set_xlabel("weights (MB)")
            axis.set_ylabel(label)
            axis.set_xlim(left=0)
        axes[row, 0].set_title(f"{plain(model.model)}: size against confident swaps and error", loc="left")
        _style_legend(axes[row, 1], styles, [Line2D([], [], color="0.6", lw=1, label="Pareto front")])
    return fig
