"""What shipping a configuration costs on this machine: its size on disk, its weights' bytes, its
latency at batch 1 and its throughput at the run's batch size, on ONNX Runtime's deployed path."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqcal.quantize.graph import weight_bytes

LATENCY_RUNS = 50  # timed batch-1 runs, after the warm-up ones; fewer (at least MIN_LATENCY_RUNS)
LATENCY_SECONDS = 0.5  # when a slow model's runs take longer than this
MIN_LATENCY_RUNS = 10
WARMUP_RUNS = 5
THROUGHPUT_SECONDS = 0.5  # at least this long of full batches (and at least two of them)
EVALUATION_BATCHES = 3  # full batches an evaluation must have run (after its first) to give the throughput


@dataclass(frozen=True)
class Deployment:
    """One configuration's size and speed (bytes, milliseconds, images per second).

    ``threads`` is ORT's intra-op thread count the numbers were measured with (0: ORT's default,
    one per physical core); the timings are ``None`` when the run skipped them.
    """

    file_bytes: int
    weight_bytes: int
    threads: int
    batch_size: int
    latency_ms: float | None = None  # batch 1, median
    latency_p90_ms: float | None = None
    throughput: float | None = None  # images/s at ``batch_size``
    throughput_source: str = "timed runs"  # or "evaluation": session.run over the run's own batches


def evaluation_throughput(timings: list[tuple[int, float]], batch_size: int) -> float | None:
    """Images/s of ``session.run`` over an evaluation's full batches, (images, seconds) each, after
    the first (which grows ORT's arena); ``None`` with fewer than :data:`EVALUATION_BATCHES`.

    Every configuration is evaluated anyway: timing those runs costs nothing, where timed runs of a
    slow configuration (a8w4's float convolutions, 2 s a batch on 2 cores) cost seconds each.
    """
    full = [seconds for images, seconds in timings[1:] if images == batch_size]
    return None if len(full) < EVALUATION_BATCHES else len(full) * batch_size / sum(full)


def measure_deployment(path: str | Path, batch: np.ndarray, threads: int = 0, provider: str = "CPU",
                       timing: bool = True, throughput: float | None = None) -> Deployment:
    """Size of the model at ``path`` and, with ``timing``, its batch-1 latency (median and 90th
    percentile of :data:`LATENCY_RUNS` runs after :data:`WARMUP_RUNS`, or as many as fit in
    :data:`LATENCY_SECONDS`, at least :data:`MIN_LATENCY_RUNS`) and its throughput on
    ``batch`` (ready model input), on the deployed path with ``threads`` intra-op threads; or
    ``throughput`` as given (:func:`evaluation_throughput` at that batch size)."""
    from .runner import make_session

    path = Path(path)
    sizes = dict(file_bytes=path.stat().st_size, weight_bytes=weight_bytes(path), threads=threads,
                 batch_size=len(batch))
    if not timing:
        return Deployment(**sizes)
    session = make_session(path, threads=threads, provider=provider)
    feed = session.get_inputs()[0].name
    one = np.ascontiguousarray(batch[:1])
    for _ in range(WARMUP_RUNS):
        session.run(None, {feed: one})
    times: list[float] = []
    while len(times) < LATENCY_RUNS and (len(times) < MIN_LATENCY_RUNS or sum(times) < LATENCY_SECONDS):
        start = time.perf_counter()
        session.run(None, {feed: one})
        times.append(time.perf_counter() - start)
    latency = dict(latency_ms=1000 * float(np.median(times)), latency_p90_ms=1000 * float(np.percentile(times, 90)))
    if throughput is not None:
        return Deployment(**sizes, **latency, throughput=float(throughput), throughput_source="evaluation")
    whole = np.ascontiguousarray(batch)
    session.run(None, {feed: whole})
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < THROUGHPUT_SECONDS:
        session.run(None, {feed: whole})
        runs += 1
    return Deployment(**sizes, **latency, throughput=runs * len(batch) / (time.perf_counter() - start))
