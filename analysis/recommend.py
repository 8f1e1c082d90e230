"""Which configuration to ship, for a stated objective, and why each other one loses.

The objective (its defaults are here, once; a run's ``ship_*`` settings override them):

- **eligible**: not collapsed (:data:`~.judgement.COLLAPSED` swapped), top-1 error at most
  :data:`MAX_DELTA_ERROR` above float's, at most :data:`MAX_CONFIDENT_SWAPPED` of float's confident
  predictions swapped, not slower than float (unless :data:`ALLOW_SLOWER`). Every kind competes,
  the float model included (the fallback, eligible by construction).
- **order** ``"smallest"`` (default): fewest weight bytes as stored; among equal bytes the
  fastest on this CPU (images/s at the run's batch); speeds whose range includes 1
  (:class:`~ptqcal.evaluate.deploy.Ratio`) tie, and so do uniform configurations of the same
  weight container and activation width (:func:`same_kernels`: a8w7 runs as a8w8 does, whatever
  the clock said while each was timed); then the lowest top-1 error, the fewest confident
  swaps, the fewest swaps, the run's order. ``"fastest"``: the fastest, then the fewest bytes,
  then the same.

``recommendation.json`` (strict JSON; it depends on this machine's timings, as the report's speeds
do) is::

    {"format": 1,
     "runs": [{"model": "digits_resnet8",
               "objective": {"order": "smallest", "max_delta_top1_error": 0.01, "max_confident_swapped": 0.01,
                             "confident": 0.9, "min_confident": 20},
               "choice": "a8w8", "runner_up": "a8w7", "float_confident": 1100,
               "sentence": "ship a8w8 (...)", "warnings": ["..."],
               "configs": [{"config": "a8w7", "kind": "uniform", "rank": 2, "outcome": "equal_cost",
                            "reason": "stores and runs as a8w8 does (int8 containers) ...", "equal_to": "a8w8",
                            "weight_bytes": 77072, "weight_vs_float": 0.25, "top1_error": 0.04,
                            "delta_top1_error": 0.002, "swapped": 0.004, "confident_swapped": 1, "confident": 1100,
                            "speed_vs_float": {"value": 1.9, "low": 1.5, "high": 2.3}}]}]}

fractions throughout; ``rank`` is the position among the eligible configurations (1: the choice;
``null``: not eligible); ``outcome`` is ``chosen``, ``equal_cost`` (same stored bytes and the same
speed within noise as a better one: ``equal_to``), ``slower`` (same bytes as ``equal_to``, slower),
``larger`` (more weight bytes than the choice), ``slower_than_choice`` (order ``fastest``),
``outside`` (a threshold), ``collapsed`` or ``unsized``; ``speed_vs_float`` is images/s over the
float model's with its range (``low``/``high`` ``null`` without one; the whole object ``null``
when untimed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ptqcal.evaluate.deploy import Deployment, Ratio, speed_ratio
from ptqcal.evaluate.record import ConfigKind, RunRecordError
from ptqcal.evaluate.results import FLOAT_NAME
from ptqcal.quantize.spec import stored_bits

if TYPE_CHECKING:
    from .run_analysis import RunAnalysis

ORDERS = ("smallest", "fastest")
ORDER = "smallest"
ALLOW_SLOWER = False
MAX_DELTA_ERROR = 0.01  # top-1 error at most 1 percentage point above float's
MAX_CONFIDENT_SWAPPED = 0.01  # at most 1% of the float model's confident predictions swapped
MIN_CONFIDENT = 20  # fewer confident float predictions: the confident-swap threshold means little
# run settings (RunConfig) -> Objective: the field after the "ship_" of each
SETTINGS = {f"ship_{name}": name for name in ("max_delta_error", "max_confident_swapped", "allow_slower")}
SETTINGS["ship_objective"] = "order"
RECOMMENDATION_FILE = "recommendation.json"
RECOMMENDATION_FORMAT = 1
_TOLERANCE = 1e-12  # a count / N against a threshold given as a decimal fraction
CONTAINERS = {8: "int8", 4: "int4", 2: "int2"}


@dataclass(frozen=True)
class Objective:
    """What "the configuration to ship" means: the order, and the thresholds (fractions)."""

    order: str = ORDER
    max_delta_error: float = MAX_DELTA_ERROR
    max_confident_swapped: float = MAX_CONFIDENT_SWAPPED
    # a configuration slower than the float model (beyond noise) on this CPU replaces it at a loss:
    # not shipped unless asked
    allow_slower: bool = ALLOW_SLOWER

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}: one of {', '.join(ORDERS)}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Objective":
        """The objective a run recorded (its settings), the defaults for what it did not."""
        return cls(**{field: settings[key] for key, field in SETTINGS.items() if settings.get(key) is not None})

    def words(self) -> str:
        from .judgement import CONFIDENT

        order = "smallest, then fastest" if self.order == "smallest" else "fastest, then smallest"
        return (f"{order} on this CPU with top-1 error at most {100 * self.max_delta_error:g} pp above float's and at "
                f"most {100 * self.max_confident_swapped:g}% of the float model's confident (≥ {100 * CONFIDENT:.0f}%) "
                "predictions swapped" + ("" if self.allow_slower else ", not slower than float"))

    def short(self) -> str:
        """The objective in a few words (the console's)."""
        order = "smallest then fastest" if self.order == "smallest" else "fastest then smallest"
        return (f"{order} within +{100 * self.max_delta_error:g} pp top-1 error and "
                f"{100 * self.max_confident_swapped:g}% confident swaps")

    def to_json(self) -> dict[str, Any]:
        from .judgement import CONFIDENT

        return {"order": self.order, "max_delta_top1_error": self.max_delta_error,
                "max_confident_swapped": self.max_confident_swapped, "confident": CONFIDENT,
                "min_confident": MIN_CONFIDENT, "allow_slower": self.allow_slower}


@dataclass(frozen=True)
class Candidate:
    """One configuration as the recommendation weighs it (fractions; ``index``: the run's order)."""

    name: str
    kind: ConfigKind
    index: int
    numbers: Deployment | None
    top1_error: float
    delta_top1_error: float
    swapped: float
    confident_swapped: int
    confident: int
    speed: Ratio | None  # images/s over the float model's
    collapsed: bool
    failures: tuple[str, ...]  # the thresholds it is outside of, in words
    weight_bits: int | None = None
    act_bits: int | None = None

    @property
    def eligible(self) -> bool:
        return self.numbers is not None and not self.collapsed and not self.failures

    @property
    def confident_share(self) -> float:
        return self.confident_swapped / self.confident if self.confident else 0.0

    @property
    def weight_bytes(self) -> int:
        return self.numbers.weight_bytes if self.numbers is not None else 0


@dataclass(frozen=True)
class Outcome:
    """Why a configuration won or lost: ``outcome`` (see the module docstring), in words."""

    config: str
    outcome: str
    reason: str
    equal_to: str | None = None


@dataclass(frozen=True)
class Recommendation:
    """The configuration to ship for ``objective``, the runner-up and every other one's outcome."""

    model: str
    objective: Objective
    candidates: tuple[Candidate, ...]
    ranked: tuple[str, ...]  # the eligible configurations, best first
    outcomes: dict[str, Outcome]
    warnings: tuple[str, ...]
    float_confident: int

    @property
    def choice(self) -> str | None:
        """The configuration to ship; ``None`` when none can be weighed (the run recorded no sizes)."""
        return self.ranked[0] if self.ranked else None

    @property
    def runner_up(self) -> str | None:
        return self.ranked[1] if len(self.ranked) > 1 else None

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)


