"""Our streaming histogram calibrator against PyTorch's HistogramObserver."""

import numpy as np
import pytest

from ptqcal.quantize import TensorHistogram, mse_range
from ptqcal.quantize.histogram import histc
from ptqcal.quantize.ranges import entropy_range, percentile_range

torch = pytest.importorskip("torch")
from torch.ao.quantization import HistogramObserver  # noqa: E402


def _heavy_tailed(seed, size=50_000, relu=False):
    x = np.random.default_rng(seed).standard_t(3, size=size).astype(np.float32)
    return np.maximum(x, 0) if relu else x


def test_histc_matches_torch():
    x = _heavy_tailed(0)
    lo, hi = np.float32(-3.0), np.float32(x.max())
    expected = torch.histc(torch.from_numpy(x), 2048, min=float(lo), max=float(hi)).numpy()
    np.testing.assert_array_equal(histc(x, 2048, lo, hi), expected)


@pytest.mark.parametrize("bins", [2048, 1000])
def test_histc_matches_torch_over_many_blocks(bins):
    from ptqcal.quantize.histogram import BLOCK

    x = _heavy_tailed(1, size=3 * BLOCK + 17)
    lo, hi = x.min(), x.max()  # both ends present: the last value lands in the last bin
    expected = torch.histc(torch.from_numpy(x), bins, min=float(lo), max=float(hi)).numpy()
    np.testing.assert_array_equal(histc(x, bins, lo, hi, inside=True), expected)
    np.testing.assert_array_equal(histc(x, bins, np.float32(-2.5), np.float32(7.0)),
                                  torch.histc(torch.from_numpy(x), bins, min=-2.5, max=7.0).numpy())


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("relu", [False, True])
def test_mse_range_equals_histogram_observer_on_one_batch(bits, relu):
    x = _heavy_tailed(bits, relu=relu)
    observer = HistogramObserver(quant_min=0, quant_max=2 ** bits - 1)
    observer.dst_nbins = 2 ** bits  # PyTorch keeps 256 target bins whatever the range; we use 2**bits
    observer(torch.from_numpy(x))
    expected = [v.item() for v in observer._non_linear_param_search()]
    ours = TensorHistogram()
    ours.update(x)
    np.testing.assert_allclose(mse_range(ours.counts, ours.lo, ours.hi, 2 ** bits), expected, rtol=1e-4)


def test_mse_range_tracks_histogram_observer_over_many_batches():
    observer = HistogramObserver()
    ours = TensorHistogram()
    for seed in range(20):  # ranges grow batch after batch, so histograms get re-binned
        x = _heavy_tailed(seed, 5_000) * (1 + seed / 10)
        observer(torch.from_numpy(x))
        ours.update(x)
    expected = np.array([v.item() for v in observer._non_linear_param_search()])
    assert (ours.lo, ours.hi) == (observer.min_val.item(), observer.max_val.item())
    np.testing.assert_allclose(mse_range(ours.counts, ours.lo, ours.hi, 256), expected,
                               rtol=0.01, atol=0.01 * np.ptp(expected))


def test_percentile_and_entropy_clip_heavy_tails():
    ours = TensorHistogram()
    ours.update(_heavy_tailed(3, relu=True))
    lo, hi = percentile_range(ours.counts, ours.lo, ours.hi, 99.9)
    assert lo == pytest.approx(0.0) and hi < ours.hi
    assert hi == pytest.approx(np.quantile(_heavy_tailed(3, relu=True), 0.999), rel=0.05)
    e_lo, e_hi = entropy_range(ours.counts, ours.lo, ours.hi, 256)
    assert e_lo == pytest.approx(0.0) and e_hi < 0.5 * ours.hi
