"""Streaming: batches whatever the chunking, errors and early stops of the prefetch thread, chunked
pixels equal to decoding everything at once, flat memory, and batches chosen from a memory budget."""

from __future__ import annotations

import threading
import time
import warnings
import tracemalloc

import numpy as np
import pytest

from conftest import tiny_onnx_classifier
from ptqcal.data import pixels as pixels_module
from ptqcal.cache import Cache
from ptqcal.data import Split, decode_images
from ptqcal.errors import UserError
from ptqcal.models.preprocess import PreprocessCfg
from ptqcal.data.pixels import Pixels, prefetched, rebatch


@pytest.mark.parametrize("seed", range(5))
def test_batches_do_not_depend_on_how_the_images_are_chunked(seed):
    rng = np.random.default_rng(seed)
    rows = np.arange(103)[:, None]
    cuts = np.sort(rng.choice(np.arange(1, 103), size=rng.integers(0, 10), replace=False))
    chunks = np.split(rows, cuts)
    for limit in (None, 50, 103, 500):
        got = list(rebatch(iter(chunks), 16, limit))
        expected = [rows[i:i + 16] for i in range(0, min(limit or 103, 103), 16)]
        expected[-1] = expected[-1][:min(limit or 103, 103) - 16 * (len(expected) - 1)]
        assert [b.ravel().tolist() for b in got] == [b.ravel().tolist() for b in expected]


def test_prefetch_raises_the_producers_error_in_the_consumer():
    def items():
        yield 1
        raise UserError("cannot decode broken.jpg")

    stream = prefetched(items(), 2)
    assert next(stream) == 1
    with pytest.raises(UserError, match="broken.jpg"):
        next(stream)


def test_prefetch_stays_bounded_and_stops_when_the_consumer_does():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    stream = prefetched(items(), 2)
    assert next(stream) == 0
    time.sleep(0.2)
    assert len(made) <= 4  # one consumed, two queued, one waiting to be queued
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "ptqcal-prefetch"]


def _image_files(folder, count, size=(20, 14)):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_chunked_pixels_equal_decoding_everything_at_once(tmp_path, monkeypatch):
    """Chunks of 7 images, one broken file in the middle: the same pixels, labels and failures as
    one decode of the whole split, from the decoder and from the cache."""
    paths = _image_files(tmp_path, 30)
    paths[12].write_bytes(b"not an image")
    split = Split(paths, np.arange(30) % 4)
    preprocess = PreprocessCfg((3, 8, 8), (0.5,), (0.5,), resize=9)
    monkeypatch.setattr(pixels_module, "CHUNK_BYTES", 7 * 3 * 8 * 8)
    with pytest.warns(UserWarning, match="012.png"):
        whole, failed = decode_images(split, preprocess.input_size, preprocess.resize)
    for attempt in range(2):  # decoded, then read back from the cache
        streamed = Pixels(split, preprocess, Cache(tmp_path / "cache"))
        assert streamed.num_chunks == 5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped file is warned about when decoded
            batches = list(streamed.batches(4))
        np.testing.assert_array_equal(np.concatenate(batches), whole.images)
        np.testing.assert_array_equal(streamed.labels, whole.labels)
        assert list(streamed.failed) == failed == [paths[12]]
    index_only = Pixels(split, preprocess, Cache(tmp_path / "cache"))  # a re-run whose logits are cached
    np.testing.assert_array_equal(index_only.labels, whole.labels)
    assert list(index_only.failed) == failed
    with pytest.raises(UserError, match="cannot decode"):  # a strict run does not take the lenient cache
        list(Pixels(split, preprocess, Cache(tmp_path / "cache"), strict=True).batches(4))


