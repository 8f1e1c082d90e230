"""Timings a reader can believe: how many runs each number rests on, its blocks, the range of a
ratio to float and the verdict drawn from it, checked against hand-computed cases. No assertion
here depends on how fast this machine is: a fake clock drives the timed runs."""

from __future__ import annotations

import types

import pytest

from ptqcal.evaluate import deploy
from ptqcal.evaluate.deploy import (Deployment, Ratio, enough, evaluation_runs, latency_numbers, latency_ratio, ratio,
                                    speed_ratio, split_blocks, throughput_numbers)


def test_runs_split_into_consecutive_blocks_as_equal_as_can_be():
    assert split_blocks(list(range(10))) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # 7 runs: block bounds at round(i * 7 / 5) = 0, 1, 3, 4, 6, 7
    assert split_blocks(list(range(7))) == [[0], [1, 2], [3], [4, 5], [6]]
    assert split_blocks([1.0, 2.0]) == [[1.0], [2.0]]  # fewer runs than blocks: one block each


def test_latency_is_the_median_of_its_runs_with_each_blocks_median():
    seconds = [0.001 * v for v in (5, 1, 3, 2, 4, 10, 6, 7, 9, 8)]
    numbers = latency_numbers(seconds)
    assert numbers["latency_ms"] == pytest.approx(5.5) and numbers["latency_runs"] == 10
    assert numbers["latency_p90_ms"] == pytest.approx(9.1)  # numpy's linear interpolation: 9 + 0.1 * (10 - 9)
    # blocks (5, 1), (3, 2), (4, 10), (6, 7), (9, 8): their medians
    assert numbers["latency_blocks_ms"] == pytest.approx((3.0, 2.5, 7.0, 6.5, 8.5))


def test_throughput_is_all_images_over_all_seconds_with_each_blocks_rate():
    runs = [(64, 1.0), (64, 3.0), (64, 1.0), (64, 1.0), (64, 2.0), (32, 0.5)]
    numbers = throughput_numbers(runs, "timed runs")
    assert numbers["throughput"] == pytest.approx(352 / 8.5)
    assert (numbers["throughput_runs"], numbers["throughput_images"]) == (6, 352)
    # 6 runs in 5 blocks: bounds 0, 1, 2, 4, 5, 6 (round(3.6) = 4, round(4.8) = 5)
    assert numbers["throughput_blocks"] == pytest.approx((64.0, 64 / 3, 128 / 2.0, 32.0, 64.0))
    assert numbers["throughput_source"] == "timed runs"


def test_the_range_of_a_ratio_is_between_any_block_of_one_and_any_of_the_other():
    r = ratio(2.0, (1.8, 2.0, 2.2), 1.0, (0.9, 1.0, 1.1))
    assert (r.value, r.low, r.high) == pytest.approx((2.0, 1.8 / 1.1, 2.2 / 0.9))
    assert r.verdict == "above" and r.text() == "2.00× [1.64, 2.44]"
    overlapping = ratio(1.05, (0.95, 1.15), 1.0, (0.98, 1.02))
    assert overlapping.low < 1 < overlapping.high and overlapping.verdict == "same"
    assert ratio(0.5, (0.45, 0.55), 1.0, (0.9, 1.1)).verdict == "below"
    # without blocks (a record of an older ptqcal) there is a ratio but no verdict
    bare = ratio(3.0, (), 1.0, (1.0,))
    assert (bare.low, bare.high, bare.verdict, bare.text()) == (None, None, "unjudged", "3.00×")


def test_speed_and_latency_ratios_of_deployments():
    reference = Deployment(100, 80, 0, 64, latency_ms=2.0, throughput=1000.0, latency_blocks_ms=(1.9, 2.1),
                           throughput_blocks=(950.0, 1050.0))
    quick = Deployment(50, 20, 0, 64, latency_ms=1.0, throughput=2000.0, latency_blocks_ms=(0.9, 1.1),
                       throughput_blocks=(1900.0, 2100.0))
    speed = speed_ratio(quick, reference)
    assert (speed.value, speed.low, speed.high) == pytest.approx((2.0, 1900 / 1050, 2100 / 950))
    latency = latency_ratio(quick, reference)
    assert (latency.value, latency.low, latency.high) == pytest.approx((0.5, 0.9 / 2.1, 1.1 / 1.9))
    assert latency.verdict == "below"  # quicker: lower latency
    assert speed_ratio(Deployment(1, 1, 0, 64), reference) is None  # untimed: no ratio


