"""Figures 9 and 10, when to trust the quantized model: each configuration's risk-coverage curve,
and what each quantized configuration's float fallback guard catches for what it routes. Built and
drawn like the others (:mod:`.figures`): a data class ``from_run``, a ``plot_*`` function that
draws into ``ax=`` or a new figure; fractions until drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ptqcal.evaluate.guard import CONFIDENT, guard_curve
from ptqcal.evaluate.selective import confidence_score, risk_coverage

from .figures import FLOAT_COLOR, _axes, _colors, _legend, _percent, plain

SCORE_WORDS = {"msp": "max softmax probability", "margin": "top-1 − top-2 logit", "entropy": "minus the entropy"}


# --- Figure 9: risk against coverage -----------------------------------------------------------------

@dataclass(frozen=True)
class RiskCoverageCurves:
    """Every configuration's risk-coverage curve (float first), ranked by ``score``: at each
    distinct threshold, the share of predictions kept and their top-1 error (fractions)."""

    model: str
    configs: list[str]
    coverage: list[np.ndarray]
    risk: list[np.ndarray]
    area: list[float]  # AURC of each curve as drawn (the first calibration draw)
    float_error: float
    score: str = "msp"

    @classmethod
    def from_run(cls, run, score: str = "msp") -> "RiskCoverageCurves":
        curves = [risk_coverage(c.logits.argmax(axis=1) == run.labels, confidence_score(c.logits, score))
                  for c in run.configs]
        return cls(run.name, [c.name for c in run.configs], [c.coverage for c in curves], [c.risk for c in curves],
                   [c.area for c in curves], float(curves[0].risk[-1]), score)

    def error_free(self) -> float:
        """The coverage (fraction, a multiple of 0.1) below which no configuration's kept
        predictions hold an error: the figure starts there, where there is something to see."""
        first = min(float(np.concatenate([[0.0], c])[np.argmax(np.append(r, 1.0) > 0)])
                    for c, r in zip(self.coverage, self.risk))
        return max(0.0, np.floor(10 * first) / 10 - 0.1)


def plot_risk_coverage(curves: Sequence[RiskCoverageCurves], ax: Sequence[Axes] | None = None) -> Figure:
    """Risk (top-1 error of the kept predictions, %) against coverage (%), one step line per
    configuration, float dashed, float's error at full coverage dotted. ``ax``: len(curves) axes."""
    fig, axes = _axes(ax, 1, len(curves), (6.4 * len(curves), 4.2))
    for column, model in enumerate(curves):
        axis = axes[0, column]
        colors = [FLOAT_COLOR, *_colors(len(model.configs) - 1)]
        for index, name in enumerate(model.configs):
            # risk at coverage c is that of the first threshold keeping at least c: a step drawn before each point
            x, y = np.concatenate([[0.0], model.coverage[index]]), np.concatenate([[model.risk[index][0]],
                                                                                   model.risk[index]])
            axis.step(_percent(x), _percent(y), where="pre", color=colors[index], lw=2.0 if index == 0 else 1.3,
                      ls="--" if index == 0 else "-", label=f"{plain(name)} (AURC {100 * model.area[index]:.2f}%)",
                      zorder=3 if index == 0 else 2)
        axis.axhline(100 * model.float_error, color="0.45", ls=":", lw=1,
                     label=f"float's error at full coverage ({100 * model.float_error:.2f}%)")
        start = 100 * model.error_free()
        axis.set_xlim(start, 100)
        axis.set_ylim(bottom=0)
        if start:
            axis.text(0.03, 0.97, f"not shown below {start:.0f}%: there every\nconfiguration's kept predictions are correct",
                      transform=axis.transAxes, ha="left", va="top", fontsize=7.5, color="0.3")
        axis.set_xlabel(f"coverage: % of predictions kept, by {SCORE_WORDS[model.score]}")
        axis.set_ylabel("risk: top-1 error of those kept (%)")
        axis.set_title(f"{plain(model.model)}: risk against coverage", loc="left")
        _legend(axis)
    return fig


# --- Figure 10: what the guard catches for what it routes ---------------------------------------------

