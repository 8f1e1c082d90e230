"""ImageNet-C corruptions on decoded pixels: the published formulas, and determinism.

The expected values re-implement Hendrycks & Dietterich's formulas (their tables of constants are
written out here) and never call the package's corruption functions; random corruptions are
compared with the formula fed the same draws, from the per-image seed re-derived here.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("imagecorruptions")

from ptqcal.data import corrupt as C  # noqa: E402
from ptqcal.data.corrupt import Corruption, corrupt_pixels  # noqa: E402

SEVERITIES = (1, 2, 3, 4, 5)
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform", "speckle_noise", "spatter")


def images(n=4, height=32, width=40, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, channels), dtype=np.uint8)


def legacy_draws(seed, index, name, severity):
    """The global generator as seeded for one image: SeedSequence(seed, index, crc32(name), severity)."""
    words = np.random.SeedSequence([seed, index, zlib.crc32(name.encode()), severity]).generate_state(5)
    return np.random.RandomState(words[:4])


def to_uint8(unit):  # the reference clips to [0, 1], scales by 255 and truncates
    return (np.clip(unit, 0, 1) * 255).astype(np.uint8)


# --- names ------------------------------------------------------------------------------------

def test_names_match_the_package():
    import imagecorruptions

    assert C.CORRUPTIONS == tuple(imagecorruptions.get_corruption_names("all"))
    assert C.resolve_corruptions("imagenet-c") == tuple(imagecorruptions.get_corruption_names("common"))
    assert len(C.CORRUPTIONS) == 19 and len(C.CORRUPTION_SETS["imagenet-c"]) == 15
    assert C.resolve_corruptions("noise, fog,gaussian_noise") == ("gaussian_noise", "shot_noise", "impulse_noise",
                                                                 "fog")
    assert C.resolve_corruptions(["all"]) == C.CORRUPTIONS


@pytest.mark.parametrize("bad", ["gaussian", "imagenet-c,nope", "", ["fog", "Fog"]])
def test_unknown_names_are_one_line(bad):
    with pytest.raises(ValueError) as error:
        C.resolve_corruptions(bad)
    assert "\n" not in str(error.value)
    if bad:
        assert "gaussian_noise" in str(error.value) and "imagenet-c" in str(error.value)


def test_corruption_key_and_severities():
    corruption = Corruption("gaussian_noise", 3)
    assert corruption.key == "gaussian_noise@3" and Corruption.from_key(corruption.key) == corruption
    assert Corruption("fog", np.int64(2)).severity == 2
    for severity in (0, 6, 2.0, True, "3"):
        with pytest.raises(ValueError, match="1 to 5"):
            Corruption("fog", severity)
    for name in ("imagenet-c", "nope", None):
        with pytest.raises(ValueError):
            Corruption(name, 1)
    with pytest.raises(ValueError, match="name@severity"):
        Corruption.from_key("fog")
    assert [c.key for c in C.corruptions("contrast", [2, 1, 2])] == ["contrast@2", "contrast@1"]


# --- the published formulas -------------------------------------------------------------------

@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_is_the_published_formula(severity):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    x = images()
    out = corrupt_pixels(x, Corruption("gaussian_noise", severity), seed=11, indices=np.arange(5, 9))
    for i, index in enumerate(range(5, 9)):
        noise = legacy_draws(11, index, "gaussian_noise", severity).normal(size=x[i].shape, scale=c)
        np.testing.assert_array_equal(out[i], to_uint8(x[i] / 255.0 + noise))


def test_gaussian_noise_has_the_published_strength():  # whatever the seeding, the noise's spread
    x = np.full((2, 64, 64, 3), 128, np.uint8)
    for severity, c in zip((1, 2), (0.08, 0.12)):  # little clipping around mid-gray
        out = corrupt_pixels(x, Corruption("gaussian_noise", severity), 0, np.arange(2))
        assert abs((out.astype(float) - 128).std() / 255 - c) < 0.01 * c + 0.002


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shot_noise_is_the_published_formula(severity):
    c = [60, 25, 12, 5, 3][severity - 1]
    x = images(2)
    out = corrupt_pixels(x, Corruption("shot_noise", severity), 3, np.array([0, 7]))
    for i, index in enumerate((0, 7)):
        counts = legacy_draws(3, index, "shot_noise", severity).poisson(x[i] / 255.0 * c)
        np.testing.assert_array_equal(out[i], to_uint8(counts / c))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_salts_the_published_fraction(severity):
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    x = np.full((2, 64, 64, 3), 128, np.uint8)
    out = corrupt_pixels(x, Corruption("impulse_noise", severity), 0, np.arange(2))
    assert set(np.unique(out)) <= {0, 128, 255}
    assert abs((out != 128).mean() - amount) < 0.01
    assert abs((out == 255).mean() - amount / 2) < 0.01  # salt and pepper, half and half


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_raises_the_hsv_value(severity):
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    x = images()
    x[0, 0, 0] = 0  # black: no hue, becomes gray at value c
    unit = x / 255.0
    value = unit.max(axis=-1, keepdims=True)
    # Hue and saturation kept: RGB scales with V, so raising V to min(V + c, 1) scales the pixel.
    expected = np.where(value > 0, unit * np.minimum(value + c, 1) / np.maximum(value, 1e-12), c)
    out = corrupt_pixels(x, Corruption("brightness", severity), 0, np.arange(len(x)))
    assert np.abs(out.astype(int) - to_uint8(expected).astype(int)).max() <= 1  # float rounding at truncation
    assert np.abs(out[0, 0, 0].astype(int) - int(c * 255)).max() <= 1


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_shrinks_towards_the_channel_means(severity):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    x = images()
    unit = x / 255.0
    means = unit.mean(axis=(1, 2), keepdims=True)
    out = corrupt_pixels(x, Corruption("contrast", severity), 0, np.arange(len(x)))
    assert np.abs(out.astype(int) - to_uint8((unit - means) * c + means).astype(int)).max() <= 1
    gray = corrupt_pixels(x[..., 0], Corruption("contrast", severity), 0, np.arange(len(x)))
    assert gray.shape == x.shape[:3]
    assert np.abs(gray.astype(int) - out[..., 0].astype(int)).max() <= 1


@pytest.mark.parametrize("severity", SEVERITIES)
def test_jpeg_compression_is_pil_jpeg_at_the_published_quality(severity):
    from PIL import Image

    quality = [25, 18, 15, 10, 7][severity - 1]
    x = images()
    out = corrupt_pixels(x, Corruption("jpeg_compression", severity), 0, np.arange(len(x)))
    for image, got in zip(x, out):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        np.testing.assert_array_equal(got, np.asarray(Image.open(buffer).convert("RGB")))


def test_gray_images_keep_their_shape_and_the_published_noise():
    x = images(3, channels=1)
    corruption = Corruption("gaussian_noise", 2)
    for pixels in (x, x[..., 0]):
        out = corrupt_pixels(pixels, corruption, 5, np.arange(3))
        assert out.shape == pixels.shape and out.dtype == np.uint8
        for i in range(3):  # the first channel of three equal ones, with its own draws
            noise = legacy_draws(5, i, "gaussian_noise", 2).normal(size=(32, 40, 3), scale=0.12)[..., 0]
            np.testing.assert_array_equal(out[i].reshape(32, 40), to_uint8(x[i, ..., 0] / 255.0 + noise))


# --- determinism ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_deterministic_whatever_the_chunking(name):
    x, corruption = images(10), Corruption(name, 3)
    whole = corrupt_pixels(x, corruption, 42, np.arange(10))
    assert whole.shape == x.shape and whole.dtype == np.uint8
    np.testing.assert_array_equal(whole, corrupt_pixels(x, corruption, 42, np.arange(10)))
    parts = [corrupt_pixels(x[:3], corruption, 42, np.arange(3)), corrupt_pixels(x[3:], corruption, 42,
                                                                                 np.arange(3, 10))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    if name in RANDOM:
        assert not np.array_equal(whole, corrupt_pixels(x, corruption, 43, np.arange(10)))
        # An image's draws follow its index in the dataset, not its place in the chunk.
        assert not np.array_equal(whole[1], corrupt_pixels(x[1:2], corruption, 42, np.array([0]))[0])


def _digest(names, seed):
    x = images(3, seed=1)
    digest = hashlib.sha256()
    for name in names:
        digest.update(corrupt_pixels(x, Corruption(name, 5), seed, np.arange(3)).tobytes())
    return digest.hexdigest()


def test_deterministic_across_processes():
    names = ["gaussian_noise", "impulse_noise", "glass_blur", "frost", "fog", "elastic_transform"]
    code = f"import sys; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r}); " \
           f"import test_corrupt as t; print(t._digest({names!r}, 9))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip().splitlines()[-1] == _digest(names, 9)


def test_global_random_state_is_left_as_it_was(monkeypatch):
    np.random.seed(123)
    expected = np.random.RandomState(123).random(5)
    for name in ("gaussian_noise", "frost", "glass_blur", "impulse_noise"):
        corrupt_pixels(images(2), Corruption(name, 2), 0, np.arange(2))
    np.testing.assert_array_equal(np.random.random(5), expected)

    import imagecorruptions

    def fails(image, **kwargs):
        np.random.random(10)
        raise RuntimeError("boom")

    np.random.seed(7)
    monkeypatch.setattr(imagecorruptions, "corrupt", fails)
    with pytest.raises(RuntimeError):
        corrupt_pixels(images(2), Corruption("fog", 1), 0, np.arange(2))
    np.testing.assert_array_equal(np.random.random(3), np.random.RandomState(7).random(3))


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 31, 64, 3), (2, 64, 8), (1, 8, 8, 1)])
def test_small_images_are_refused_in_one_line(shape):
    with pytest.raises(ValueError) as error:
        corrupt_pixels(np.zeros(shape, np.uint8), Corruption("fog", 1), 0, np.arange(shape[0]))
    message = str(error.value)
    assert "\n" not in message and "32" in message and "reference implementation" in message


@pytest.mark.parametrize("pixels, indices", [
    (np.zeros((2, 32, 32, 3), np.float32), np.arange(2)),
    (np.zeros((2, 32, 32, 4), np.uint8), np.arange(2)),
    (np.zeros((2, 32, 32, 3), np.uint8), np.arange(3)),
    (np.zeros((2, 32, 32, 3), np.uint8), np.array([0, -1])),
])
def test_bad_pixels_or_indices_are_refused(pixels, indices):
    with pytest.raises(ValueError):
        corrupt_pixels(pixels, Corruption("fog", 1), 0, indices)
    with pytest.raises(ValueError, match="seed"):
        corrupt_pixels(np.zeros((1, 32, 32, 3), np.uint8), Corruption("fog", 1), -1, np.arange(1))


def test_imported_lazily_and_missing_extra_is_one_line(monkeypatch):
    code = "import sys, ptqcal.data.corrupt; print(sorted({'imagecorruptions', 'cv2', 'numba', 'skimage'} & " \
           "set(sys.modules)))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "[]", child.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # as if not installed
    C._library.cache_clear()
    try:
        with pytest.raises(ValueError) as error:
            corrupt_pixels(images(1), Corruption("fog", 1), 0, np.arange(1))
        assert str(error.value) == "corruptions need the optional extra: pip install 'ptqcal[shift]'"
    finally:
        C._library.cache_clear()


def test_the_pixel_stream_corrupts_each_image_by_its_position_whatever_the_chunks(tmp_path, monkeypatch):
    """Image files streamed through :class:`~ptqcal.data.Pixels` with a corruption: each decoded
    image is corrupted as :func:`corrupt_pixels` corrupts it at its position in the split (an
    undecodable file before it does not move it), in chunks of any size, and cached."""
    from PIL import Image

    from ptqcal.cache import Cache
    from ptqcal.data import Pixels, Split, decode_images
    from ptqcal.data import pixels as P
    from ptqcal.models import PreprocessCfg

    paths = []
    for index, image in enumerate(images(n=7, height=32, width=32, seed=3)):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    paths[2].write_bytes(b"not an image")
    split = Split(paths, np.arange(7) % 3)
    preprocess = PreprocessCfg(input_size=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3, resize=None)
    noise = Corruption("gaussian_noise", 2)
    decoded, _ = decode_images(split, (3, 32, 32))
    kept = np.array([0, 1, 3, 4, 5, 6])
    expected = np.concatenate([corrupt_pixels(decoded.images[i:i + 1], noise, 5, kept[i:i + 1]) for i in range(6)])
    for chunk_bytes in (3 * 32 * 32 * 2, P.CHUNK_BYTES):  # chunks of 2 images, then one chunk
        monkeypatch.setattr(P, "CHUNK_BYTES", chunk_bytes)
        cache = Cache(tmp_path / f"cache{chunk_bytes}")
        streamed = Pixels(split, preprocess, cache).corrupted(noise, 5)
        np.testing.assert_array_equal(np.concatenate(list(streamed.chunks())), expected)
        np.testing.assert_array_equal(streamed.labels, split.labels[kept])
        again = Pixels(split, preprocess, cache).corrupted(noise, 5)
        np.testing.assert_array_equal(np.concatenate(list(again.chunks())), expected)
        assert cache.misses == 2 * streamed.num_chunks  # each chunk decoded once and corrupted once


def test_the_same_files_at_another_position_or_in_another_split_draw_other_noise(tmp_path, monkeypatch):
    """Noise is seeded by position and split: two files at positions 2-3 of one list are not the cached
    copies of the same files at positions 0-1 of another, and a calibration stream differs from the
    evaluation's at the same positions."""
    from PIL import Image

    from ptqcal.cache import Cache
    from ptqcal.data import Pixels, Split, decode_images
    from ptqcal.data import pixels as P
    from ptqcal.models import PreprocessCfg

    paths = []
    for index, image in enumerate(images(n=4, height=32, width=32, seed=5)):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    monkeypatch.setattr(P, "CHUNK_BYTES", 3 * 32 * 32 * 2)  # chunks of 2 images
    preprocess = PreprocessCfg(input_size=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3, resize=None)
    noise, cache = Corruption("shot_noise", 3), Cache(tmp_path / "cache")
    labels = np.zeros(4, np.int64)
    first = Pixels(Split(paths, labels), preprocess, cache).corrupted(noise, 0)
    np.concatenate(list(first.chunks()))  # positions 0-3 cached
    moved = Pixels(Split([paths[2], paths[3], paths[0], paths[1]], labels), preprocess, cache).corrupted(noise, 0)
    decoded = decode_images(Split(paths[:2], labels[:2]), (3, 32, 32))[0].images
    np.testing.assert_array_equal(moved.chunk(1).images, corrupt_pixels(decoded, noise, 0, np.array([2, 3])))
    calibration = Pixels(Split(paths, labels), preprocess, cache).corrupted(noise, 0, stream=1)
    np.testing.assert_array_equal(calibration.chunk(0).images, corrupt_pixels(decoded, noise, 0, np.arange(2), 1))
    assert not np.array_equal(calibration.chunk(0).images, first.chunk(0).images)
