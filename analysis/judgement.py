"""The sentences that judge numbers: what a sweep shows, where a configuration collapsed, whether
the float model is over- or underconfident, what a float fallback guard buys, why a quantized
model is not faster, and why the deployed path parts from the simulated one. Each threshold is named here, once; the tables and
figures only show numbers."""

from __future__ import annotations

from typing import Mapping, Sequence

from ptqcal.quantize.spec import stored_bits
from ptqcal.evaluate.attribution import CONFIDENT as ATTRIBUTION_CONFIDENT
from ptqcal.evaluate.guard import CONFIDENT as GUARD_CONFIDENT
from ptqcal.evaluate.deploy import (BLOCKS, MIN_LATENCY_RUNS, MIN_THROUGHPUT_RUNS, TIMING_SECONDS, WARMUP_RUNS,
                                    speed_ratio)
from ptqcal.evaluate.record import ConfigInfo, ConfigKind
from ptqcal.evaluate.agreement import PathAgreement
from ptqcal.evaluate.results import FLOAT_NAME

from .markdown import md
from .run_analysis import RunAnalysis
from .trust import GuardView, expected_vs_quant, guard_views, missing_guards, percent, target_words, unguarded

CONFIDENT = ATTRIBUTION_CONFIDENT  # a float prediction held with at least this confidence counts as confident
COLLAPSED = 0.9  # a configuration that swaps at least this share of predictions has collapsed
FLIPPING = 0.05  # confident predictions "start to flip" once this share of them swaps ...
MIN_FLIPS = 3  # ... and at least this many (one image of a handful is noise)
# Deployed and simulated paths of one model should agree on nearly every prediction; below this
# the report explains where the difference comes from.
PATH_AGREEMENT_FLOOR = 0.98
# a ratio to float in words (Ratio.verdict): images/s over float's, batch-1 latency over float's
SPEED_WORDS = {"above": "faster", "below": "slower", "same": "same within noise", "unjudged": ""}
LATENCY_WORDS = {"above": "slower", "below": "faster", "same": "same within noise", "unjudged": ""}


def confident_swaps(config) -> tuple[int, int]:
    """Swapped and total float predictions held with at least :data:`CONFIDENT` confidence."""
    return config.change.confident_swaps(CONFIDENT)


def sweep_reading(run: RunAnalysis, mild_ratio: float = 0.5) -> str:
    """Sentences on what the sweep shows, judged from the numbers: which confidences swap (the
    top confidence bin, not an average), and where a configuration collapsed."""
    quantized = [c for c in run.quantized if c.change.swapped.any()]
    if not quantized:
        return "No precision swapped any prediction."
    collapsed = [c for c in quantized if c.metrics.swapped >= COLLAPSED]
    working = [c for c in quantized if c not in collapsed]
    sentences = []
    mild = [c for c in working if c.metrics.delta_error_per_swapped < mild_ratio]
    if mild:
        most = max(mild, key=lambda c: c.metrics.swapped)
        m, (flipped, held) = most.metrics, confident_swaps(most)
        confident = (f"of the {held} predictions the float model held with at least {100 * CONFIDENT:.0f}% "
                     f"confidence, {flipped} swapped" if held else
                     f"the float model held no prediction with {100 * CONFIDENT:.0f}% confidence or more")
        sentences.append(
            f"At {md(most.name)}, {100 * m.swapped:.2f}% of the predictions changed while the top-1 error moved by "
            f"{100 * m.delta_top1_error:+.2f} pp (ratio {m.delta_error_per_swapped:.2f}); {confident}.")
    flipping = [c for c in working if confident_swaps(c)[0] >= max(MIN_FLIPS, FLIPPING * confident_swaps(c)[1])]
    if flipping:
        first = flipping[0]  # in sweep order: the highest precision at which they flip
        flipped, held = confident_swaps(first)
        sentences.append(f"At {md(first.name)} confident predictions flip: {100 * flipped / held:.1f}% of those held "
                         f"with at least {100 * CONFIDENT:.0f}% confidence swapped ({flipped} of {held}), and the "
                         f"ratio is {first.metrics.delta_error_per_swapped:.2f}.")
    for config in collapsed:
        sentences.append(f"At {md(config.name)} the model collapsed: {100 * config.metrics.swapped:.1f}% of the "
                         f"predictions changed and the top-1 error is {100 * config.metrics.top1_error:.1f}%.")
    return " ".join(sentences)


