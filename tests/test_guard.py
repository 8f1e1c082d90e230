"""The float fallback guard against hand-built cases and a slow threshold-by-threshold computation."""

import json
import math
import time
from dataclasses import replace

import numpy as np
import pytest

from ptqcal.evaluate.guard import (Guard, GuardRates, GuardTarget, choose_threshold, expected_cost,
                                   expected_throughput, fit_guard, guard_curve, judge, route_to_float, swap_auroc)
from ptqcal.evaluate.selective import SCORES, confidence_score


def synthetic(n, swap_fraction, seed, classes=5, decimals=None):
    """Q swaps exactly its lowest-margin inputs: a swapped input's only non-zero logit is in
    (0.1, 1), a kept one's in (1.5, 5), so every score ranks all swaps below all kept inputs."""
    rng = np.random.default_rng(seed)
    float_logits = rng.normal(size=(n, classes)) * 3
    float_pred = float_logits.argmax(axis=1)
    labels = np.where(rng.uniform(size=n) < 0.7, float_pred, rng.integers(0, classes, n))
    swapped = rng.permutation(n) < round(swap_fraction * n)
    quant_pred = np.where(swapped, (float_pred + 1) % classes, float_pred)
    margin = np.where(swapped, rng.uniform(0.1, 1, n), rng.uniform(1.5, 5, n))
    if decimals is not None:
        margin = np.round(margin, decimals)
    quant_logits = np.zeros((n, classes))
    quant_logits[np.arange(n), quant_pred] = margin
    return quant_logits, float_logits, labels


def noisy(n, seed, classes=5):
    """Q = float plus noise: swaps happen mostly, not only, at low scores (scores tie at 1 decimal)."""
    rng = np.random.default_rng(seed)
    float_logits = rng.normal(size=(n, classes)) * 2
    quant_logits = np.round(float_logits + rng.normal(size=(n, classes)) * 0.6, 1)
    labels = np.where(rng.uniform(size=n) < 0.6, float_logits.argmax(axis=1), rng.integers(0, classes, n))
    return quant_logits, float_logits, labels


def slow_rates(threshold, quant_logits, float_logits, labels, score, confident=0.9):
    """The guard's rates at one threshold, by hand."""
    routed = confidence_score(quant_logits, score) < threshold
    quant_pred, float_pred = quant_logits.argmax(axis=1), float_logits.argmax(axis=1)
    p = np.exp(float_logits - float_logits.max(axis=1, keepdims=True))
    held = (p / p.sum(axis=1, keepdims=True)).max(axis=1) >= confident
    swapped = quant_pred != float_pred
    answer = np.where(routed, float_pred, quant_pred)
    caught = swapped[routed].sum() / swapped.sum() if swapped.any() else math.nan
    confident_caught = (swapped & held & routed).sum() / (swapped & held).sum() if (swapped & held).any() else math.nan
    return dict(routed=routed.mean(), swaps_caught=caught, confident_caught=confident_caught,
                differing=np.mean(answer != float_pred), guarded_error=np.mean(answer != labels))


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("data", [lambda: synthetic(400, 0.1, 0, decimals=1), lambda: noisy(400, 1)])
def test_curve_against_slow_rates(score, data):
    q, f, y = data()
    curve = guard_curve(q, f, y, score)
    s = confidence_score(q, score)
    assert curve.threshold[0] == -np.inf and curve.threshold[-1] == np.inf
    assert curve.threshold[1:-1].tolist() == np.unique(s)[1:].tolist()  # every cut between distinct scores
    assert curve.routed[0] == 0 and curve.routed[-1] == 1 and np.all(np.diff(curve.routed) > 0)
    for i, t in enumerate(curve.threshold):
        slow = slow_rates(t, q, f, y, score)
        for key, value in slow.items():
            assert getattr(curve, key)[i] == pytest.approx(value, nan_ok=True), (key, i)
        assert judge(t, q, f, y, score).routed == pytest.approx(slow["routed"])