def test_streamed_evaluation_never_holds_the_evaluation_set(tmp_path):
    """2,000 images of 64x64 are 31 MB as float32: evaluating them in batches of 50 allocates (in
    numpy, which tracemalloc sees) a small fraction of that, and gives the one-array logits."""
    from ptqcal.config import RunConfig
    from ptqcal.evaluate import make_session, predict
    from ptqcal.steps import model_logits

    from onnx_variants import input_variant

    model = input_variant(tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10), tmp_path / "open.onnx",
                          open_size=True)
    preprocess = PreprocessCfg((1, 64, 64), (0.5,), (0.25,))
    images = np.random.default_rng(0).integers(0, 256, (2000, 64, 64), dtype=np.uint8)
    cfg = RunConfig(batch_size=50, progress=False)
    tracemalloc.start()
    try:
        logits = model_logits(Cache(tmp_path / "cache"), model, Pixels(Split(images, np.zeros(2000, np.int64)),
                                                                        preprocess), preprocess, cfg, "float")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = images.size * 4
    assert peak < whole / 5, f"peak {peak / 2**20:.1f} MiB for a {whole / 2**20:.1f} MiB evaluation set"
    expected = predict(make_session(model), images, 2000, progress=False, transform=preprocess)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_activation_bytes_of_a_small_graph_by_hand(tmp_path):
    """Conv(1->8, 8x8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(->5), float32, per image:
    input 256 B, conv 2048, relu 2048, pool 32, flatten 32, logits 20. Running node by node, the
    most alive at once is conv + relu (the input is freed after the conv): 4096 bytes."""
    from ptqcal.evaluate.memory import activation_bytes, batch_for

    sizes = activation_bytes(tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=5), (1, 1, 8, 8),
                             not_exposed=frozenset({"conv"}))  # the Relu's input: calibration does not bin it
    assert (sizes.peak, sizes.total) == (4096, 256 + 2048 + 2048 + 32 + 32 + 20)
    assert sizes.binned == sizes.total - 2048
    assert batch_for(40_960, sizes.peak, 256) == 10 and batch_for(100, sizes.peak, 256) == 1
    assert batch_for(10**12, sizes.peak, 256) == 256


@pytest.mark.slow
def test_the_path_check_reuses_the_runs_logits_and_can_be_turned_off(tmp_path):
    """The check computes only the simulated path, on the first --check-images images; its deployed
    side is the run's own logits; 0 turns it off."""
    import json

    from ptqcal.cli import main

    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    common = ["run", "--model", str(model), "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8",
              "--no-progress", "--quiet"]
    assert main([*common, "--check-images", "40", "--out", str(tmp_path / "on")]) == 0
    assert main([*common, "--check-images", "0", "--out", str(tmp_path / "off")]) == 0
    checks = list((tmp_path / "on" / "cache").glob("check-logits-*.npy"))
    assert len(checks) == 1 and len(np.load(checks[0])) == 40
    assert "on the first 40 evaluation images" in (tmp_path / "on" / "report.md").read_text()
    assert not list((tmp_path / "off" / "cache").glob("check-logits-*.npy"))
    assert "simulated (float ops" not in (tmp_path / "off" / "report.md").read_text()
    on, off = (json.loads((tmp_path / k / "metrics.json").read_text())["runs"][0]["configs"] for k in ("on", "off"))
    assert on == off  # the check changes no number of the run


def test_activation_bytes_of_an_open_size_graph_use_the_size_given(tmp_path):
    """A graph that leaves height and width open is sized at the images' size: the same bytes as
    the fixed graph, plus the Identity the variant adds in front (one input-sized tensor)."""
    from onnx_variants import input_variant
    from ptqcal.evaluate.memory import activation_bytes

    fixed = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=5)
    opened = input_variant(fixed, tmp_path / "open.onnx", open_size=True)
    sizes, reference = activation_bytes(opened, (1, 1, 8, 8)), activation_bytes(fixed, (1, 1, 8, 8))
    assert sizes.total == reference.total + 256 and sizes.peak >= reference.peak
    pooled = 32 + 32 + 20  # after the global pool, the sizes no longer depend on the image's
    assert activation_bytes(opened, (1, 1, 16, 16)).total == 4 * (sizes.total - pooled) + pooled
