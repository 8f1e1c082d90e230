"""The report's section "Under shift": per-severity tables of what quantization changed on corrupted
images, the sentence that tests the paper's claim there, the float fallback guard judged per
corruption, and calibration on corrupted images against calibration on clean ones. Numbers are
computed in :mod:`.shift`; every verdict here follows them (thresholds named once, below)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .judgement import COLLAPSED, CONFIDENT
from .markdown import md
from .run_analysis import RunAnalysis
from .under_shift import (CalibrationPair, SeverityStat, calibration_pairs, changes_at, concentration,
                          corruptions, guard_shifts, pooled_change, severities, severity_stats)
from .trust import percent, target_words

CONCENTRATED = 0.5  # confident predictions swapping at most this share of the others' rate: clearly concentrated
SHAKEN = 0.5  # a configuration that swaps this share of its clean predictions or more shakes them all: not pooled
RATIO_STEP = 0.05  # Δ error / % swapped moving by less than this (it lies in [−1, 1]) has not moved
TREND_WORDS = {"grows": "grows with severity", "falls": "falls with severity",
               "flat": f"does not grow with severity (it stays within ±{RATIO_STEP:g} of its first value)",
               "mixed": "does not grow steadily with severity (it rises and falls)",
               "undefined": "is undefined (fewer than two levels with a swap)"}
TABLE_COLUMNS = (("swapped", "% swapped", 100, "{:.2f}"), ("delta_top1_error", "Δ err (pp)", 100, "{:+.2f}"),
                 ("delta_error_per_swapped", "Δ err / % swapped", 1, "{:.3f}"),
                 ("top1_error", "top-1 err %", 100, "{:.2f}"), ("ece", "ECE %", 100, "{:.2f}"),
                 ("ece_temperature", "ECE after float's T %", 100, "{:.2f}"),
                 ("ece_own_temperature", "ECE after own T %", 100, "{:.2f}"))


def level_words(severity: int) -> str:
    return "clean" if severity == 0 else f"severity {severity}"


def trend(values: Sequence[float]) -> str:
    """How a series over clean and rising severities moves, NaN skipped: ``grows``, ``falls``,
    ``flat``, ``mixed`` (a key of :data:`TREND_WORDS`), or ``undefined`` with fewer than two values."""
    v = np.array([x for x in values if not math.isnan(x)])
    if len(v) < 2:
        return "undefined"
    rise, steps = v[-1] - v[0], np.diff(v)
    if rise >= RATIO_STEP and (steps >= -RATIO_STEP).all():
        return "grows"
    if rise <= -RATIO_STEP and (steps <= RATIO_STEP).all():
        return "falls"
    return "flat" if (np.abs(v - v[0]) < RATIO_STEP).all() else "mixed"


def tested(run: RunAnalysis) -> list[str]:
    """The quantized configurations the claim is tested on: those in the cells that did not collapse
    on clean images (a collapsed one swaps nearly everything, whatever the confidence)."""
    present = {r.name for cell in run.shift for r in cell.quantized}
    return [c.name for c in run.quantized if c.name in present and c.change.swap_rate < COLLAPSED]


def _level_text(c) -> str:
    return (f"{level_words(c.severity)} {percent(c.median_swapped)}% against {percent(c.median_kept)}%, "
            f"{percent(c.confident_rate)}% against {percent(c.unsure_rate)}%")


def concentration_reading(run: RunAnalysis, names: Sequence[str]) -> str:
    """Whether swaps under shift stay where the float model is unsure, from the numbers pooled over the
    configurations that swap fewer than :data:`SHAKEN` of their clean predictions (the paper's regime:
    one that changes most predictions says nothing of which ones flip first)."""
    rates = {c.name: c.change.swap_rate for c in run.quantized if c.change is not None}
    shaken = [n for n in names if rates.get(n, 0.0) >= SHAKEN]
    names = [n for n in names if n not in shaken]
    if not names:
        return (f"Every configuration swaps {100 * SHAKEN:.0f}% or more of its clean predictions, so none tells which "
                "predictions flip first.")
    left = (f" ({', '.join(md(n) for n in shaken)} left out: {100 * SHAKEN:.0f}% or more of their clean predictions "
            "swap)") if shaken else ""
    found = []
    for level in [0, *severities(run.shift)]:
        change = pooled_change(changes_at(run.shift, run.quantized, names, level))
        if change is not None and len(change.swapped):
            found.append(concentration(change, level, CONFIDENT))
    if not found:
        return ""
    text = (f"Pooled over {', '.join(md(n) for n in names)}{left} and the corruptions of each severity: the float model's "
            "median confidence in a swapped prediction against a kept one, and the share swapped of the predictions "
            f"it held with at least {100 * CONFIDENT:.0f}% confidence against the others' — "
            + "; ".join(_level_text(c) for c in found) + ".")
    return f"{text} {_concentration_verdict(found)}"


def _concentration_verdict(found: Sequence) -> str:
    """Concentrated where the float model is unsure: a swapped prediction held less confidently than a
    kept one, and confident predictions swapping at most :data:`CONCENTRATED` times as often as the others."""
    kinds: dict[str, list[str]] = {"strong": [], "weak": [], "not": [], "none": []}
    for c in found:
        lower = c.median_swapped < c.median_kept and c.confident_rate < c.unsure_rate
        kinds["none" if not c.swaps else "strong" if lower and c.confident_rate <= CONCENTRATED * c.unsure_rate
              else "weak" if lower else "not"].append(c.severity)
    if not kinds["weak"] and not kinds["not"] and kinds["strong"]:
        verdict = ("So the swaps stay concentrated where the float model is unsure, clean and under shift, as the "
                   "paper found on clean images.")
    else:
        said = {"strong": "concentrated where the float model is unsure", "weak": "only weakly concentrated there "
                f"(confident predictions swap more than {CONCENTRATED:g} times as often as the others)",
                "not": "not concentrated there (a swapped prediction is held as confidently as a kept one, or confident "
                       "predictions swap at least as often as unsure ones)"}
        verdict = "So the swaps are " + "; ".join(f"{words} {_at(kinds[kind])}" for kind, words in said.items()
                                                  if kinds[kind]) + "."
    if kinds["none"]:
        verdict += f" No prediction swapped {_at(kinds['none'])}."
    return verdict


def _at(levels: Sequence[int]) -> str:
    """``on clean images and at severities 1, 3`` (0: clean)."""
    rising = [str(s) for s in levels if s]
    words = (["on clean images"] if 0 in levels else []) + \
        ([f"at severit{'ies' if len(rising) > 1 else 'y'} {', '.join(rising)}"] if rising else [])
    return " and ".join(words)


def ratio_reading(stats: Sequence[SeverityStat], names: Sequence[str]) -> str:
    """Whether Δ error / % swapped grows with severity, configuration by configuration."""
    groups: dict[str, list[str]] = {}
    for name in names:
        own = [s for s in stats if s.config == name]
        values = [s.mean["delta_error_per_swapped"] for s in own]
        verdict = trend(values)
        defined = [s for s in own if not math.isnan(s.mean["delta_error_per_swapped"])]
        numbers = "" if len(defined) < 2 else (
            f" ({defined[0].mean['delta_error_per_swapped']:.2f} {level_words(defined[0].severity)} → "
            f"{defined[-1].mean['delta_error_per_swapped']:.2f} at {level_words(defined[-1].severity)})")
        groups.setdefault(verdict, []).append(md(name) + numbers)
    parts = [f"{TREND_WORDS[verdict]} for {', '.join(items)}" for verdict, items in groups.items()]
    return "The ratio Δ error / % swapped (mean Δ error over mean % swapped of each severity's corruptions) " + \
        "; it ".join(parts) + "."


def claim_reading(run: RunAnalysis, stats: Sequence[SeverityStat]) -> str:
    """The paper's claim tested under shift on this run: are swaps still where the float model is
    unsure, and does the ratio of Δ error to % swapped grow with severity?"""
    names = tested(run)
    if not run.quantized:
        return "The run has no quantized configuration, so there is no swap to test the paper's claim on under shift."
    if not names:
        return ("No quantized configuration to test the paper's claim on under shift: each one the cells hold "
                f"collapsed on clean images ({100 * COLLAPSED:.0f}% or more of its predictions swapped), or none is "
                "in the cells.")
    return "**The paper's claim under shift.** " + " ".join(
        p for p in (concentration_reading(run, names), ratio_reading(stats, names)) if p)


def _spread_cell(stat: SeverityStat, key: str, scale: float, fmt: str) -> str:
    value = stat.mean[key]
    if value is None or math.isnan(value):
        return "–"
    text = fmt.format(scale * value)
    if stat.corruptions > 1 and not math.isnan(stat.low[key]):
        text += f" [{fmt.format(scale * stat.low[key]).lstrip('+')}, {fmt.format(scale * stat.high[key]).lstrip('+')}]"
    return text


def severity_table(run: RunAnalysis, stats: Sequence[SeverityStat], severity: int) -> list[str]:
    """A severity's table: every configuration's mean over corruptions [lowest, highest], and the
    float model's drop from clean."""
    rows = [s for s in stats if s.severity == severity]
    columns = [c for c in TABLE_COLUMNS if any(not math.isnan(s.mean[c[0]]) for s in rows)]
    cells = [c for c in run.shift if c.severity == severity]
    error, ece = np.array([c.float_error_drop for c in cells]), np.array([c.float_ece_drop for c in cells])
    clean = run.reference.metrics
    drop = (f"The float model's top-1 error: {100 * clean.top1_error:.2f}% clean → "
            f"{100 * (clean.top1_error + error.mean()):.2f}% ({100 * error.mean():+.2f} pp"
            + (f"; {100 * error.min():+.2f} to {100 * error.max():+.2f} by corruption" if len(cells) > 1 else "")
            + f"); its ECE: {100 * clean.ece:.2f}% → {100 * (clean.ece + ece.mean()):.2f}% ({100 * ece.mean():+.2f} pp"
            + (f"; {100 * ece.min():+.2f} to {100 * ece.max():+.2f}" if len(cells) > 1 else "") + ").")
    spread = "; brackets: the lowest and highest corruption" if len(cells) > 1 else ""
    head = "| config | " + " | ".join(title for _, title, _, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([md(s.config), *(_spread_cell(s, k, sc, f) for k, _, sc, f in columns)]) + " |"
              for s in rows]
    return [f"**Severity {severity}** (mean over {len(cells)} corruption{'s' if len(cells) > 1 else ''}{spread}). "
            + drop, "\n".join(lines)]


