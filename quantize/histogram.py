"""Running histograms of activations, binned exactly as ``torch.histc`` and merged as PyTorch's
``HistogramObserver`` merges them, fast enough to keep up with ONNX Runtime.

Binning is most of a calibration's own time (EfficientNet-Lite0 exposes 13 million values per
image). numpy's whole-array arithmetic makes a float and an int64 copy of every tensor and walks
them from memory several times; here each tensor is binned in blocks that stay in the core's cache
(same arithmetic, same order, so the same counts), and the tensors of one batch are binned by
several threads at once (numpy's arithmetic and ``bincount`` release the GIL).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_BINS = 2048
UPSAMPLE_RATE = 16  # as HistogramObserver: sub-bins used when re-binning onto a wider range
BLOCK = 1 << 18  # values binned at a time: their float and index copies stay in the core's caches


def histc(x: np.ndarray, bins: int, lo: np.float32, hi: np.float32, inside: bool = False) -> np.ndarray:
    """``torch.histc``: equal-width bins over [lo, hi], values outside ignored, hi in the last bin.

    ``inside=True`` promises every value lies in [lo, hi] (as when the range was just widened to
    cover them) and skips the masking copy.
    """
    x = np.asarray(x, dtype=np.float32).ravel()
    lo, hi = np.float32(lo), np.float32(hi)
    if not inside:
        x = x[(x >= lo) & (x <= hi)]
    counts = np.zeros(bins + 1, dtype=np.intp)  # + 1: x == hi may land one past the last bin
    if hi == lo:
        counts[0] = x.size
        return counts[:bins].astype(np.float32)
    span = hi - lo
    scaled = np.empty(min(BLOCK, x.size), dtype=np.float32)
    index = np.empty(min(BLOCK, x.size), dtype=np.intp)
    for start in range(0, x.size, BLOCK):
        part = x[start:start + BLOCK]
        s, i = scaled[:part.size], index[:part.size]
        # torch's float32 arithmetic, in its order: (x - lo) * bins / (hi - lo), truncated
        np.subtract(part, lo, out=s)
        s *= np.float32(bins)
        s /= span
        np.copyto(i, s, casting="unsafe")
        counts += np.bincount(i, minlength=bins + 1)
    counts[bins - 1] += counts[bins]  # torch puts hi in the last bin
    return counts[:bins].astype(np.float32)


@dataclass
class TensorHistogram:
    """The running histogram of one tensor over [lo, hi]; or, with ``same_as``, a tensor not
    binned at all because its range is that other tensor's (see ``ranges_set_by_ort``)."""

    bins: int = DEFAULT_BINS
    lo: np.float32 = field(default_factory=lambda: np.float32(np.inf))
    hi: np.float32 = field(default_factory=lambda: np.float32(-np.inf))
    counts: np.ndarray | None = None
    same_as: str = ""

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        if x.size == 0:
            return
        x_lo, x_hi = x.min(), x.max()
        if not (np.isfinite(x_lo) and np.isfinite(x_hi)):  # rare: drop inf/NaN, as the observer does
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            x_lo, x_hi = x.min(), x.max()
        if self.counts is None:
            self.lo, self.hi = x_lo, x_hi
            self.counts = histc(x, self.bins, x_lo, x_hi, inside=True)
            return
        new_lo, new_hi = min(self.lo, x_lo), max(self.hi, x_hi)
        update = histc(x, self.bins, new_lo, new_hi, inside=True)
        if new_lo == self.lo and new_hi == self.hi:
            self.counts = self.counts + update
        else:
            self.counts = update + self._rebin(new_lo, new_hi)
            self.lo, self.hi = new_lo, new_hi

    def _rebin(self, new_lo: np.float32, new_hi: np.float32) -> np.ndarray:
        """Move the current histogram onto [new_lo, new_hi] (HistogramObserver._combine_histograms)."""
        if self.lo == self.hi:
            return histc(np.array([self.lo], dtype=np.float32), self.bins, new_lo, new_hi) * self.counts.sum()
        fine = np.repeat(self.counts, UPSAMPLE_RATE) / UPSAMPLE_RATE
        width = (self.hi - self.lo) / np.float32(self.bins * UPSAMPLE_RATE)
        mids = np.linspace(self.lo, self.hi, self.bins * UPSAMPLE_RATE + 1, dtype=np.float32)[:-1] + width / 2
        edges = np.linspace(new_lo, new_hi, self.bins + 1, dtype=np.float32)
        target = np.clip(np.searchsorted(edges, mids, side="right") - 1, 0, self.bins - 1)
        return np.bincount(target, weights=fine, minlength=self.bins).astype(np.float32)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's share), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class HistogramBinner:
    """Updates many tensors' histograms from one batch after another, in ``workers`` threads, while
    the caller computes the next batch.

    Each histogram gets one update per batch, and a batch starts only once the previous one is
    binned, so the histograms do not depend on the threads. The largest tensors start first, so
    that no thread is left with a large one at the end.
    """

    def __init__(self, histograms: dict[str, TensorHistogram], workers: int):
        self.histograms = histograms
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ptqcal-binning")
        self._pending: list = []

    def submit(self, values: dict[str, np.ndarray]) -> None:
        """Start binning ``values[name]`` into each histogram (after the previous batch is done) and
        return; ``values`` is emptied, so each output is freed as soon as it is counted."""
        self.wait()
        names = sorted(self.histograms, key=lambda name: -values[name].size)
        self._pending = [self._pool.submit(self.histograms[name].update, values.pop(name)) for name in names]

    def wait(self) -> None:
        """Until every batch submitted is binned (re-raising a binning error)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "HistogramBinner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_histograms(histograms: dict[str, TensorHistogram], path: str | Path) -> None:
    """All of a calibration pass in one ``.npz``: any method and bit width can be computed later."""
    binned = {name: h for name, h in histograms.items() if not h.same_as}
    with open(path, "wb") as handle:
        np.savez(handle, names=np.array(list(binned), dtype=str),
                 lo=np.array([h.lo for h in binned.values()], dtype=np.float32),
                 hi=np.array([h.hi for h in binned.values()], dtype=np.float32),
                 counts=np.stack([h.counts for h in binned.values()]),
                 derived=np.array([name for name, h in histograms.items() if h.same_as], dtype=str),
                 same_as=np.array([h.same_as for h in histograms.values() if h.same_as], dtype=str))


def load_histograms(path: str | Path) -> dict[str, TensorHistogram]:
    with np.load(path) as stored:
        bins = stored["counts"].shape[1]
        histograms = {str(name): TensorHistogram(bins, lo, hi, counts) for name, lo, hi, counts
                      in zip(stored["names"], stored["lo"], stored["hi"], stored["counts"])}
        histograms.update({str(name): TensorHistogram(bins, same_as=str(source))
                           for name, source in zip(stored["derived"], stored["same_as"])})
        return histograms
