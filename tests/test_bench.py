"""The benchmark script still runs and prints every ratio (its numbers live in bench/results.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


@pytest.mark.slow
def test_quick_benchmark_prints_every_ratio():
    pytest.importorskip("torch")
    completed = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    ratios = completed.stdout.split("\nratios\n")[1]
    for name in ("sweep: PyTorch fake-quant / ptqcal", "sweep: ptqcal re-run / first run",
                 "ORT/ptqcal peak memory at ", "inference: a8w8 / float ORT at batch 256",
                 "evaluator: ptqcal predict / bare session.run", "size: a8w4 / float (weights)",
                 "latency a8w8 / float: the run's report / this benchmark",
                 "ResNet56 sweep: ptqcal end to end / floor", "ResNet56 sweep: calibration / one float pass"):
        assert name in ratios
    size = next(line for line in ratios.splitlines() if "a8w4 / float (weights)" in line)
    assert float(size.split(":")[-1].strip().rstrip("x")) == pytest.approx(0.125, abs=0.01)