def same_kernels(a: Candidate, b: Candidate) -> bool:
    """Whether ``a`` and ``b`` are uniform configurations whose weights sit in the same container
    (a8w7 and a8w5 in int8, as a8w8) at the same activation width: the same graph of the same
    kernels, so the same speed by construction (a measured difference between them is noise)."""
    return a.kind is ConfigKind.UNIFORM and b.kind is ConfigKind.UNIFORM and a.act_bits == b.act_bits and \
        stored_bits(a.weight_bits) == stored_bits(b.weight_bits)


def faster(a: Candidate, b: Candidate) -> bool:
    """Whether ``a`` is faster than ``b`` beyond noise (the range of their ratio above 1), never
    between two configurations of :func:`same_kernels`."""
    if a.numbers is None or b.numbers is None or same_kernels(a, b):
        return False
    ratio = speed_ratio(a.numbers, b.numbers)
    return ratio is not None and ratio.verdict == "above"


def same_speed(a: Candidate, b: Candidate) -> bool:
    """Neither is faster than the other beyond noise (or neither was timed)."""
    return not faster(a, b) and not faster(b, a)


def _candidate(run: "RunAnalysis", index: int, objective: Objective, float_confident: int) -> Candidate:
    from .judgement import COLLAPSED, CONFIDENT

    config = run.configs[index]
    info = run.descriptor(config.name)
    numbers, reference = run.record.deployment.get(config.name), run.record.deployment.get(FLOAT_NAME)
    m, change = config.metrics, config.change
    flipped, held = (0, float_confident) if change is None else change.confident_swaps(CONFIDENT)
    delta, swapped = (0.0, 0.0) if change is None else (m.delta_top1_error, m.swapped)
    failures = []
    if delta > objective.max_delta_error + _TOLERANCE:
        failures.append(f"top-1 error {100 * delta:+.2f} pp from float's (at most {100 * objective.max_delta_error:g} "
                        "pp)")
    if held and flipped / held > objective.max_confident_swapped + _TOLERANCE:
        failures.append(f"{100 * flipped / held:.2f}% of the {held} confident predictions swapped ({flipped}; at most "
                        f"{100 * objective.max_confident_swapped:g}%)")
    speed = None if numbers is None or reference is None else speed_ratio(numbers, reference)
    if not objective.allow_slower and info.kind is not ConfigKind.FLOAT and speed is not None and \
            speed.verdict == "below":
        failures.append(f"slower than float on this CPU ({speed.text()} its images/s)")
    return Candidate(config.name, info.kind, index, numbers, m.top1_error, delta, swapped, flipped, held, speed,
                     swapped >= COLLAPSED, tuple(failures), info.weight_bits, info.act_bits)


