"""The report's Markdown tables: accuracy and calibration, what quantization changed, which
confidences flip, selective prediction and the float fallback guard, deployment, layer
attribution, the mixed-precision search, and several models side by side. Numbers are shown in percent here, where they are drawn; the sentences that judge
them are in :mod:`.judgement`."""

from __future__ import annotations

import math
import os
from typing import Sequence

from ptqcal.evaluate.attribution import CONFIDENT as ATTRIBUTION_CONFIDENT
from ptqcal.evaluate.deploy import Deployment, Ratio, latency_ratio, speed_ratio
from ptqcal.evaluate.metrics import FRACTION, Metrics, changes_by_confidence
from ptqcal.evaluate.results import FLOAT_NAME
from ptqcal.evaluate.selective import SCORES
from ptqcal.quantize.spec import MIXED_NAME

from .judgement import LATENCY_WORDS, SPEED_WORDS, kernel_twins_note, lowest_precision, not_faster, timing_words
from .markdown import md
from .run_analysis import TEMPERATURE_MIN_IMAGES, RunAnalysis
from .rows import COLUMNS, SELECTIVE, metrics_rows
from .trust import GuardView, guard_views, percent, threshold_text

CHANGE_KEYS = {"swapped", "delta_top1_error", "delta_error_per_swapped", "mean_float_conf_swapped",
               "correct_to_wrong", "wrong_to_correct", "wrong_to_other_wrong",
               "median_float_margin_swapped", "median_float_margin_kept"}
SELECTIVE_TITLES = {"aurc": ("AURC %", "{:.2f}"), "eaurc": ("E-AURC %", "{:.2f}"),
                    "aurc_margin": ("AURC margin %", "{:.2f}"), "aurc_entropy": ("AURC entropy %", "{:.2f}"),
                    "risk_at_80": ("risk at 80% coverage %", "{:.2f}"), "risk_at_90": ("risk at 90% coverage %", "{:.2f}"),
                    "coverage_at_float_risk": ("coverage at float's error %", "{:.1f}")}
SELECTIVE_COLUMNS = [("config", "config", "{}"), *((key, *SELECTIVE_TITLES[key]) for key in SELECTIVE_TITLES)]
assert set(SELECTIVE_TITLES) == set(SELECTIVE)  # every selective metric of metrics.csv is in the table
SWAP_KEYS = {"delta_error_per_swapped", "mean_float_conf_swapped", "median_float_margin_swapped"}  # of swaps only
TOP_LAYERS = 10  # rows of the attribution table in the report (layers.csv has them all)


def _shown(key: str, value: float) -> float:
    """A metric as drawn: fractions in percent (or percentage points), others as they are."""
    return 100 * value if key in Metrics.__dataclass_fields__ and Metrics.unit(key) == FRACTION else value


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, str):
        return md(value)
    text = fmt.format(_shown(key, value))
    if row.get(f"{key}_std") is not None:
        text += f" ± {_shown(key, row[f'{key}_std']):.2f}"
    elif row.get(f"{key}_ci95") is not None:
        lo, hi = (_shown(key, v) for v in row[f"{key}_ci95"])
        text += f" [{lo:.1f}, {hi:.1f}]"
    return text


def markdown_table(run: RunAnalysis, columns: Sequence[tuple[str, str, str]] = COLUMNS,
                   quantized_only: bool = False) -> str:
    """A Markdown table of ``columns`` (key, title, format) for every configuration, in percent."""
    rows = [r for r in metrics_rows(run) if not quantized_only or r["config"] != FLOAT_NAME]
    present = [c for c in columns if c[0] == "config" or any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in present) + " |", "|" + "---|" * len(present)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in present) + " |" for r in rows]
    return "\n".join(lines)


def _left_out(run: RunAnalysis, columns: Sequence[tuple[str, str, str]], quantized_only: bool = False) -> str:
    """A sentence naming the columns a table leaves out (no configuration has a value) and why."""
    rows = [r for r in metrics_rows(run) if not quantized_only or r["config"] != FLOAT_NAME]
    missing = [(key, title) for key, title, _ in columns if key != "config" and all(r.get(key) is None for r in rows)]
    if not missing:
        return ""
    return "Left out: " + "; ".join(f'"{title}" ({_why_missing(run, key)})' for key, title in missing) + "."


