"""What shipping a configuration costs on this machine: its size on disk, its weights' bytes, its
latency at batch 1 and its throughput at the run's batch size, on ONNX Runtime's deployed path.

Timings a reader can believe: every number rests on at least :data:`TIMING_SECONDS` of
``session.run`` (and at least :data:`MIN_LATENCY_RUNS` / :data:`MIN_THROUGHPUT_RUNS` runs), and
records how many runs (and images) it rests on. Its runs, in the order they ran, are split into
:data:`BLOCKS` consecutive blocks; each block gives the number again (the median latency of its
runs, the images/s of its runs). A ratio of two configurations is the ratio of their numbers, with
the range of the ratio between any block of one and any block of the other (:func:`ratio`): the
drift of a busy machine over the measurement shows in it, and a range that includes 1 is "the same
speed within noise" (:attr:`Ratio.verdict`), neither faster nor slower. The blocks are stored, so
the range is recomputed, not re-measured, by every report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ptqcal.quantize.graph import weight_bytes

TIMING_SECONDS = 0.5  # every timed number rests on at least this much of session.run
MIN_LATENCY_RUNS = 10  # batch-1 runs, after the warm-up ones (a slow model: this many, however long)
MIN_THROUGHPUT_RUNS = 3  # full batches (an evaluation's after its first, or timed runs)
MAX_RUNS = 1_000_000  # a model faster than the clock: stop somewhere
WARMUP_RUNS = 5
BLOCKS = 5  # consecutive blocks each number's runs are split into: the range of a ratio
TIMING_FORMAT = 2  # what a Deployment records of its timings (part of the key of cached timings)


@dataclass(frozen=True)
class Deployment:
    """One configuration's size and speed (bytes, milliseconds, images per second).

    ``threads`` is ORT's intra-op thread count the numbers were measured with (0: ORT's default,
    one per physical core); the timings are ``None`` when the run skipped them. ``latency_runs``
    batch-1 runs give the latency; ``throughput_runs`` runs of ``throughput_images`` images in all
    give the throughput (``throughput_source``: ``"evaluation"``, session.run over the
    evaluation's own full batches, or ``"timed runs"`` of one batch). ``*_blocks``: the number
    again on each of :data:`BLOCKS` consecutive blocks of those runs (empty in a record of an older
    ptqcal, which kept no spread).
    """

    file_bytes: int
    weight_bytes: int
    threads: int
    batch_size: int
    latency_ms: float | None = None  # batch 1, median
    latency_p90_ms: float | None = None
    throughput: float | None = None  # images/s at ``batch_size``
    throughput_source: str = "timed runs"  # or "evaluation": session.run over the run's own batches
    latency_runs: int | None = None
    latency_blocks_ms: tuple[float, ...] = ()  # the median of each block of batch-1 runs
    throughput_runs: int | None = None
    throughput_images: int | None = None
    throughput_blocks: tuple[float, ...] = ()  # the images/s of each block of runs

    def __post_init__(self) -> None:  # read back from JSON, the blocks are lists
        for name in ("latency_blocks_ms", "throughput_blocks"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name) or ()))

    @property
    def timed(self) -> bool:
        return self.throughput is not None and self.latency_ms is not None


@dataclass(frozen=True)
class Ratio:
    """``value`` = one number over another (e.g. a configuration's images/s over float's), with the
    range ``low``..``high`` of the ratio between any block of the one and any block of the other
    (``None`` when either kept no blocks)."""

    value: float
    low: float | None = None
    high: float | None = None

    @property
    def verdict(self) -> str:
        """``"above"`` (the whole range above 1), ``"below"``, ``"same"`` (the range includes 1:
        the same within noise), or ``"unjudged"`` (no range)."""
        if self.low is None or self.high is None:
            return "unjudged"
        return "above" if self.low > 1 else "below" if self.high < 1 else "same"

    def text(self, digits: int = 2) -> str:
        """``1.93× [1.71, 2.10]``, or without a range ``1.93×``."""
        shown = f"{self.value:.{digits}f}×"
        return shown if self.low is None else f"{shown} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def ratio(value: float, blocks: Sequence[float], reference: float, reference_blocks: Sequence[float]) -> Ratio:
    """``value / reference`` with the range of ``b / r`` over every block ``b`` of ``blocks`` and
    ``r`` of ``reference_blocks``: ``[min(blocks) / max(reference_blocks), max(blocks) /
    min(reference_blocks)]``."""
    if not blocks or not reference_blocks or min(reference_blocks) <= 0:
        return Ratio(value / reference)
    return Ratio(value / reference, min(blocks) / max(reference_blocks), max(blocks) / min(reference_blocks))


def speed_ratio(numbers: Deployment, reference: Deployment) -> Ratio | None:
    """Images/s of ``numbers`` over ``reference``'s (above 1: faster), ``None`` when either is untimed."""
    if numbers.throughput is None or reference.throughput is None or reference.throughput <= 0:
        return None
    return ratio(numbers.throughput, numbers.throughput_blocks, reference.throughput, reference.throughput_blocks)


def latency_ratio(numbers: Deployment, reference: Deployment) -> Ratio | None:
    """Batch-1 latency of ``numbers`` over ``reference``'s (below 1: quicker), ``None`` when untimed."""
    if numbers.latency_ms is None or reference.latency_ms is None or reference.latency_ms <= 0:
        return None
    return ratio(numbers.latency_ms, numbers.latency_blocks_ms, reference.latency_ms, reference.latency_blocks_ms)


def split_blocks(values: Sequence, count: int = BLOCKS) -> list[list]:
    """``values`` in ``count`` consecutive blocks as equal as can be (fewer when there are fewer values)."""
    values = list(values)
    count = max(1, min(count, len(values)))
    bounds = [round(i * len(values) / count) for i in range(count + 1)]
    return [values[bounds[i]:bounds[i + 1]] for i in range(count)]


def latency_numbers(seconds: Sequence[float]) -> dict:
    """The latency fields of a :class:`Deployment` from each batch-1 run's seconds: median and
    90th percentile (ms), how many runs, and each block's median."""
    ms = 1000 * np.asarray(seconds, dtype=np.float64)
    return dict(latency_ms=float(np.median(ms)), latency_p90_ms=float(np.percentile(ms, 90)), latency_runs=len(ms),
                latency_blocks_ms=tuple(float(np.median(block)) for block in split_blocks(ms)))


def throughput_numbers(runs: Sequence[tuple[int, float]], source: str) -> dict:
    """The throughput fields of a :class:`Deployment` from (images, seconds) runs: all their images
    over all their seconds, how many runs and images, and each block's images/s."""
    def rate(block) -> float:
        return sum(images for images, _ in block) / sum(seconds for _, seconds in block)

    images = sum(count for count, _ in runs)
    return dict(throughput=rate(runs), throughput_source=source, throughput_runs=len(runs), throughput_images=images,
                throughput_blocks=tuple(rate(block) for block in split_blocks(runs)))


def enough(seconds: Sequence[float], least_runs: int) -> bool:
    """Whether runs of these seconds are enough to give a number: at least ``least_runs`` of them
    and :data:`TIMING_SECONDS` in all."""
    return len(seconds) >= least_runs and math.fsum(seconds) >= TIMING_SECONDS


def evaluation_runs(timings: Sequence[tuple[int, float]], batch_size: int) -> list[tuple[int, float]] | None:
    """An evaluation's full batches after the first (which grows ORT's arena), as (images,
    seconds), when they are :func:`enough` to give the throughput; ``None`` otherwise (timed runs
    of one batch then give it).

    Every configuration is evaluated anyway: timing those runs costs nothing, where timed runs of a
    slow configuration (a8w4's float convolutions, 2 s a batch on 2 cores) cost seconds each.
    """
    full = [(images, seconds) for images, seconds in timings[1:] if images == batch_size]
    return full if enough([seconds for _, seconds in full], MIN_THROUGHPUT_RUNS) else None


def _timed_runs(session, feed: str, inputs: np.ndarray, least_runs: int, warmup: int) -> list[float]:
    """Seconds of each ``session.run`` on ``inputs`` after ``warmup`` untimed ones, until they are
    :func:`enough`."""
    for _ in range(warmup):
        session.run(None, {feed: inputs})
    times: list[float] = []
    total = 0.0
    while (len(times) < least_runs or total < TIMING_SECONDS) and len(times) < MAX_RUNS:
        start = time.perf_counter()
        session.run(None, {feed: inputs})
        times.append(time.perf_counter() - start)
        total += times[-1]
    return times


def measure_deployment(path: str | Path, batch: np.ndarray, threads: int = 0, provider: str = "CPU",
                       timing: bool = True, evaluation: Sequence[tuple[int, float]] | None = None) -> Deployment:
    """Size of the model at ``path`` and, with ``timing``, its batch-1 latency (timed runs after
    :data:`WARMUP_RUNS`, until :func:`enough`) and its throughput at ``batch``'s size (ready model
    input): from ``evaluation``'s (images, seconds) runs when given (:func:`evaluation_runs`),
    else from timed runs of ``batch``; on the deployed path with ``threads`` intra-op threads."""
    from .runner import make_session

    path = Path(path)
    sizes = dict(file_bytes=path.stat().st_size, weight_bytes=weight_bytes(path), threads=threads,
                 batch_size=len(batch))
    if not timing:
        return Deployment(**sizes)
    session = make_session(path, threads=threads, provider=provider)
    feed = session.get_inputs()[0].name
    latency = latency_numbers(_timed_runs(session, feed, np.ascontiguousarray(batch[:1]), MIN_LATENCY_RUNS,
                                          WARMUP_RUNS))
    if evaluation:
        return Deployment(**sizes, **latency, **throughput_numbers(list(evaluation), "evaluation"))
    seconds = _timed_runs(session, feed, np.ascontiguousarray(batch), MIN_THROUGHPUT_RUNS, 1)
    return Deployment(**sizes, **latency, **throughput_numbers([(len(batch), s) for s in seconds], "timed runs"))
