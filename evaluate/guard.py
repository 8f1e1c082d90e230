"""The float fallback guard: deploy a quantized configuration Q and send an input to the float model
when Q's confidence score is below a threshold (pure numpy).

Q runs on every input; a routed input takes the float model's prediction, so a routed swap (Q's
top-1 differs from float's) is caught. The threshold is chosen on held-out images
(:func:`guard_curve`, :func:`choose_threshold`) and judged on others (:func:`judge`). A threshold
``t`` routes every input with ``score < t``: ``-inf`` routes nothing, ``+inf`` everything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .metrics import CONFIDENT
from .selective import SCORES, confidence_score

_TOLERANCE = 1e-12  # a count / N against a target given as a decimal fraction


def _swaps(quant_logits, float_logits, labels, confident):
    """Per input: swapped, confident swap (as ``QuantizationChange.confident_swaps``), Q wrong, float wrong."""
    quant_pred, float_pred = np.asarray(quant_logits).argmax(axis=1), np.asarray(float_logits).argmax(axis=1)
    swapped = quant_pred != float_pred
    held = confidence_score(float_logits, "msp") >= confident
    return swapped, swapped & held, quant_pred != labels, float_pred != labels


@dataclass(frozen=True)
class GuardCurve:
    """The guard at every distinct threshold of Q's score, routing least first (fractions).

    Row ``i`` routes ``score < threshold[i]``: the first row routes nothing (``-inf``), the last
    everything (``+inf``), each other row starts at a distinct score. ``swaps_caught`` is the share
    of swaps routed (NaN when Q swapped nothing), ``confident_caught`` that of confident swaps (NaN
    without one); ``differing`` is the unrouted swaps over all inputs; ``guarded_error`` the top-1
    error when routed inputs take float's prediction.
    """

    score: str
    confident: float
    images: int
    swaps: int
    confident_swaps: int
    threshold: np.ndarray
    routed: np.ndarray
    swaps_caught: np.ndarray
    confident_caught: np.ndarray
    differing: np.ndarray
    guarded_error: np.ndarray


def guard_curve(quant_logits: np.ndarray, float_logits: np.ndarray, labels: np.ndarray, score: str = "msp",
                confident: float = CONFIDENT) -> GuardCurve:
    """:class:`GuardCurve` of Q (``quant_logits``) guarded by the float model on the same images.

    Sorts once and accumulates, so 50,000 images take milliseconds after the scores.
    """
    swapped, confident_swap, quant_wrong, float_wrong = _swaps(quant_logits, float_logits, labels, confident)
    s = confidence_score(quant_logits, score)
    n = len(s)
    order = np.argsort(s, kind="stable")
    ranked = s[order]
    cuts = np.concatenate([[0], np.flatnonzero(ranked[1:] != ranked[:-1]) + 1, [n]]) if n else np.zeros(1, int)
    threshold = np.concatenate([[-np.inf], ranked[cuts[1:-1]], [np.inf]]) if n else np.array([-np.inf])

    def routed_sum(x):  # how many of the lowest ``cuts`` inputs have x
        return np.concatenate([[0], np.cumsum(x[order])])[cuts]

    caught, confident_hits = routed_sum(swapped), routed_sum(confident_swap)
    swaps, confident_swaps = int(swapped.sum()), int(confident_swap.sum())
    return GuardCurve(score, confident, n, swaps, confident_swaps, threshold, cuts / max(n, 1),
                      caught / swaps if swaps else np.full(len(cuts), np.nan),
                      confident_hits / confident_swaps if confident_swaps else np.full(len(cuts), np.nan),
                      (swaps - caught) / max(n, 1),
                      (quant_wrong.sum() - routed_sum(quant_wrong) + routed_sum(float_wrong)) / max(n, 1))


def swap_auroc(quant_logits: np.ndarray, float_logits: np.ndarray, score: str = "msp") -> float:
    """How well a low score of Q predicts a swap: the chance a random swapped input scores below a
    random kept one, ties counting half (Mann-Whitney). NaN when all or none swapped."""
    swapped = np.asarray(quant_logits).argmax(axis=1) != np.asarray(float_logits).argmax(axis=1)
    s = confidence_score(quant_logits, score)
    kept = len(s) - int(swapped.sum())
    if swapped.all() or not swapped.any():
        return float("nan")
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based ranks, ties at their mean
    u_kept = mean_rank[inverse][~swapped].sum() - kept * (kept + 1) / 2  # pairs kept above swapped
    return float(u_kept / (kept * (len(s) - kept)))


@dataclass(frozen=True)
class GuardTarget:
    """What the guard must achieve: at most ``max_differing`` of predictions still differing from
    float after guarding, or at most ``max_routed`` of inputs sent to float (exactly one)."""

    max_differing: float | None = None
    max_routed: float | None = None

    def __post_init__(self):
        given = [(k, v) for k, v in asdict(self).items() if v is not None]
        if len(given) != 1:
            raise ValueError("a guard target needs exactly one of max_differing and max_routed")
        name, value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"guard target {name} must be a fraction in [0, 1], got {value!r}")


def choose_threshold(curve: GuardCurve, target: GuardTarget) -> float:
    """The threshold of ``curve`` that meets ``target`` on the curve's own images.

    ``max_differing``: the one routing fewest. ``max_routed``: the one leaving fewest swaps
    unrouted, then routing fewest. A target is always met: routing everything leaves nothing
    differing (``+inf`` is returned when only that does), routing nothing routes none (``-inf``
    is returned when that is best, e.g. when Q swapped nothing).
    """
    if target.max_differing is not None:  # differing falls as routing grows: the first row that meets it
        return float(curve.threshold[np.argmax(curve.differing <= target.max_differing + _TOLERANCE)])
    allowed = np.flatnonzero(curve.routed <= target.max_routed + _TOLERANCE)  # rows 0..k, never empty
    return float(curve.threshold[allowed[np.argmin(curve.differing[allowed])]])  # first of the minima


@dataclass(frozen=True)
class GuardRates:
    """A guard's rates on ``images`` images (fractions; a ``caught`` share is NaN with nothing to catch)."""

    images: int
    swapped: float  # Q's top-1 differing from float's, unguarded
    routed: float
    swaps_caught: float
    confident_caught: float
    differing: float  # swaps not routed, over all images
    guarded_error: float