def _why_missing(run: RunAnalysis, key: str) -> str:
    if key in ("ece_temperature", "ece_own_temperature"):
        return (f"no temperature: {len(run.labels)} evaluation images are fewer than the {TEMPERATURE_MIN_IMAGES} "
                "a cross-fitted temperature needs")
    if key in SWAP_KEYS:
        return "no configuration swapped a prediction, so it is undefined"
    if key == "median_float_margin_kept":
        return "every configuration swapped every prediction, so it is undefined"
    return "undefined for every configuration"


def markdown_tables(run: RunAnalysis) -> list[str]:
    """Accuracy and calibration of every configuration; then what quantization changed (each with
    a sentence on the columns it leaves out, and why)."""
    quality = [c for c in COLUMNS if c[0] not in CHANGE_KEYS]
    change = [c for c in COLUMNS if c[0] == "config" or c[0] in CHANGE_KEYS]
    tables = ["**Accuracy and calibration**", markdown_table(run, quality), _left_out(run, quality)]
    if run.quantized:
        tables += ["**What quantization changed** (against the float model on the same images)",
                   markdown_table(run, change, quantized_only=True), _left_out(run, change, quantized_only=True)]
    else:
        tables.append("No table of what quantization changed: the run has no configuration besides the float model.")
    return tables


def confidence_table(run: RunAnalysis) -> str:
    """% of each float-confidence bin's predictions that each precision swapped."""
    if not run.quantized:
        return ""
    bins = [changes_by_confidence(c.change) for c in run.quantized]
    edges, counts = bins[0]["edges"], bins[0]["counts"]
    head = "| float confidence | predictions | " + " | ".join(md(c.name) for c in run.quantized) + " |"
    lines = [head, "|" + "---|" * (2 + len(run.quantized))]
    for i in range(len(counts)):
        if counts[i]:
            cells = [f"{100 * b['swap_rate'][i]:.1f}" for b in bins]
            lines.append(f"| {edges[i]:.1f}–{edges[i + 1]:.1f} | {counts[i]} | " + " | ".join(cells) + " |")
    return "\n".join(["**Which confidences flip** (% of the bin's predictions swapped)", "\n".join(lines)])


def selective_table(run: RunAnalysis) -> list[str]:
    """Each configuration's selective prediction (float first), in percent."""
    return ["**Selective prediction** (each configuration abstains on its least confident predictions). AURC: its "
            "top-1 error averaged over every coverage, ranking by the max softmax probability (the margin and "
            "entropy columns rank by the top-1 − top-2 logit and by minus the softmax entropy); E-AURC: the excess "
            "over a ranking that puts each of its errors last; risk at 80% / 90% coverage: the top-1 error of its "
            "80% / 90% most confident predictions; coverage at float's error: the largest share of its predictions "
            "a quantized configuration keeps with their error at most the float model's top-1 error (100: "
            "quantization costs no coverage).", markdown_table(run, SELECTIVE_COLUMNS)]


def _caught(share: float, caught: int, total: int) -> str:
    return "– (none)" if not total else f"{percent(share)} ({caught} of {total})"


def _guard_row(view: GuardView) -> str:
    guard = view.guard
    held, seen = guard.held_out, guard.evaluation
    auroc = " / ".join("–" if math.isnan(view.auroc[s]) else f"**{view.auroc[s]:.2f}**" if s == guard.score
                       else f"{view.auroc[s]:.2f}" for s in SCORES)
    latency = "–" if guard.latency_vs_float is None else f"{guard.latency_vs_float:.2f}"
    cells = [md(view.config), guard.score, threshold_text(guard.threshold), auroc,
             f"{percent(held.routed)} → {percent(seen.routed)}", _caught(seen.swaps_caught, view.caught, view.swaps),
             _caught(seen.confident_caught, view.confident_caught, view.confident),
             f"{percent(held.differing)} → {percent(seen.differing)}",
             f"{100 * view.quant_error:.2f} → {100 * seen.guarded_error:.2f}", latency]
    return "| " + " | ".join(cells) + " |"