@pytest.mark.parametrize("score", SCORES)
def test_swaps_at_lowest_scores_are_caught_perfectly(score):
    q, f, y = synthetic(1000, 0.08, 2)
    curve = guard_curve(q, f, y, score)
    assert curve.confident_swaps > 0  # the confident rate is exercised too
    assert swap_auroc(q, f, score) == 1.0
    at_swaps = np.flatnonzero(np.isclose(curve.routed, 0.08))
    assert len(at_swaps) == 1
    i = at_swaps[0]
    assert curve.swaps_caught[i] == 1.0 and curve.confident_caught[i] == 1.0 and curve.differing[i] == 0.0
    assert curve.swaps_caught[i - 1] < 1.0  # one fewer routed misses a swap
    t = choose_threshold(curve, GuardTarget(max_differing=0.0))
    assert t == curve.threshold[i]
    assert judge(t, q, f, y, score).routed == pytest.approx(0.08)


def test_swap_auroc_against_pairwise_count():
    q, f, _ = noisy(120, 5)
    for score in SCORES:
        s = confidence_score(q, score)
        swapped = q.argmax(axis=1) != f.argmax(axis=1)
        pairs = [(a < b) + 0.5 * (a == b) for a in s[swapped] for b in s[~swapped]]
        assert swap_auroc(q, f, score) == pytest.approx(np.mean(pairs))


def test_without_swaps_caught_is_nan_and_nothing_is_routed():
    _, f, y = noisy(100, 3)
    curve = guard_curve(f, f, y)
    assert curve.swaps == 0 and np.all(np.isnan(curve.swaps_caught)) and np.all(np.isnan(curve.confident_caught))
    assert choose_threshold(curve, GuardTarget(max_differing=0.0)) == -np.inf
    assert choose_threshold(curve, GuardTarget(max_routed=0.5)) == -np.inf
    assert math.isnan(swap_auroc(f, f))
    q = f.copy()
    q[:, 0], q[:, 1] = f[:, 1], f[:, 0]
    q[np.arange(100), f.argmax(axis=1)] = -100  # every prediction swapped
    assert math.isnan(swap_auroc(q, f))


@pytest.mark.parametrize("limit", [0.0, 0.005, 0.02, 0.05, 0.2])
def test_chosen_threshold_meets_its_target_with_least_routing(limit):
    q, f, y = noisy(600, 4)
    curve = guard_curve(q, f, y, "margin")
    t = choose_threshold(curve, GuardTarget(max_differing=limit))
    rates = slow_rates(t, q, f, y, "margin")
    assert rates["differing"] <= limit + 1e-12
    smaller = [r for r in curve.threshold if slow_rates(r, q, f, y, "margin")["routed"] < rates["routed"]]
    assert all(slow_rates(r, q, f, y, "margin")["differing"] > limit for r in smaller)


@pytest.mark.parametrize("limit", [0.0, 0.05, 0.1, 0.3, 1.0])
def test_chosen_threshold_meets_a_routing_budget_catching_most(limit):
    q, f, y = noisy(600, 6)
    curve = guard_curve(q, f, y, "msp")
    t = choose_threshold(curve, GuardTarget(max_routed=limit))
    rates = slow_rates(t, q, f, y, "msp")
    assert rates["routed"] <= limit + 1e-12
    for r in curve.threshold:  # nothing within budget leaves fewer differing, or as few with less routing
        other = slow_rates(r, q, f, y, "msp")
        if other["routed"] <= limit:
            assert other["differing"] >= rates["differing"]
            assert other["differing"] > rates["differing"] or other["routed"] >= rates["routed"]


def slow_threshold(q, f, y, limit, score="margin"):
    """The first threshold, least routing first, leaving at most ``limit`` differing."""
    for t in [-np.inf, *np.unique(confidence_score(q, score)), np.inf]:
        if slow_rates(t, q, f, y, score)["differing"] <= limit:
            return t


def test_threshold_is_chosen_on_held_out_images_only():
    held, evaluation = synthetic(1000, 0.05, 11), synthetic(1000, 0.3, 12)
    target = GuardTarget(max_differing=0.01)
    guard = fit_guard("a8w8", target, held, evaluation, "margin")
    assert guard.threshold == slow_threshold(*held, 0.01)
    assert guard.threshold != slow_threshold(*evaluation, 0.01)  # evaluation images would choose another
    assert guard.chosen_on == 1000 and guard.held_out.differing <= 0.01
    assert guard.evaluation == judge(guard.threshold, *evaluation, "margin")
    assert guard.evaluation.routed == pytest.approx(slow_rates(guard.threshold, *evaluation, "margin")["routed"])
    assert guard.evaluation.differing > 0.01  # the held-out threshold misses evaluation swaps: judged, not fitted