def test_a_deployment_read_back_from_json_has_tuples():
    back = Deployment(**{"file_bytes": 1, "weight_bytes": 1, "threads": 0, "batch_size": 8,
                         "latency_blocks_ms": [1.0, 2.0], "throughput_blocks": [3.0]})
    assert back.latency_blocks_ms == (1.0, 2.0) and back.throughput_blocks == (3.0,)
    old = Deployment(1, 1, 0, 8, 1.0, 1.2, 100.0, "evaluation")  # an older record: no counts, no blocks
    assert old.latency_runs is None and old.throughput_blocks == ()


def test_enough_means_enough_runs_and_enough_seconds():
    assert enough([0.2, 0.2, 0.2], 3)
    assert not enough([1.0, 1.0], 3)  # long, but too few runs
    assert not enough([0.01] * 40, 3)  # many, but 0.4 s
    assert enough([0.25, 0.25], 2)


def test_an_evaluation_gives_the_throughput_only_when_its_full_batches_took_long_enough():
    # the first batch grows ORT's arena; the last, partial one is another batch size
    timings = [(64, 9.0), (64, 0.2), (64, 0.2), (64, 0.2), (10, 0.1)]
    assert evaluation_runs(timings, 64) == [(64, 0.2), (64, 0.2), (64, 0.2)]
    assert evaluation_runs(timings[:3], 64) is None  # two full batches are too few
    assert evaluation_runs([(64, 1.0)] + [(64, 0.01)] * 20, 64) is None  # three batches of a fast model: 0.2 s


class _Clock:
    """A fake perf_counter: each session.run takes ``step`` seconds of it."""

    def __init__(self, step: float):
        self.now, self.step, self.runs = 0.0, step, 0

    def perf_counter(self) -> float:
        return self.now

    def run(self, outputs, feed):
        self.now += self.step
        self.runs += 1


@pytest.mark.parametrize("step, least, expected", [(1 / 64, 10, 32), (1 / 64, 3, 32), (1.0, 10, 10), (1.0, 3, 3)])
def test_timed_runs_go_on_until_half_a_second_and_the_least_count(monkeypatch, step, least, expected):
    clock = _Clock(step)
    monkeypatch.setattr(deploy, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    seconds = deploy._timed_runs(types.SimpleNamespace(run=clock.run), "x", None, least, warmup=5)
    assert len(seconds) == expected and clock.runs == expected + 5  # the warm-up runs are not timed
    assert sum(seconds) >= deploy.TIMING_SECONDS and all(s == step for s in seconds)


def test_a_fast_models_numbers_rest_on_many_runs_and_say_how_many(monkeypatch, tmp_path):
    """measure_deployment with a fake session on a fake clock: the latency from 2 ms runs (250 of
    them make 0.5 s), the throughput from timed runs of 20 ms (25), each with five blocks."""
    import numpy as np

    clock = _Clock(0.0)

    class Session:
        def get_inputs(self):
            return [types.SimpleNamespace(name="x")]

        def run(self, outputs, feed):
            clock.step = 0.002 if len(feed["x"]) == 1 else 0.02
            clock.run(outputs, feed)

    monkeypatch.setattr(deploy, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr("ptqcal.evaluate.runner.make_session", lambda *a, **k: Session())
    monkeypatch.setattr(deploy, "weight_bytes", lambda path: 40)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"0" * 100)
    numbers = deploy.measure_deployment(model, np.zeros((8, 1, 2, 2), np.float32))
    assert numbers.latency_runs == 250 and numbers.latency_ms == pytest.approx(2.0)
    assert numbers.latency_blocks_ms == pytest.approx((2.0,) * 5)
    assert (numbers.throughput_runs, numbers.throughput_images) == (25, 200)
    assert numbers.throughput == pytest.approx(400.0) and numbers.throughput_source == "timed runs"
    given = deploy.measure_deployment(model, np.zeros((8, 1, 2, 2), np.float32), evaluation=[(8, 0.25), (8, 0.25),
                                                                                                 (8, 0.5)])
    assert given.throughput_source == "evaluation" and given.throughput == pytest.approx(24.0)
    assert given.throughput_blocks == pytest.approx((32.0, 32.0, 16.0)) and given.throughput_runs == 3


def test_ratio_verdicts_are_the_only_words_of_speed():
    assert {Ratio(1.0, 0.9, 1.1).verdict, Ratio(1.2, 1.01, 1.3).verdict, Ratio(0.8, 0.7, 0.99).verdict,
            Ratio(2.0).verdict} == {"same", "above", "below", "unjudged"}