def guard_shift_section(run: RunAnalysis) -> list[str]:
    """Each guard's clean-chosen threshold judged per corruption: a table by severity, and a
    sentence per configuration saying whether it still meets its target."""
    shifts = [g for g in guard_shifts(run.shift, run.guards) if g.config in {r.name for c in run.shift
                                                                               for r in c.quantized}]
    if not shifts:
        return []
    lines = ["| config | images | % swapped (unguarded) | % routed | % of swaps caught | % differing | "
             "top-1 err % guarded | target met (corruptions) |", "|---|---|---|---|---|---|---|---|"]
    for g in shifts:
        met = ("yes" if g.met else "no") if g.severity == 0 else f"{g.met} of {g.corruptions}"
        lines.append(f"| {md(g.config)} | {level_words(g.severity)} | {percent(g.mean['swapped'])} | "
                     f"{percent(g.mean['routed'])} | {percent(g.mean['swaps_caught'])} | {percent(g.mean['differing'])} | "
                     f"{100 * g.mean['guarded_error']:.2f} | {met} |")
    target = target_words(shifts[0].target)
    sentences = [_guard_shift_sentence([g for g in shifts if g.config == name])
                 for name in dict.fromkeys(g.config for g in shifts)]
    return [f"**The float fallback guard under shift** (each threshold as chosen on clean held-out images, judged on "
            f"each corrupted copy of the evaluation images; means over the corruptions of a severity; target: "
            f"{target})", "\n".join(lines), "\n".join(f"- {s}" for s in sentences)]


