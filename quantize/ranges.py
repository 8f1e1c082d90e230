"""Clipping ranges from a histogram: min/max, the L2 (MSE) search, percentile and KL entropy."""

from __future__ import annotations

from enum import StrEnum

import numpy as np


class CalibMethod(StrEnum):
    """How an activation's clipping range is chosen from its histogram."""

    MINMAX = "minmax"  # the observed min and max
    MSE = "mse"  # the L2 search of PyTorch's HistogramObserver
    PERCENTILE = "percentile"  # the 0.01% tails cut
    ENTROPY = "entropy"  # TensorRT's KL-divergence search


RANGE_METHODS = tuple(method.value for method in CalibMethod)


def range_from_histogram(counts: np.ndarray, lo: float, hi: float, method: str, bits: int = 8,
                         percentile: float = 99.99) -> tuple[float, float]:
    if method == "minmax" or hi <= lo:
        return float(lo), float(hi)
    if method == "mse":
        return mse_range(counts, lo, hi, 2 ** bits)
    if method == "percentile":
        return percentile_range(counts, lo, hi, percentile)
    if method == "entropy":
        return entropy_range(counts, lo, hi, 2 ** bits)
    raise ValueError(f"unknown calibration method {method!r}")


def _l2_error(counts: np.ndarray, bin_width: float, start: int, end: int, dst_nbins: int) -> float:
    """L2 error of quantizing the histogram onto ``dst_nbins`` levels spanning bins start..end.

    Values are taken as uniform within each source bin (HistogramObserver._compute_quantization_error).
    """
    dst_width = bin_width * (end - start + 1) / dst_nbins
    if dst_width == 0.0:
        return 0.0
    src = np.arange(len(counts), dtype=np.float32)
    begin = (src - start) * np.float32(bin_width)
    finish = begin + np.float32(bin_width)
    dst_begin = np.clip(np.floor(begin / np.float32(dst_width)), 0, dst_nbins - 1)
    dst_end = np.clip(np.floor(finish / np.float32(dst_width)), 0, dst_nbins - 1)
    density = counts / np.float32(bin_width)
    half = np.float32(dst_width / 2)

    def cube_integral(a, b):
        return (b * b * b - a * a * a) / 3

    norm = density * cube_integral(begin - (dst_begin + 0.5) * np.float32(dst_width), half)
    norm += (dst_end - dst_begin - 1) * density * cube_integral(-half, half)
    norm += density * cube_integral(-half, finish - (dst_end * np.float32(dst_width) + half))
    return float(np.float32(norm.sum(dtype=np.float64)))  # torch's float32 sums are near-exact


def mse_range(counts: np.ndarray, lo: float, hi: float, dst_nbins: int = 256) -> tuple[float, float]:
    """The clipping range that minimises the L2 quantization error of the histogram.

    The greedy search of ``torch.ao.quantization.HistogramObserver._non_linear_param_search`` (from
    caffe2's norm minimisation): shrink the range from the side with less mass in steps of 1e-5 of
    the total, stop when the error grows. PyTorch fixes ``dst_nbins`` at 2**8 for quint8 whatever
    the quantization range; here it is 2**bits, so lower bit widths get their own search. The bin
    scans are ``searchsorted`` over the cumulative sum instead of Python loops.
    """
    bins = len(counts)
    bin_width = (np.float32(hi) - np.float32(lo)) / np.float32(bins)
    total = float(np.float32(counts.sum(dtype=np.float64)))
    # float64 running sum stored as float32, as torch.cumsum does on CPU: a float32 running sum
    # drifts by whole counts over 2048 bins, enough to move the 1e-5 tail cut by a bin or two
    csum = np.cumsum(counts, dtype=np.float64).astype(np.float32)
    alpha, beta = 0.0, 1.0
    start, end = 0, bins - 1
    norm_min = float("inf")
    while alpha < beta:
        next_alpha, next_beta = alpha + 1e-5, beta - 1e-5
        left = min(max(start, int(np.searchsorted(csum, np.float32(next_alpha * total), "left"))), end)
        right = max(min(end, int(np.searchsorted(csum, np.float32(next_beta * total), "right")) - 1), start)
        next_start, next_end = start, end
        if left - start > end - right:
            next_start, alpha = left, next_alpha
        else:
            next_end, beta = right, next_beta
        if next_start == start and next_end == end:
            continue
        norm = _l2_error(counts, bin_width, next_start, next_end, dst_nbins)
        if norm > norm_min:
            break
        norm_min, start, end = norm, next_start, next_end
    return float(np.float32(lo) + bin_width * start), float(np.float32(lo) + bin_width * (end + 1))


def percentile_range(counts: np.ndarray, lo: float, hi: float, percentile: float = 99.99) -> tuple[float, float]:
    """Clip ``(100 - percentile)`` % of the mass from each tail; bin edges, never beyond min/max."""
    edges = np.linspace(lo, hi, len(counts) + 1)
    cdf = np.cumsum(counts, dtype=np.float64) / counts.sum()
    tail = 1.0 - percentile / 100.0
    first = int(np.searchsorted(cdf, tail, "right"))
    last = int(np.searchsorted(cdf, 1.0 - tail, "left"))
    return float(edges[min(first, len(counts) - 1)]), float(edges[min(last + 1, len(counts))])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def entropy_range(counts: np.ndarray, lo: float, hi: float, dst_nbins: int = 256,
                  stride: int = 16) -> tuple[float, float]:
    """KL-divergence threshold search (TensorRT's entropy calibration) on the upper range.

    For each candidate upper edge, mass beyond it is folded into the last bin (the reference P)
    and P is merged into ``dst_nbins`` levels and expanded back (Q); the edge with the smallest
    KL(P || Q) wins. The lower end stays at the minimum (activations here are mostly post-ReLU);
    a tensor with negative values gets the same search on its mirrored lower half.
    """
    bins = len(counts)
    edges = np.linspace(lo, hi, bins + 1)
    zero = int(np.clip(np.searchsorted(edges, 0.0, "right") - 1, 0, bins - 1)) if lo < 0 < hi else 0

    def search(hist: np.ndarray) -> int:
        """Best number of bins to keep from the start of ``hist``."""
        n = len(hist)
        if n <= dst_nbins:
            return n
        best, best_kl = n, float("inf")
        for keep in range(dst_nbins, n + 1, stride):
            p = hist[:keep].astype(np.float64)
            p[-1] += hist[keep:].sum()
            # merge into dst_nbins groups (np.array_split's sizes), spread each group's mass over its
            # non-empty bins
            sizes = np.full(dst_nbins, keep // dst_nbins)
            sizes[:keep % dst_nbins] += 1
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            nonzero = hist[:keep] > 0
            mass = np.add.reduceat(hist[:keep].astype(np.float64), starts)
            filled = np.add.reduceat(nonzero.astype(np.float64), starts)
            q = np.repeat(np.divide(mass, filled, out=np.zeros_like(mass), where=filled > 0), sizes) * nonzero
            divergence = _kl(p, q)
            if divergence < best_kl:
                best, best_kl = keep, divergence
        return best

    upper = counts[zero:]
    new_hi = edges[zero + search(upper)]
    new_lo = lo
    if lo < 0 < hi:
        lower = counts[:zero][::-1]
        new_lo = edges[zero - search(lower)] if len(lower) else lo
    return float(new_lo), float(new_hi)