def lowest_precision(run: RunAnalysis, working: bool = False):
    """The configuration of one precision with the fewest weight and activation bits, from the
    descriptors (fp16 counts as 16 and 16; the sweep's order between equals), or ``None``; with
    ``working``, among those that have not collapsed (Figure 1 draws it over the float model)."""
    def bits(config) -> int:
        info = run.descriptor(config.name)
        return (info.weight_bits or 16) + (info.act_bits or 16)

    kept = [c for c in run.uniform if not working or c.metrics.swapped < COLLAPSED]
    return min(reversed(kept), key=bits) if kept else None


def lowest_working(run: RunAnalysis):
    """:func:`lowest_precision` among the configurations that have not collapsed."""
    return lowest_precision(run, working=True)


def calibration_words(run: RunAnalysis) -> str:
    """Whether the float model is over- or underconfident, with the numbers that say so."""
    m = run.reference.metrics
    gap = m.mean_confidence - (1 - m.top1_error)
    verdict = "overconfident" if gap > 0.01 else "underconfident" if gap < -0.01 else "about as confident as accurate"
    return (f"{md(run.name)}'s float model is {verdict}: mean confidence {100 * m.mean_confidence:.1f}% at "
            f"{100 * (1 - m.top1_error):.1f}% accuracy (ECE {100 * m.ece:.2f}%).")


def reliability_reading(runs: Sequence[RunAnalysis]) -> str:
    """What Figure 1 shows of each run's float model, and which lowest precision it leaves out."""
    collapsed = [md(r.name) for r in runs if r.uniform and lowest_working(r) is not lowest_precision(r)]
    reading = " ".join(calibration_words(r) for r in runs)
    if collapsed:
        reading += (f" The lowest precision of {', '.join(collapsed)} collapsed (90% or more of its predictions "
                    "swapped) and is not drawn; the line is the lowest one that did not.")
    return reading


def _latency_words(view: GuardView) -> str:
    own = expected_vs_quant(view.guard)
    if own is None:
        return ""
    return (f", at an expected {own:.2f}× {md(view.config)}'s batch-1 latency "
            f"({view.guard.latency_vs_float:.2f}× the float model's)")


def _confident_words(view: GuardView) -> str:
    if not view.confident:
        return "none of them confident"
    if view.confident_caught == view.confident:
        return f"all {view.confident} confident ones" if view.confident > 1 else "the one confident one"
    return f"{view.confident_caught} of its {view.confident} confident ones"


def _differing(share: float) -> str:
    return "no prediction" if share == 0 else f"{percent(share)}% of predictions"


def _against_target(guard) -> str:
    rates, target = guard.evaluation, guard.target
    if target.max_differing is not None:
        return f"{percent(rates.differing)}% differ, at most {100 * target.max_differing:g}% allowed"
    return f"{percent(rates.routed)}% routed, at most {100 * target.max_routed:g}% allowed"


def guard_sentence(view: GuardView) -> str:
    """One sentence (two when the target is missed) on what ``view``'s guard buys, from its numbers."""
    guard, name = view.guard, md(view.config)
    rates = guard.evaluation
    missed = "" if view.met else (f" It misses the target on the evaluation images ({_against_target(guard)}), "
                                  f"though it met it on the {guard.chosen_on} held-out ones.")
    if not view.swaps:
        spent = (f", and its threshold still sends {percent(rates.routed)}% of inputs to float for nothing"
                 f"{_latency_words(view)}") if view.routed else ""
        return f"{name} swapped no prediction of the evaluation images: there is nothing for a guard to catch{spent}." \
            + missed
    if not view.routed:
        why = "it swapped nothing there" if not guard.held_out.swapped else "the target was met without routing"
        return (f"{name}: its guard routes no input to float (on the held-out images {why}), so all {view.swaps} of "
                f"its swaps remain and {percent(rates.differing)}% of its predictions differ from float's.{missed}")
    everything = (" (on the held-out images only routing every input met the target: the guard is the float model)"
                  if view.routed == view.images else "")
    return (f"{name}: routing {percent(rates.routed)}% of inputs to float{everything} catches "
            f"{percent(rates.swaps_caught)}% of its swaps ({view.caught} of {view.swaps}; "
            f"{_confident_words(view)}), leaving {_differing(rates.differing)} different from float's"
            f"{_latency_words(view)}; top-1 error {100 * view.quant_error:.2f}% → {100 * rates.guarded_error:.2f}% "
            f"(float {100 * view.float_error:.2f}%).{missed}")