def guard_table(run: RunAnalysis) -> list[str]:
    """Each quantized configuration's float fallback guard: its score and threshold, and what it
    routes, catches and costs on the evaluation images."""
    views = guard_views(run)
    if not views:
        return []
    head = ("| config | score | threshold | swap AUROC msp / margin / entropy | % routed (held-out → eval) | "
            "% swaps caught | % confident swaps caught | % differing (held-out → eval) | "
            f"top-1 err % alone → guarded (float {100 * run.reference.metrics.top1_error:.2f}) | "
            "expected latency × float |")
    return ["**Float fallback guard** (each input whose score under the configuration is below the threshold goes "
            "to the float model; rates on the evaluation images unless marked held-out)",
            "\n".join([head, "|" + "---|" * 10, *(_guard_row(view) for view in views)])]


def _ratio_cell(ratio: Ratio | None, words: dict[str, str]) -> str:
    return "–" if ratio is None else f"{ratio.text()} {words[ratio.verdict]}".rstrip()


def _runs_cell(d: Deployment) -> str:
    if d.latency_runs is None or d.throughput_runs is None:
        return "–"  # an older ptqcal's record: it did not keep the counts
    source = ", evaluation" if d.throughput_source == "evaluation" else ""
    return f"{d.latency_runs:,} / {d.throughput_runs:,} ({d.throughput_images:,} img{source})"


def _deployment_row(name: str, d: Deployment, reference: Deployment, timed: bool) -> str:
    cells = [md(name), f"{d.file_bytes / 1e6:.2f}", f"{d.weight_bytes / 1e6:.3f}",
             f"{d.weight_bytes / max(reference.weight_bytes, 1):.3f}"]
    if timed and d.throughput is not None:
        same = name == FLOAT_NAME
        cells += [f"{d.latency_ms:.3g} / {d.latency_p90_ms:.3g}",
                  "1 (reference)" if same else _ratio_cell(latency_ratio(d, reference), LATENCY_WORDS), f"{d.throughput:,.0f}",
                  "1 (reference)" if same else _ratio_cell(speed_ratio(d, reference), SPEED_WORDS), _runs_cell(d)]
    elif timed:
        cells += ["not timed"] + ["–"] * 4
    return "| " + " | ".join(cells) + " |"


def deployment_table(run: RunAnalysis) -> list[str]:
    """Size and speed of every configuration on the machine that ran it, with how many runs each
    timing rests on and the range of each ratio to float; why a quantized one is not faster than
    float where it is not."""
    numbers = run.record.deployment
    reference = numbers.get(FLOAT_NAME)
    if reference is None:
        return ["**Deployment**: left out, the run recorded no size or speed of the float model to compare with."]
    timed = reference.throughput is not None
    head = "| config | file MB | weights MB | weights × float |" + (
        f" latency ms (batch 1, median / p90) | latency × float | images/s (batch {reference.batch_size}) | "
        "speed × float | runs (batch 1 / batch) |" if timed else "")
    lines = [head, "|" + "---|" * (9 if timed else 4)]
    lines += [_deployment_row(name, d, reference, timed) for name, d in numbers.items()]
    threads = "ORT's default thread count, one per physical core" if reference.threads == 0 else \
        f"{reference.threads} ORT thread{'s' if reference.threads > 1 else ''}"
    if not timed:
        return ["**Deployment** (sizes only: timing was skipped, so there is no latency, speed or ratio to float)",
                "\n".join(lines)]
    return [f"**Deployment on this machine** ({threads}; {os.cpu_count()} CPUs)", "\n".join(lines),
            timing_words(run), kernel_twins_note(run), not_faster(run)]


def attribution_table(run: RunAnalysis) -> list[str]:
    """The layers whose weights, quantized alone, swap the most confident predictions."""
    result = run.record.attribution
    if result is None or not result.effects:  # a graph without Conv/Gemm/MatMul weights has nothing to attribute
        return []
    lines = ["| layer | weight bits | % confident swapped | % swapped | Δ err (pp) | SQNR dB |", "|---|---|---|---|---|---|"]
    for e in result.ranked()[:TOP_LAYERS]:
        confident = "–" if math.isnan(e.confident_swapped) else f"{100 * e.confident_swapped:.1f}"
        lines.append(f"| {md(e.layer)} | {e.weight_bits} | {confident} | {100 * e.swapped:.1f} | "
                     f"{100 * e.delta_top1_error:+.1f} | {e.sqnr_db:.1f} |")
    where = (f"{result.images} images held out of evaluation for the mixed-precision search" if result.held_out
             else f"{result.images} seeded evaluation images")
    shown = f"the {TOP_LAYERS} worst of {len(result.effects)}" if len(result.effects) > TOP_LAYERS else "all of them"
    return [f"**Which layers flip confident predictions** (each weight layer quantized alone, everything else "
            f"float, on {where}, {result.confident} of them held with at least {ATTRIBUTION_CONFIDENT:.0%} "
            f"confidence; {shown} (layer, bits); every one in layers.csv)", "\n".join(lines)]