def _pick(pool: Sequence[Candidate], order: str) -> Candidate:
    """The best of ``pool`` under ``order`` (see the module docstring)."""
    def unbeaten(group: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in group if not any(faster(other, c) for other in group)]

    def fewest_bytes(group: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in group if c.weight_bytes == min(o.weight_bytes for o in group)]

    best = unbeaten(fewest_bytes(pool)) if order == "smallest" else fewest_bytes(unbeaten(pool))
    return min(best, key=lambda c: (c.top1_error, c.confident_share, c.swapped, c.index))


def rank(candidates: Sequence[Candidate], order: str) -> list[Candidate]:
    """The eligible ``candidates``, best first."""
    rest, ranked = [c for c in candidates if c.eligible], []
    while rest:
        ranked.append(_pick(rest, order))
        rest.remove(ranked[-1])
    return ranked


def _equal_words(twin: Candidate, c: Candidate, plural: bool = False) -> str:
    """How ``c`` (or several like it) costs what ``twin`` costs, as a verb phrase."""
    if same_kernels(twin, c):
        container = CONTAINERS.get(stored_bits(c.weight_bits), f"{stored_bits(c.weight_bits)}-bit")
        return f"{'store and run' if plural else 'stores and runs'} as {twin.name} does: {container} containers"
    speed = "speed within noise" if twin.numbers is not None and twin.numbers.timed else "speed (not measured)"
    return f"{'have' if plural else 'has'} the same stored weight bytes as {twin.name} and the same {speed}"