@dataclass(frozen=True)
class GuardCurves:
    """Per quantized configuration with a guard and a swap on the evaluation images: its guard
    curve under the chosen score on the evaluation images (fractions routed, of swaps caught and of
    confident swaps caught, NaN without one) and where the chosen threshold falls on it."""

    model: str
    configs: list[str]
    scores: list[str]
    routed: list[np.ndarray]
    swaps_caught: list[np.ndarray]
    confident_caught: list[np.ndarray]
    chosen: list[tuple[float, float, float]]  # (routed, swaps caught, confident swaps caught)
    swaps: list[int]
    confident_swaps: list[int]
    without_swaps: list[str]  # guarded configurations that swapped nothing: no curve to draw

    @classmethod
    def from_run(cls, run) -> "GuardCurves | None":
        """``None`` when no guarded configuration of ``run`` swapped a prediction."""
        drawn, without = [], []
        for config in run.quantized:
            if config.name in run.guards:
                (drawn if config.change.swapped.any() else without).append(config)
        if not drawn:
            return None
        guards = [run.guards[c.name][0] for c in drawn]
        curves = [guard_curve(c.logits, run.reference.logits, run.labels, g.score, CONFIDENT)
                  for c, g in zip(drawn, guards)]
        return cls(run.name, [c.name for c in drawn], [g.score for g in guards], [c.routed for c in curves],
                   [c.swaps_caught for c in curves], [c.confident_caught for c in curves],
                   [(g.evaluation.routed, g.evaluation.swaps_caught, g.evaluation.confident_caught) for g in guards],
                   [c.swaps for c in curves], [c.confident_swaps for c in curves], [c.name for c in without])

    def x_limit(self) -> float:
        """The routed share (fraction) the figure shows: up to where every curve has caught all it
        can catch, and past every chosen threshold."""
        ends = [r[np.argmax(np.nan_to_num(c, nan=1.0) >= 1.0)] for r, c in zip(self.routed, self.swaps_caught)]
        return float(min(1.0, 1.15 * max(*ends, *(1.5 * p[0] for p in self.chosen), 0.02)))


def _guard_panel(axis: Axes, curves: GuardCurves, values: list[np.ndarray], point: int, counts: list[int],
                 what: str) -> None:
    colors = _colors(len(curves.configs))
    limit = 100 * curves.x_limit()
    axis.plot([0, limit], [0, limit], color="0.6", ls="--", lw=1, label="routing at random")
    for index, name in enumerate(curves.configs):
        if not counts[index]:
            continue
        noun = what[:-1] if counts[index] == 1 else what
        axis.plot(_percent(curves.routed[index]), _percent(values[index]), color=colors[index], lw=1.4,
                  label=f"{plain(name)} ({curves.scores[index]}; {counts[index]} {noun})")
        axis.plot(100 * curves.chosen[index][0], 100 * curves.chosen[index][point], "o", ms=6, color=colors[index],
                  markeredgecolor="black", markeredgewidth=0.8, zorder=4)
    axis.plot([], [], "o", ms=6, color="white", markeredgecolor="black", label="chosen threshold")
    if not any(counts):
        axis.text(0.5, 0.5, f"no {what} to catch", transform=axis.transAxes, ha="center", va="center", color="0.3")
    axis.set_xlim(0, limit)
    axis.set_ylim(-2, 102)
    axis.set_xlabel("% of inputs routed to float (evaluation images)")
    axis.set_ylabel(f"% of {what} caught")
    _legend(axis)


def plot_guard_curves(curves: Sequence[GuardCurves], ax: Sequence[Axes] | None = None) -> Figure:
    """Per model, the share of swaps (left) and of confident swaps (right; left out when no
    configuration swapped a confident prediction) each guard catches against the share of inputs it
    routes to float, the chosen threshold a dot, random routing the diagonal. ``ax``: len(curves) x
    2 axes (x 1 without confident swaps)."""
    confident = any_confident(curves)
    fig, axes = _axes(ax, len(curves), 2 if confident else 1, (11.0 if confident else 6.2, 4.0 * len(curves)))
    for row, model in enumerate(curves):
        _guard_panel(axes[row, 0], model, model.swaps_caught, 1, model.swaps, "swaps")
        axes[row, 0].set_title(f"{plain(model.model)}: what the guard catches", loc="left")
        if confident:
            _guard_panel(axes[row, 1], model, model.confident_caught, 2, model.confident_swaps, "confident swaps")
            axes[row, 1].set_title(f"{plain(model.model)}: of predictions float held with ≥ "
                                   f"{100 * CONFIDENT:.0f}% confidence", loc="left")
    return fig


def any_confident(curves: Sequence[GuardCurves]) -> bool:
    """Whether any configuration swapped a prediction float held confidently (else Figure 10 has
    no right column)."""
    return any(n for model in curves for n in model.confident_swaps)
