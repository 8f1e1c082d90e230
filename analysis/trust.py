"""When to trust a quantized model, computed for the report: each quantized configuration's float
fallback guard counted on the evaluation images, and ``guard.json``, the guards to deploy.

``guard.json`` (strict JSON: no NaN or infinity) is::

    {"format": 1,
     "runs": [{"model": "resnet20",
               "held_out": {"source": "calibration", "images": 1000},
               "target": {"max_differing": 0.001, "max_routed": null},
               "configs": {"a8w4": {"guard": {...},
                                    "others": {"margin": {...}, "entropy": {...}}}},
               "missing": null}]}

one entry per run (model) of the report, in its order. ``held_out`` names the images each threshold
was chosen on: ``"calibration"`` (which also set the activation ranges, so their rates may be
optimistic) or ``"search"`` (held out of evaluation for the mixed-precision search). ``target`` is
:class:`~ptqcal.evaluate.guard.GuardTarget`'s fields. Under ``configs``, each quantized
configuration's ``guard`` is the one to deploy and ``others`` its guards under the other
confidence scores, each a :meth:`~ptqcal.evaluate.guard.Guard.to_json` object (rates as
fractions: ``held_out`` on the images it was chosen on, ``evaluation`` on the evaluation images; a
rate with nothing to measure, e.g. swaps caught without a swap, is ``null``; an infinite threshold
is ``"inf"`` or ``"-inf"``). Read one back with :meth:`~ptqcal.evaluate.guard.Guard.from_json` and
route a batch with :func:`~ptqcal.evaluate.guard.route_to_float`. A run without guards has empty
``configs`` and says why in ``missing`` (otherwise ``null``). The file is written only when some
run of the report has a guard.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ptqcal.evaluate.guard import CONFIDENT, Guard, GuardTarget, route_to_float, swap_auroc
from ptqcal.evaluate.results import FLOAT_NAME
from ptqcal.evaluate.selective import SCORES

from .run_analysis import RunAnalysis

GUARD_FILE = "guard.json"
GUARD_FILE_FORMAT = 1
_TOLERANCE = 1e-12  # a count / N against a target given as a decimal fraction


@dataclass(frozen=True)
class GuardView:
    """What the report says of one configuration's guard: its rates as chosen, and counts of the
    evaluation images by hand (routed, swaps and confident swaps, and how many of each it routed)."""

    config: str
    guard: Guard
    others: dict[str, Guard]
    images: int
    routed: int
    swaps: int
    caught: int
    confident: int  # swaps of predictions float held with at least CONFIDENT confidence
    confident_caught: int
    quant_error: float  # the configuration's top-1 error alone (its first calibration draw, as the guard's)
    float_error: float
    auroc: dict[str, float] = field(default_factory=dict)  # swap AUROC of each score (NaN: no swap)

    @property
    def met(self) -> bool:
        """Whether the guard meets its target on the evaluation images."""
        target, rates = self.guard.target, self.guard.evaluation
        if target.max_differing is not None:
            return rates.differing <= target.max_differing + _TOLERANCE
        return rates.routed <= target.max_routed + _TOLERANCE


def guard_views(run: RunAnalysis) -> list[GuardView]:
    """A :class:`GuardView` per quantized configuration with a guard, in sweep order."""
    views, float_logits = [], run.reference.logits
    for config in run.quantized:
        if config.name not in run.guards:
            continue
        guard, others = run.guards[config.name]
        routed = route_to_float(config.logits, guard)
        swapped = config.change.swapped
        confident = swapped & (config.change.float_confidence >= CONFIDENT)
        views.append(GuardView(config.name, guard, others, len(routed), int(routed.sum()), int(swapped.sum()),
                               int((swapped & routed).sum()), int(confident.sum()), int((confident & routed).sum()),
                               float(np.mean(~config.change.quant_correct)),
                               float(np.mean(~config.change.float_correct)),
                               {s: swap_auroc(config.logits, float_logits, s) for s in SCORES}))
    return views


def target_words(target: GuardTarget) -> str:
    """The guard's target in words (fractions shown in percent)."""
    if target.max_differing is not None:
        return f"at most {100 * target.max_differing:g}% of predictions still differing from the float model's"
    return f"at most {100 * target.max_routed:g}% of inputs routed to the float model"


def missing_guards(run: RunAnalysis) -> str | None:
    """Why ``run`` has no guard at all although it has quantized configurations (``None`` if it has
    one, or nothing to guard)."""
    if run.guards or not run.quantized:
        return None
    record = run.record
    held = FLOAT_NAME in record.held_out_logits and len(record.held_out_labels) > 0
    if record.guard_target is None and not held:
        return ("this run saved no logits on images held out of evaluation and no guard target (it was made by an "
                "older ptqcal): a threshold chosen on the evaluation images would be judged on the images it was "
                "fitted to, so none is chosen. Re-run it to get one")
    if not held:
        return ("this run saved no logits on images held out of evaluation: a threshold chosen on the evaluation "
                "images would be judged on the images it was fitted to, so none is chosen")
    if record.guard_target is None:
        return "this run recorded no guard target, so there is nothing to choose a threshold for"
    return "no quantized configuration has logits on the held-out images"


def unguarded(run: RunAnalysis) -> list[str]:
    """Quantized configurations without a guard in a run that has some (no held-out logits of theirs)."""
    return [c.name for c in run.quantized if run.guards and c.name not in run.guards]


def guard_json(runs: Sequence[RunAnalysis]) -> str | None:
    """``guard.json`` (see the module docstring), or ``None`` when no run has a guard."""
    if not any(r.guards for r in runs):
        return None
    entries = []
    for run in runs:
        configs = {name: {"guard": guard.to_json(),
                          "others": {score: other.to_json() for score, other in others.items() if score != guard.score}}
                   for name, (guard, others) in run.guards.items()}
        target = None if run.record.guard_target is None else asdict(GuardTarget(**run.record.guard_target))
        entries.append({"model": run.name,
                        "held_out": {"source": run.record.held_out_source, "images": len(run.record.held_out_labels)},
                        "target": target, "configs": configs, "missing": missing_guards(run)})
    return json.dumps({"format": GUARD_FILE_FORMAT, "runs": entries}, indent=2, allow_nan=False) + "\n"


def percent(fraction: float) -> str:
    """A share in percent, with as many decimals as its size needs (NaN: "–")."""
    if fraction is None or math.isnan(fraction):
        return "–"
    value = 100 * fraction
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def threshold_text(threshold: float) -> str:
    """A threshold as the table shows it: ``−∞`` routes nothing, ``+∞`` everything."""
    if math.isinf(threshold):
        return "−∞" if threshold < 0 else "+∞"
    return f"{threshold:.4g}"


def expected_vs_quant(guard: Guard) -> float | None:
    """The guarded system's expected batch-1 latency over the configuration's own (``None`` untimed)."""
    if guard.expected_latency_ms is None or not guard.quant_latency_ms:
        return None
    return guard.expected_latency_ms / guard.quant_latency_ms