def judge(guard_threshold: float, quant_logits: np.ndarray, float_logits: np.ndarray, labels: np.ndarray,
          score: str = "msp", confident: float = CONFIDENT) -> GuardRates:
    """The :class:`GuardRates` of routing ``score < guard_threshold`` on these images: pass images
    the threshold was not chosen on, to judge it."""
    swapped, confident_swap, quant_wrong, float_wrong = _swaps(quant_logits, float_logits, labels, confident)
    routed = confidence_score(quant_logits, score) < guard_threshold
    n = max(len(routed), 1)

    def share(part, whole):
        return float(part.sum() / whole.sum()) if whole.any() else float("nan")

    return GuardRates(len(routed), float(swapped.sum() / n), float(routed.sum() / n), share(swapped & routed, swapped),
                      share(confident_swap & routed, confident_swap), float((swapped & ~routed).sum() / n),
                      float(np.where(routed, float_wrong, quant_wrong).sum() / n))


def expected_cost(routed: float, quant_latency_s: float, float_latency_s: float) -> tuple[float, float]:
    """Mean per-image time of the guarded system (Q on every input, float on the ``routed`` share
    after it) and its ratio to float alone. A routed input itself takes both: this is the mean,
    not the tail."""
    expected = quant_latency_s + routed * float_latency_s
    return expected, expected / float_latency_s


def expected_throughput(routed: float, quant_throughput: float, float_throughput: float) -> float:
    """Images/s of the guarded system run batch after batch: seconds per image add as in
    :func:`expected_cost`."""
    return 1.0 / (1.0 / quant_throughput + routed / float_throughput)