def _tie_words(twin: Candidate, c: Candidate) -> str:
    """By what ``twin`` ranks above ``c`` when they cost the same."""
    if twin.top1_error < c.top1_error:
        return f"top-1 error {100 * twin.top1_error:.2f}% vs {100 * c.top1_error:.2f}%"
    if twin.confident_share < c.confident_share:
        return f"confident swaps {twin.confident_swapped} vs {c.confident_swapped}"
    if twin.swapped < c.swapped:
        return f"swaps {100 * twin.swapped:.2f}% vs {100 * c.swapped:.2f}%"
    return "the run's order (as good on every count)"


def _outcome(c: Candidate, ranked: Sequence[Candidate], order: str) -> Outcome:
    """Why ``c`` is where it is."""
    if c.numbers is None:
        return Outcome(c.name, "unsized", "the run recorded no size of it, so it cannot be weighed")
    if c.collapsed:
        return Outcome(c.name, "collapsed", f"collapsed: {100 * c.swapped:.1f}% of its predictions changed")
    if c.failures:
        return Outcome(c.name, "outside", "outside the thresholds: " + "; ".join(c.failures))
    place = ranked.index(c)
    if place == 0:
        return Outcome(c.name, "chosen", "the choice")
    better, choice = ranked[:place], ranked[0]
    twin = next((b for b in better if b.weight_bytes == c.weight_bytes and same_speed(b, c)), None)
    if twin is not None:
        return Outcome(c.name, "equal_cost", f"{_equal_words(twin, c)}; {twin.name} ranks above it by "
                                             f"{_tie_words(twin, c)}", twin.name)
    quicker = next((b for b in better if b.weight_bytes == c.weight_bytes and faster(b, c)), None)
    if quicker is not None:
        ratio = speed_ratio(c.numbers, quicker.numbers)
        return Outcome(c.name, "slower", f"stores as many weight bytes as {quicker.name} and is slower "
                                         f"({ratio.text()} its images/s)", quicker.name)
    size = f"stores {c.weight_bytes / max(choice.weight_bytes, 1):.2f}× {choice.name}'s weight bytes"
    if order == "fastest" and faster(choice, c):
        ratio = speed_ratio(c.numbers, choice.numbers)
        return Outcome(c.name, "slower_than_choice", f"slower than {choice.name} ({ratio.text()} its images/s)",
                       choice.name)
    return Outcome(c.name, "larger", size + (" at the same speed within noise" if order == "fastest" else ""),
                   choice.name)


def recommend(run: "RunAnalysis", objective: Objective | None = None) -> Recommendation:
    """The configuration of ``run`` to ship for ``objective`` (default: the run's settings, else
    this module's defaults), the runner-up, and why each other configuration loses."""
    try:
        objective = objective or Objective.from_settings(run.record.settings)
    except (TypeError, ValueError) as exc:  # a tampered run.json: one line, not a traceback
        raise RunRecordError(f"{run.folder} holds a damaged ptqcal run (its recommendation settings: {exc})") from None
    float_confident = _float_confident(run)
    candidates = tuple(_candidate(run, i, objective, float_confident) for i in range(len(run.configs)))
    ranked = rank(candidates, objective.order)
    outcomes = {c.name: _outcome(c, ranked, objective.order) for c in candidates}
    for c in candidates:  # slower than float is said of every loser it is true of
        if outcomes[c.name].outcome not in ("chosen", "collapsed", "unsized") and c.speed is not None and \
                c.speed.verdict == "below" and "slower than float" not in outcomes[c.name].reason:
            o = outcomes[c.name]
            outcomes[c.name] = Outcome(o.config, o.outcome, f"{o.reason}; and slower than float ({c.speed.text()} its "
                                                            "images/s)", o.equal_to)
    partial = Recommendation(run.name, objective, candidates, tuple(c.name for c in ranked), outcomes, (),
                             float_confident)
    return Recommendation(run.name, objective, candidates, partial.ranked, outcomes,
                          tuple(_warnings(run, partial)), float_confident)