def guard_reading(run: RunAnalysis) -> str:
    """A bullet per guarded configuration saying what its guard buys, or why the run has no guard."""
    why = missing_guards(run)
    if why is not None:
        return f"No float fallback guard: {why}."
    return "\n".join(f"- {guard_sentence(view)}" for view in guard_views(run))


def guard_note(run: RunAnalysis) -> str:
    """Where each threshold was chosen, for which target, and what the table's words mean."""
    if not run.guards:
        return ""
    record = run.record
    images = len(record.held_out_labels)
    where = (f"the {images} calibration images, which also set the activation ranges, so the held-out rates may "
             "be optimistic" if record.held_out_source == "calibration" else
             f"the {images} images held out of evaluation for the mixed-precision search (which chose the mixed "
             "configuration's weight widths on them, so its held-out rates may be optimistic)"
             if record.held_out_source == "search" else f"{images} images held out of evaluation")
    target = next(iter(run.guards.values()))[0].target
    fewest = "routing the fewest inputs" if target.max_differing is not None else "leaving the fewest swaps"
    parts = [f"Each threshold was chosen on {where}; the evaluation rates are the honest ones. Target: "
             f"{target_words(target)}; each configuration's score is the one that met it there {fewest}. "
             f"A confident swap changes a prediction the float model held with at least {100 * GUARD_CONFIDENT:.0f}% "
             "confidence. Swap AUROC: the chance that a swapped input scores below a kept one (1: every swap "
             "ranks first; 0.5: no better than chance; the chosen score's in bold). Expected latency: the "
             "configuration's batch-1 latency on every input plus the float model's on the routed share, over the "
             "float model's (a routed input pays both: the mean, not the tail). The thresholds are in guard.json."]
    if run.draws > 1:
        parts.append("Each guard is of the configuration's first calibration draw.")
    if not any(c.change.swapped.any() for c in run.quantized if c.name in run.guards):
        parts.append("Figure 10 has no panel for this model: no guarded configuration swapped a prediction.")
    if unguarded(run):
        parts.append(f"No guard for {', '.join(md(n) for n in unguarded(run))}: the run saved no logits of "
                     f"{'it' if len(unguarded(run)) == 1 else 'them'} on the held-out images.")
    return " ".join(parts)


def timing_words(run: RunAnalysis) -> str:
    """How the deployment table's timings were taken and how its ratios are judged."""
    if any(d.latency_runs is None for d in run.record.deployment.values() if d.timed):
        return ("These timings were taken by an older ptqcal, which kept neither how many runs each rests on nor "
                "their spread: no ratio is judged faster or slower within noise. Re-run to time them again.")
    return (f"Each timing rests on at least {TIMING_SECONDS:g} s of session.run (the runs column: how many): the "
            f"latency is the median (and 90th percentile) of batch-1 runs after {WARMUP_RUNS} warm-up ones, at least "
            f"{MIN_LATENCY_RUNS}; the images/s are all the images over all the seconds of at least "
            f"{MIN_THROUGHPUT_RUNS} full batches (the evaluation's own after its first when they took that long, "
            f"else timed runs of one batch). × float: the ratio of the two numbers, and in brackets the range of the "
            f"ratio between any of {BLOCKS} consecutive blocks of the configuration's runs and any of the float "
            "model's; a range that includes 1 is the same speed within noise (neither faster nor slower).")


def slow_reason(run: RunAnalysis, name: str, same: bool) -> str:
    """Why configuration ``name`` gains no speed over float on this CPU, where its kind tells."""
    info = run.record.descriptor(name)
    mixed = run.record.mixed
    if info.kind is ConfigKind.FP16:
        return "ORT's CPU provider has few float16 kernels, so it casts to and from float32 around most ops"
    four = stored_bits(info.weight_bits) == 4 if info.uniform else \
        info.kind is ConfigKind.MIXED and mixed is not None and any(stored_bits(b) == 4 for b in mixed.layer_bits.values())
    if four:
        return ("its 4-bit weights, packed INT4, have no integer kernel on CPU: ORT dequantizes them and runs float "
                "layers")
    if info.uniform and info.act_bits < 8:
        return "its activations below 8 bits keep a Clip in front of each QuantizeLinear, which stops fusion"
    if info.uniform or info.kind is ConfigKind.MIXED:
        return ("ORT's integer kernels gain nothing measurable over its float ones for this graph on this CPU" if same
                else "ORT's integer kernels are slower than its float ones for this graph on this CPU")
    return ""