def _guard_shift_sentence(levels: Sequence) -> str:
    """Whether one configuration's guard meets its target clean and at each severity."""
    clean, shifted = levels[0], [g for g in levels if g.severity > 0]
    kept = [g.severity for g in shifted if g.met == g.corruptions]
    missed = [g for g in shifted if g.met < g.corruptions]
    what = "differing" if clean.target.max_differing is not None else "routed"
    text = (f"{md(clean.config)}'s guard {'meets' if clean.met else 'misses'} its target on the clean evaluation "
            f"images ({percent(clean.mean[what])}% {what})")
    said = []
    if kept:
        said.append(f"meets it under every corruption at severit{'y' if len(kept) == 1 else 'ies'} "
                    f"{', '.join(map(str, kept))}")
    if missed:
        said.append("misses it in " + ", ".join(f"{g.corruptions - g.met} of {g.corruptions} corruptions at severity "
                                                f"{g.severity} (mean {percent(g.mean[what])}% {what})" for g in missed))
    text += "; under shift it " + " and ".join(said) if said else ""
    if not clean.met:
        return text + ": its threshold fails already on clean images."
    return text + (": it still meets its target under shift." if not missed else
                   ": the threshold chosen on clean images does not carry over to corrupted ones.")


def _pair_words(twin: float, shifted: float, compared: str = "") -> str:
    """``fewer``, ``more`` or ``as many`` (with ``compared``, e.g. "predictions", and its ``than``/``as``)."""
    word, joint = ("fewer", "than") if shifted < twin else ("more", "than") if shifted > twin else ("as many", "as")
    return f"{word} {compared} {joint}" if compared else word