def _float_confident(run: "RunAnalysis") -> int:
    """How many predictions the float model holds with at least :data:`~.judgement.CONFIDENT` confidence."""
    from ptqcal.evaluate.metrics import softmax

    from .judgement import CONFIDENT

    for config in run.quantized:  # the count every configuration's confident swaps are out of
        if config.change is not None:
            return config.change.confident_swaps(CONFIDENT)[1]
    return int((softmax(run.reference.logits.astype("float64")).max(axis=1) >= CONFIDENT).sum())


def _warnings(run: "RunAnalysis", rec: Recommendation) -> list[str]:
    """What the reader should know before shipping the choice: it or the mixed model is slower than
    float, too few confident predictions to judge swaps by, timings missing or without a spread."""
    from .judgement import CONFIDENT, slow_reason

    if rec.choice is None:
        return ["The run recorded no size of its configurations, so none can be recommended."]
    said, choice = [], rec.candidate(rec.choice)
    if choice.name == FLOAT_NAME and len(rec.candidates) > 1:
        said.append("No quantized configuration with a recorded size is within the thresholds: ship the float model.")
    slow = [c for c in rec.candidates if c.speed is not None and c.speed.verdict == "below"
            and (c.name == rec.choice or c.kind is ConfigKind.MIXED)]
    for c in slow:
        why = slow_reason(run, c.name, same=False)
        said.append(f"{c.name}{' (the choice)' if c.name == rec.choice else ''} is slower than float on this CPU "
                    f"({c.speed.text()} its images/s){': ' + why if why else ''}.")
    if choice.speed is not None and choice.speed.verdict == "below":
        alternative = next((rec.candidate(n) for n in rec.ranked if rec.candidate(n).speed is None
                            or rec.candidate(n).speed.verdict != "below"), None)
        if alternative is not None:
            said.append(f"Where speed matters more than size, {alternative.name} is the best-ranked configuration "
                        "that is not slower than float.")
    if rec.float_confident < MIN_CONFIDENT:
        said.append(f"The float model holds only {rec.float_confident} predictions with at least "
                    f"{100 * CONFIDENT:.0f}% confidence (fewer than {MIN_CONFIDENT}): the confident-swap threshold "
                    "rests on too few to mean much; the top-1 error threshold decides.")
    timed = [c for c in rec.candidates if c.numbers is not None and c.numbers.timed]
    if not timed:
        said.append("The run was not timed: the configurations are ranked by size and error only, not by speed.")
    elif all(c.speed is None or c.speed.verdict == "unjudged" for c in timed):
        said.append("The run kept no spread of its timings (an older ptqcal): no speed is called faster or slower "
                    "than another, so equal sizes are ranked by error.")
    return said


def _facts(rec: Recommendation, c: Candidate) -> str:
    """A configuration's size, speed, error and confident swaps against the float model's, in words."""
    reference = rec.candidate(FLOAT_NAME).numbers if any(x.name == FLOAT_NAME for x in rec.candidates) else None
    parts = []
    if reference is not None and c.numbers is not None and c.name != FLOAT_NAME:
        parts.append(f"{c.weight_bytes / max(reference.weight_bytes, 1):.3f}× float's weight bytes")
        if c.speed is not None:
            parts.append(f"{c.speed.text()} its images/s")
    parts.append(f"top-1 error {100 * c.top1_error:.2f}% ({100 * c.delta_top1_error:+.2f} pp)")
    parts.append(f"{c.confident_swapped} of {c.confident} confident predictions swapped" if c.confident else
                 "no confident prediction to swap")
    return ", ".join(parts)