@dataclass(frozen=True)
class Guard:
    """A chosen guard for configuration ``config``: route to float when Q's ``score`` is below
    ``threshold``. Chosen for ``target`` on ``chosen_on`` held-out images (``held_out`` rates) and
    judged on the evaluation images (``evaluation``); latencies are batch 1, ``None`` if untimed."""

    config: str
    score: str
    threshold: float
    target: GuardTarget
    chosen_on: int
    held_out: GuardRates
    evaluation: GuardRates
    quant_latency_ms: float | None = None
    float_latency_ms: float | None = None

    def __post_init__(self):
        if math.isnan(self.threshold):
            raise ValueError("a guard's threshold must be a number or +-inf, not NaN")

    def _expected(self) -> tuple[float, float] | None:
        if self.quant_latency_ms is None or self.float_latency_ms is None:
            return None
        return expected_cost(self.evaluation.routed, self.quant_latency_ms, self.float_latency_ms)

    @property
    def expected_latency_ms(self) -> float | None:
        """Mean per-image latency at the evaluation images' routed share (:func:`expected_cost`)."""
        return None if self._expected() is None else self._expected()[0]

    @property
    def latency_vs_float(self) -> float | None:
        """:attr:`expected_latency_ms` over the float model's latency (below 1: the guard saves time)."""
        return None if self._expected() is None else self._expected()[1]

    def to_json(self) -> dict:
        """Strict JSON values: NaN is written ``null``, an infinite threshold ``"inf"``/``"-inf"``."""
        def clean(values):
            return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}

        return {**clean(asdict(self)), "target": asdict(self.target), "held_out": clean(asdict(self.held_out)),
                "evaluation": clean(asdict(self.evaluation)),
                "threshold": self.threshold if math.isfinite(self.threshold) else str(self.threshold)}

    @classmethod
    def from_json(cls, values: dict) -> "Guard":
        """The guard :meth:`to_json` wrote; ``null`` rates read back as NaN. Raises ``ValueError``
        naming the first key of the wrong type."""
        _keys(values, cls, "guard")
        threshold = values["threshold"]
        if threshold in ("inf", "-inf"):
            threshold = float(threshold)
        number = (int, float)
        for key, kinds in (("config", str), ("score", str), ("threshold", number), ("chosen_on", int),
                           ("quant_latency_ms", number + (type(None),)), ("float_latency_ms", number + (type(None),))):
            _check(key, values[key] if key != "threshold" else threshold, kinds)
        if values["score"] not in SCORES:
            raise ValueError(f"guard score {values['score']!r} is not one of {', '.join(SCORES)}")
        return cls(values["config"], values["score"], float(threshold), GuardTarget(**_keys(values["target"],
                   GuardTarget, "guard target")), values["chosen_on"], _rates(values["held_out"]),
                   _rates(values["evaluation"]), values["quant_latency_ms"], values["float_latency_ms"])


def fit_guard(config: str, target: GuardTarget, held_out: tuple, evaluation: tuple, score: str = "msp",
              confident: float = CONFIDENT, quant_latency_ms: float | None = None,
              float_latency_ms: float | None = None) -> Guard:
    """The :class:`Guard` of ``config`` whose threshold meets ``target`` on ``held_out`` images and
    nothing else, judged on ``evaluation`` ones; each is (quant logits, float logits, labels)."""
    threshold = choose_threshold(guard_curve(*held_out, score, confident), target)
    return Guard(config, score, threshold, target, len(held_out[2]), judge(threshold, *held_out, score, confident),
                 judge(threshold, *evaluation, score, confident), quant_latency_ms, float_latency_ms)


def best_guard(config: str, target: GuardTarget, held_out: tuple, evaluation: tuple,
               quant_latency_ms: float | None = None, float_latency_ms: float | None = None,
               confident: float = CONFIDENT) -> tuple[Guard, dict[str, Guard]]:
    """The guard of ``config`` under each score of :data:`SCORES`, and the one to deploy: the score
    that meets ``target`` on the held-out images routing the fewest (``max_differing``) or leaving
    the fewest swaps (``max_routed``), the earlier score on a tie. Chosen on ``held_out`` only."""
    guards = {score: fit_guard(config, target, held_out, evaluation, score, confident, quant_latency_ms,
                               float_latency_ms) for score in SCORES}

    def cost(score: str) -> tuple[float, float, int]:
        rates = guards[score].held_out
        first, second = (rates.routed, rates.differing) if target.max_differing is not None \
            else (rates.differing, rates.routed)
        return first, second, SCORES.index(score)

    return guards[min(guards, key=cost)], guards


def _check(key, value, kinds):
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"guard field {key!r} has the wrong type ({type(value).__name__})")


def _keys(values, cls, what):
    if not isinstance(values, dict) or set(values) != {f.name for f in fields(cls)}:
        raise ValueError(f"{what} JSON must be an object with exactly the keys of {cls.__name__}")
    return values


def _rates(values) -> GuardRates:
    _keys(values, GuardRates, "guard rates")
    _check("images", values["images"], int)
    for f in fields(GuardRates)[1:]:
        _check(f.name, values[f.name], (int, float, type(None)))
    return GuardRates(**{k: v if k == "images" else float("nan") if v is None else float(v) for k, v in values.items()})


def route_to_float(logits: np.ndarray, guard: Guard) -> np.ndarray:
    """Which inputs of a batch to send to the float model, given Q's ``logits`` on them: those whose
    ``guard.score`` is below ``guard.threshold`` (bool, (N,)).

    Examples
    --------
    >>> guard = Guard.from_json(json.load(open("guard.json")))       # doctest: +SKIP
    >>> quant = q_session.run(None, {"input": batch})[0]             # doctest: +SKIP
    >>> routed = route_to_float(quant, guard)                        # doctest: +SKIP
    >>> predictions = quant.argmax(axis=1)                           # doctest: +SKIP
    >>> if routed.any():                                             # doctest: +SKIP
    ...     predictions[routed] = float_session.run(None, {"input": batch[routed]})[0].argmax(axis=1)
    """
    return confidence_score(logits, guard.score) < guard.threshold