def test_route_to_float_agrees_with_the_curve():
    q, f, y = noisy(300, 8)
    curve = guard_curve(q, f, y, "entropy")
    guard = fit_guard("a8w4", GuardTarget(max_routed=0.1), (q, f, y), (q, f, y), "entropy")
    for i, t in enumerate(curve.threshold):
        routed = route_to_float(q, replace(guard, threshold=float(t)))
        assert routed.dtype == bool and routed.mean() == pytest.approx(curve.routed[i])


def raise_on_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict(guard):
    return json.loads(json.dumps(guard.to_json(), allow_nan=False), parse_constant=raise_on_constant)


def a_guard(threshold=0.25):
    rates = GuardRates(100, 0.05, 0.2, 0.8, math.nan, 0.01, 0.3)
    return Guard("a8w8", "margin", threshold, GuardTarget(max_differing=0.01), 100, rates,
                 replace(rates, images=500, confident_caught=1.0), quant_latency_ms=2.0)


@pytest.mark.parametrize("threshold", [0.25, 3, -np.inf, np.inf])
def test_guard_json_round_trips_strictly(threshold):
    guard = a_guard(threshold)
    values = strict(guard)
    assert values["held_out"]["confident_caught"] is None
    back = Guard.from_json(values)
    assert back.to_json() == guard.to_json() and back.threshold == threshold
    assert math.isnan(back.held_out.confident_caught) and back.float_latency_ms is None


@pytest.mark.parametrize("path, value", [
    (("threshold",), "0.5"), (("threshold",), None), (("threshold",), True), (("chosen_on",), 100.0),
    (("chosen_on",), True), (("config",), 8), (("score",), "energy"), (("quant_latency_ms",), "2"),
    (("held_out", "images"), "100"), (("evaluation", "routed"), "0.2"), (("target", "max_routed"), 0.1),
    (("target", "max_differing"), "0.01"), (("target", "max_differing"), 2.0), (("held_out",), [1, 2])])
def test_tampered_guard_json_is_refused(path, value):
    values = strict(a_guard())
    inner = values
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    with pytest.raises(ValueError) as error:
        Guard.from_json(values)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("change", [lambda v: v.pop("score"), lambda v: v.update(extra=1),
                                    lambda v: v["evaluation"].pop("routed")])
def test_guard_json_with_wrong_keys_is_refused(change):
    values = strict(a_guard())
    change(values)
    with pytest.raises(ValueError, match="exactly the keys"):
        Guard.from_json(values)


@pytest.mark.parametrize("kwargs", [{}, {"max_differing": 0.1, "max_routed": 0.1}, {"max_routed": -0.1},
                                    {"max_routed": 1.5}, {"max_differing": True}, {"max_differing": "0.1"}])
def test_guard_target_validation(kwargs):
    with pytest.raises(ValueError) as error:
        GuardTarget(**kwargs)
    assert "\n" not in str(error.value)


def test_expected_cost_hand_worked():
    # Q 2 ms on every input, float 10 ms on 10% of them: 2 + 1 = 3 ms, 0.3 of float's 10 ms
    assert expected_cost(0.1, 0.002, 0.010) == pytest.approx((0.003, 0.3))
    # 1000 img/s and 100 img/s: 1 ms + 0.1 x 10 ms = 2 ms an image
    assert expected_throughput(0.1, 1000.0, 100.0) == pytest.approx(500.0)
    guard = a_guard()
    assert guard.expected_latency_ms is None
    timed = replace(guard, float_latency_ms=10.0)
    assert timed.expected_latency_ms == pytest.approx(2.0 + 0.2 * 10.0)
    assert timed.latency_vs_float == pytest.approx(0.4)


def test_curve_is_fast_at_imagenet_size():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50_000, 100)).astype(np.float32)
    q = f + rng.normal(size=f.shape).astype(np.float32) * 0.3
    y = rng.integers(0, 100, 50_000)
    start = time.perf_counter()
    curve = guard_curve(q, f, y, "msp")
    assert time.perf_counter() - start < 5.0
    assert curve.images == 50_000 and curve.routed[-1] == 1.0