def sentence(rec: Recommendation) -> str:
    """The recommendation in one line (the console's): the choice, its numbers, the runner-up."""
    if rec.choice is None:
        return f"{rec.model}: no recommendation (the run recorded no size of its configurations)"
    runner = rec.runner_up
    second = "" if runner is None else f"; runner-up {runner} ({rec.outcomes[runner].reason})"
    return f"{rec.model}: ship {rec.choice} ({rec.objective.short()}): {_facts(rec, rec.candidate(rec.choice))}{second}"


def _equal_cost_lines(rec: Recommendation) -> list[str]:
    """One bullet per configuration others cost the same as: who, how, and by what it ranks above them."""
    from .markdown import md

    twins: dict[str, list[Candidate]] = {}
    for o in rec.outcomes.values():
        if o.outcome == "equal_cost":
            twins.setdefault(o.equal_to, []).append(rec.candidate(o.config))
    lines = []
    for name, members in twins.items():
        twin = rec.candidate(name)
        hows = {_equal_words(twin, m, len(members) > 1) for m in members}
        how = hows.pop() if len(hows) == 1 else f"cost what {name} costs (same stored bytes, same speed within noise)"
        ties = ", ".join(f"{m.name} by {_tie_words(twin, m)}" for m in members)
        lines.append(f"- **{md(', '.join(m.name for m in members))}** (equal cost): {md(how)}; {md(name)} ranks above "
                     f"{md(ties)}")
    return lines


def recommendation_lines(rec: Recommendation) -> list[str]:
    """The top of a model's report section: the choice, why each other configuration loses, warnings."""
    from .markdown import md

    if rec.choice is None:
        return ["**What to ship**: no recommendation: the run recorded no size of its configurations, so none can "
                "be weighed."]
    runner = rec.runner_up
    second = f" Runner-up: **{md(runner)}** ({md(rec.outcomes[runner].reason)})." if runner else ""
    head = (f"**What to ship**: **{md(rec.choice)}** — {md(_facts(rec, rec.candidate(rec.choice)))}.{second} "
            f"Objective: the {md(rec.objective.words())}; every other configuration, and why it loses:")
    bullets = _equal_cost_lines(rec)
    bullets += [f"- **{md(o.config)}** ({o.outcome.replace('_', ' ')}): {md(o.reason)}" for o in rec.outcomes.values()
                if o.outcome not in ("chosen", "equal_cost")]
    bullets += [f"- **Warning**: {md(w)}" for w in rec.warnings]
    return [head, "\n".join(bullets), "The same, for machines: recommendation.json."]


def _strict(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _config_json(rec: Recommendation, c: Candidate) -> dict[str, Any]:
    reference = next((x.numbers for x in rec.candidates if x.name == FLOAT_NAME), None)
    o = rec.outcomes[c.name]
    speed = None if c.speed is None else {k: _strict(getattr(c.speed, k)) for k in ("value", "low", "high")}
    return {"config": c.name, "kind": str(c.kind), "rank": rec.ranked.index(c.name) + 1 if c.name in rec.ranked
            else None, "outcome": o.outcome, "reason": o.reason, "equal_to": o.equal_to,
            "weight_bytes": None if c.numbers is None else c.weight_bytes,
            "weight_vs_float": None if c.numbers is None or reference is None else
            c.weight_bytes / max(reference.weight_bytes, 1), "top1_error": _strict(c.top1_error),
            "delta_top1_error": _strict(c.delta_top1_error), "swapped": _strict(c.swapped),
            "confident_swapped": c.confident_swapped, "confident": c.confident, "speed_vs_float": speed}


def recommendation_json(recommendations: Sequence[Recommendation]) -> str:
    """``recommendation.json`` (see the module docstring)."""
    runs = [{"model": r.model, "objective": r.objective.to_json(), "choice": r.choice, "runner_up": r.runner_up,
             "float_confident": r.float_confident, "sentence": sentence(r), "warnings": list(r.warnings),
             "configs": [_config_json(r, c) for c in r.candidates]} for r in recommendations]
    return json.dumps({"format": RECOMMENDATION_FORMAT, "runs": runs}, indent=2, allow_nan=False) + "\n"