def not_faster(run: RunAnalysis) -> str:
    """Why each quantized configuration that is not faster than float (images/s at the run's batch)
    is not: slower, or the same within noise (:attr:`~ptqcal.evaluate.deploy.Ratio.verdict`);
    configurations with the same verdict and reason share one sentence."""
    numbers = run.record.deployment
    reference, said = numbers[FLOAT_NAME], {}
    for name, d in numbers.items():
        ratio = None if name == FLOAT_NAME else speed_ratio(d, reference)
        if ratio is None or ratio.verdict == "above" or (ratio.verdict == "unjudged" and ratio.value > 1):
            continue
        key = (ratio.verdict, slow_reason(run, name, ratio.verdict == "same"))
        said.setdefault(key, []).append((md(name), ratio.text()))
    verbs = {"below": ("is slower than float", "are slower than float"),
             "same": ("runs at float's speed within noise", "run at float's speed within noise")}
    sentences = []
    for (verdict, why), items in said.items():
        what = verbs.get(verdict, ("is not faster than float", "are not faster than float"))[len(items) > 1]
        unjudged = "; no spread recorded to judge noise by" if verdict == "unjudged" else ""
        names, speeds = ", ".join(name for name, _ in items), ", ".join(speed for _, speed in items)
        sentences.append(f"{names} {what} ({speeds} its images/s{unjudged})" + (f": {why}." if why else "."))
    return " ".join(sentences)


def kernel_twins_note(run: RunAnalysis) -> str:
    """Uniform configurations of one weight container and activation width run the same kernels:
    where their timings disagree, a sentence saying that the difference is the machine's drift
    between measurements (each configuration is timed after the other), not theirs."""
    numbers, reference = run.record.deployment, run.record.deployment.get(FLOAT_NAME)
    groups: dict[tuple[int, int], list[str]] = {}
    for name, d in numbers.items():
        info = run.record.descriptor(name)
        if info.uniform and d.throughput is not None and reference is not None:
            groups.setdefault((stored_bits(info.weight_bits), info.act_bits), []).append(name)
    sentences = []
    for (bits, _), names in groups.items():
        ratios = [speed_ratio(numbers[n], reference) for n in names]
        apart = any(speed_ratio(numbers[a], numbers[b]).verdict in ("above", "below") for a in names for b in names)
        if len(names) > 1 and apart:
            values = sorted(r.value for r in ratios)
            sentences.append(f"{', '.join(md(n) for n in names)} store their weights in the same int{bits} containers "
                             f"and run the same kernels: the spread of their speeds ({values[0]:.2f}× to "
                             f"{values[-1]:.2f}× float's images/s) is this machine's drift from one measurement to the "
                             "next, wider than the range within each shows.")
    return " ".join(sentences)


def kernel_notes(checks: Sequence[PathAgreement], descriptors: Mapping[str, ConfigInfo],
                 vnni: bool | None) -> list[str]:
    """Why the deployed path parts from the simulated one, when it does at full 8-bit weights on a
    CPU without VNNI (``vnni``: :func:`ptqcal.evaluate.cpu.has_vnni`)."""
    below = [c.config for c in checks if c.top1_agreement < PATH_AGREEMENT_FLOOR]
    if not below or vnni is not False:
        return []
    missing = [name for name in below if name not in descriptors]
    if missing:  # a bug of the caller: which widths these are is never guessed from the names
        raise LookupError(f"no descriptor for {missing}: pass the sweep's descriptors")
    parted = [name for name in below if descriptors[name].weight_bits == 8]
    if not parted:
        return []
    return [f"On this CPU the deployed {', '.join(parted)} parts from the simulated one: it has AVX2 but no VNNI, "
            "so ORT's uint8 x int8 kernels multiply with VPMADDUBSW, whose pairwise int16 sums saturate when "
            "8-bit weights meet large activations. CPUs with VNNI (AVX512-VNNI, AVX-VNNI) sum in int32 and do not "
            "saturate; 7-bit weights (a8w7) never do. The simulated path is what such a "
            "CPU computes."]