def mixed_section(run: RunAnalysis) -> list[str]:
    """What the mixed-precision search chose, what it measured on its held-out images, and how it
    compares on the evaluation images with the uniform configuration of the same size."""
    choice = run.record.mixed
    if choice is None:
        return []
    target = (f"at most {100 * choice.limit:.2g}% of the confident predictions swapped, fewest weight bytes"
              if choice.target == "max_confident_swaps" else
              f"weights at most {choice.limit:.2g}x float's bytes, fewest confident swaps (greedy)")
    seen = (f"{choice.images} images held out of evaluation ({choice.confident} held with at least "
            f"{ATTRIBUTION_CONFIDENT:.0%} confidence by the float model)")
    if choice.max_delta_error is not None:
        target += f", top-1 error at most {100 * choice.max_delta_error:g} pp above float's"
    timed = choice.max_latency_ratio is not None
    if timed:
        target += f", batch-1 latency at most {choice.max_latency_ratio:g}x float's on this CPU"
    lines = ["| moves (one layer one width down) | weight bytes | × float | % confident swapped | % swapped | "
             "Δ err (pp) |" + (" latency × float |" if timed else ""), "|---|---|---|---|---|---|" + "---|" * timed]
    for step in choice.steps:
        confident = f"{100 * step.confident_swapped:.2f}" if choice.confident else "–"  # none to swap
        delta = "–" if step.delta_top1_error != step.delta_top1_error else f"{100 * step.delta_top1_error:+.2f}"
        latency = "" if not timed else " – |" if step.latency_ratio != step.latency_ratio else \
            f" {step.latency_ratio:.2f} |"
        lines.append(f"| {step.moves} | {step.weight_bytes:,} | {step.weight_bytes / choice.float_weight_bytes:.3f} "
                     f"| {confident} | {100 * step.swapped:.2f} | {delta} |{latency}")
    if not choice.met:
        return [f"**Mixed precision** (target: {target}): no assignment of the run's weight bit widths meets it "
                f"on the {seen}; the search measured:", "\n".join(lines)]
    counts = {}
    for bits in choice.layer_bits.values():
        counts[bits] = counts.get(bits, 0) + 1
    widths = ", ".join(f"{n} at {bits} bits" for bits, n in sorted(counts.items(), reverse=True))
    return [f"**Mixed precision** (target: {target}; activations at {choice.act_bits} bits): {widths} "
            f"(the per-layer widths are in run.json and model_{MIXED_NAME}.onnx). The search saw only the {seen}; "
            f"its steps below are measured there, its last row is the choice. The numbers of {md(MIXED_NAME)} in "
            "every other table and figure come from the evaluation images, which the search never saw.",
            "\n".join(lines)]


def comparison(runs: Sequence[RunAnalysis]) -> list[str]:
    """Several models side by side: float calibration, and how each holds up at its lowest precision."""
    if len(runs) < 2:
        return []
    if not all(r.uniform for r in runs):
        alone = ", ".join(md(r.name) for r in runs if not r.uniform)
        return ["## Comparison", f"Left out: {alone} has no configuration of one precision everywhere to set beside "
                "the others' lowest precision."]
    lines = ["| model | float top-1 err % | float ECE % | float mean conf % | lowest precision | % swapped | "
             "Δ err (pp) | Δ err / % swapped | float conf of swapped % |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        f, q = run.reference.metrics, lowest_precision(run)
        m = q.metrics
        ratio = m.delta_error_per_swapped
        lines.append(f"| {md(run.name)} | {100 * f.top1_error:.2f} | {100 * f.ece:.2f} | {100 * f.mean_confidence:.2f} | "
                     f"{md(q.name)} | {100 * m.swapped:.2f} | {100 * m.delta_top1_error:+.2f} | "
                     f"{'–' if math.isnan(ratio) else f'{ratio:.3f}'} | "
                     f"{100 * m.mean_float_conf_swapped:.1f} |")
    return ["## Comparison", "Each model's float calibration, and what its lowest precision changed.", "\n".join(lines)]
