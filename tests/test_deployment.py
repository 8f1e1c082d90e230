"""Deployment numbers: weight bytes against the initializers counted by hand, timings that are
timings, and the run's table, CSV columns, figure and --threads / --no-timing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import tiny_onnx_classifier
from ptqcal.evaluate.deploy import (BLOCKS, MIN_LATENCY_RUNS, MIN_THROUGHPUT_RUNS, Deployment, measure_deployment,
                                    weight_bytes)


def _quantized(tmp_path, model, weight_bits):
    from ptqcal.quantize import QuantSpec, collect_histograms, compute_ranges, prepare, quantize_qdq
    from ptqcal.quantize.calibrate import ArrayDataReader

    prepared = prepare(model, tmp_path / "prepared.onnx")
    x = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
    ranges = compute_ranges(collect_histograms(prepared, ArrayDataReader("input", x, 16), progress=False), "minmax", 8,
                            32)
    return quantize_qdq(prepared, tmp_path / f"w{weight_bits}.onnx", ranges, QuantSpec(weight_bits, 8))


def test_weight_bytes_are_the_stored_weights(tmp_path):
    """The tiny classifier's Conv weight is 8x1x3x3 and its Gemm weight 5x8: 112 numbers, 448 bytes
    as float32, 112 bytes as int8 codes, 56 as int4 codes packed two to a byte."""
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=5)
    assert weight_bytes(model) == 4 * (72 + 40)
    assert weight_bytes(_quantized(tmp_path, model, 8)) == 72 + 40
    assert weight_bytes(_quantized(tmp_path, model, 4)) == (72 + 40) // 2


def test_timings_are_timings_say_what_they_rest_on_and_can_be_skipped(tmp_path):
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=5)
    batch = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    numbers = measure_deployment(model, batch, threads=1)
    assert numbers.file_bytes == model.stat().st_size and numbers.threads == 1 and numbers.batch_size == 16
    assert 0 < numbers.latency_ms <= numbers.latency_p90_ms and numbers.throughput > 0
    # the counts and blocks, not the speeds: how long runs take is the machine's
    assert numbers.latency_runs >= MIN_LATENCY_RUNS and len(numbers.latency_blocks_ms) == BLOCKS
    assert numbers.throughput_runs >= MIN_THROUGHPUT_RUNS and numbers.throughput_images == 16 * numbers.throughput_runs
    assert numbers.throughput_source == "timed runs" and len(numbers.throughput_blocks) == BLOCKS
    skipped = measure_deployment(model, batch, timing=False)
    assert skipped == Deployment(numbers.file_bytes, numbers.weight_bytes, 0, 16)


def test_throughput_from_an_evaluations_runs_as_given(tmp_path):
    given = measure_deployment(tiny_onnx_classifier(tmp_path / "tiny.onnx"), np.zeros((4, 1, 8, 8), np.float32),
                               evaluation=[(4, 0.2), (4, 0.2), (4, 0.4)])
    assert (given.throughput, given.throughput_source) == (pytest.approx(15.0), "evaluation") and given.latency_ms > 0
    assert (given.throughput_runs, given.throughput_images) == (3, 12)


@pytest.mark.slow
def test_run_reports_size_and_speed_per_configuration(tmp_path):
    from ptqcal.cli import main

    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    common = ["run", "--model", str(model), "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8",
              "4", "--no-progress", "--quiet"]
    assert main([*common, "--threads", "1", "--batch-size", "64", "--out", str(tmp_path / "timed")]) == 0
    assert main([*common, "--no-timing", "--out", str(tmp_path / "untimed")]) == 0
    record = json.loads((tmp_path / "timed" / "run.json").read_text())
    assert list(record["deployment"]) == ["float", "a8w8", "a8w4"]
    assert all(d["threads"] == 1 and d["latency_ms"] > 0 for d in record["deployment"].values())
    # each configuration's images/s at the run's batch size, from at least half a second of runs (the tiny
    # model's evaluation takes less: timed runs), and how many runs each number rests on
    assert all(d["batch_size"] == 64 and d["throughput_runs"] >= 3 and d["latency_runs"] >= 10
               and sum(d["throughput_blocks"]) > 0 for d in record["deployment"].values())
    assert record["deployment"]["a8w4"]["weight_bytes"] * 8 == record["deployment"]["float"]["weight_bytes"]
    rows = {r["config"]: r for r in csv.DictReader(open(tmp_path / "timed" / "metrics.csv")) if r["corruption"] == "clean"}
    assert float(rows["a8w8"]["throughput"]) > 0 and int(rows["float"]["file_bytes"]) > 0
    report = (tmp_path / "timed" / "report.md").read_text()
    assert "1 ORT thread;" in report and "runs (batch 1 / batch)" in report and "at least 0.5 s" in report
    assert (tmp_path / "timed" / "fig6_deployment.png").exists()
    speed = [float(rows["a8w4"][f"speed_vs_float{end}"]) for end in ("", "_low", "_high")]
    assert speed[1] <= speed[0] <= speed[2]
    assert speed[1] > 1 or "a8w4 is slower than float" in report or "a8w4 runs at float's speed within noise" in report
    # the same logits with another thread count: their speed was not measured with it
    assert main([*common, "--threads", "2", "--batch-size", "64", "--out", str(tmp_path / "timed")]) == 0
    again = json.loads((tmp_path / "timed" / "run.json").read_text())["deployment"]
    assert all(d["threads"] == 2 and d["throughput_runs"] >= 3 for d in again.values())
    untimed = (tmp_path / "untimed" / "report.md").read_text()
    assert "sizes only" in untimed and not (tmp_path / "untimed" / "fig6_deployment.png").exists()
    assert json.loads((tmp_path / "untimed" / "run.json").read_text())["deployment"]["a8w8"]["latency_ms"] is None