def _pair_sentence(pair: CalibrationPair) -> str:
    clean = pair.clean_swapped
    text = (f"{md(pair.shifted)} (calibrated on {md(pair.calibrated_on)}) swaps {_pair_words(*clean, 'predictions')} "
            f"{md(pair.twin)} on clean images ({percent(clean[1])}% against {percent(clean[0])}%)")
    if pair.shift_swapped is not None:
        shift = pair.shift_swapped
        text += (f" and {_pair_words(*shift)} under shift ({percent(shift[1])}% against {percent(shift[0])}%, mean "
                 f"over the {pair.cells} corrupted sets both were evaluated on)")
    return text + "."


def calibration_section(run: RunAnalysis) -> list[str]:
    """Each configuration calibrated on corrupted images beside its clean-calibrated twin (same
    widths, by descriptor): % swapped and Δ error clean, under shift, and on its own corruption."""
    pairs = calibration_pairs(run.record, run.configs, run.shift)
    alone = [n for n, i in run.record.descriptors.items() if i.calibrated_on and n not in {p.shifted for p in pairs}]
    if not pairs and not alone:
        return []

    def both(values, scale=100, fmt="{:.2f}"):
        return "–" if values is None else f"{fmt.format(scale * values[0])} → {fmt.format(scale * values[1])}"

    lines = ["| calibrated on corrupted images | on | clean twin | % swapped clean | Δ err clean (pp) | "
             "% swapped under shift (mean) | Δ err under shift (pp, mean) | % swapped on its own corruption |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {md(p.shifted)} | {md(p.calibrated_on)} | {md(p.twin)} | {both(p.clean_swapped)} | "
              f"{both(p.clean_delta, fmt='{:+.2f}')} | {both(p.shift_swapped)} | {both(p.shift_delta, fmt='{:+.2f}')} | "
              f"{both(p.own_cell_swapped)} |" for p in pairs]
    parts = ["**Calibrating on corrupted images** (activation ranges set on corrupted calibration images, against "
             "the same widths calibrated on clean ones; each cell: twin → calibrated on corrupted images)"]
    if pairs:
        parts += ["\n".join(lines), " ".join(_pair_sentence(p) for p in pairs)]
    if alone:
        parts.append(f"{', '.join(md(n) for n in alone)}: calibrated on corrupted images, but the run has no "
                     "configuration of the same widths calibrated on clean ones to compare with.")
    return parts


def shift_section(run: RunAnalysis) -> list[str]:
    """The section "Under shift" of a run with corrupted evaluation images; nothing otherwise."""
    if not run.shift:
        return []
    stats = severity_stats(run.shift, run.configs)
    names = corruptions(run.shift)
    skipped = len(run.record.shifted) - len(run.shift)
    intro = (f"The same {len(run.labels)} evaluation images under {len(names)} corruption"
             f"{'s' if len(names) > 1 else ''} ({', '.join(md(n) for n in names)}) at severit"
             f"{'y' if len(severities(run.shift)) == 1 else 'ies'} {', '.join(map(str, severities(run.shift)))}. "
             "Each configuration is compared with the float model on the same corrupted images (a swap: its top-1 "
             "differs from the float model's there); temperatures are those fitted on clean images, applied "
             "unchanged, as a deployment calibrated on clean data would. First calibration draws; every corruption "
             "and severity, configuration by configuration, is in metrics.csv and metrics.json (columns corruption "
             "and severity; *_vs_clean: the change from the configuration's clean numbers).")
    if run.temperature is None:
        intro += " No temperature was fitted (too few images), so the tables have no column after T."
    if skipped:
        intro += f" {skipped} corrupted set{'s' if skipped > 1 else ''} without the float model's logits left out."
    parts = ["### Under shift", intro, claim_reading(run, stats)]
    for severity in severities(run.shift):
        parts += severity_table(run, stats, severity)
    return parts + guard_shift_section(run) + calibration_section(run)
