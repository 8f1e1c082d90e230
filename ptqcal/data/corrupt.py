"""ImageNet-C corruptions (Hendrycks & Dietterich, 2019) applied to decoded uint8 pixels, reproducibly.

The reference implementation is the ``imagecorruptions`` package (optional extra ``ptqcal[shift]``,
imported only when a corruption is applied: it pulls OpenCV, numba and scikit-image). It draws its
randomness from NumPy's *global* random state, so :func:`corrupt_pixels` seeds that state for each
image from ``(seed, image index, corruption name, severity)`` and restores it afterwards: an image's
corrupted pixels do not depend on how the images are chunked or batched, nor on the process.

Randomness that does not come from NumPy's global state, and how it is made deterministic:

* ``impulse_noise`` calls scikit-image's ``random_noise``, which draws from a fresh
  ``np.random.default_rng(seed)``: freshly from the OS unless given a seed, so it gets one.
* ``glass_blur`` shuffles pixels inside a numba-compiled loop with numba's own generator, seeded
  from OS entropy unless given a seed, so it gets one (numba keeps only the low 32 bits; it reseeds
  numba's per-thread generator, which nothing else in ptqcal uses). Its first call in a process
  compiles that loop (about 2 s).
* ``frost`` picks one of six frost photographs shipped with the package and a crop of it with
  ``np.random``: deterministic once seeded. ``motion_blur`` is the package's own shift-and-add
  kernel with a ``np.random`` angle (not ImageMagick's, as in the original ImageNet-C code).
* ``brightness``, ``contrast``, ``saturate``, ``pixelate``, ``jpeg_compression``, ``defocus_blur``,
  ``gaussian_blur`` and ``zoom_blur`` draw nothing.
"""

from __future__ import annotations

import functools
import threading
import zlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..errors import InputError
from ..versions import versions

# In the package's order: the 15 benchmark corruptions, then the 4 held-out 'validation' ones.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTION_SETS = {
    "imagenet-c": CORRUPTIONS[:15],  # the benchmark's mean corruption error averages these
    "noise": CORRUPTIONS[0:3], "blur": CORRUPTIONS[3:7], "weather": CORRUPTIONS[7:10],
    "digital": CORRUPTIONS[10:15], "validation": CORRUPTIONS[15:], "all": CORRUPTIONS,
}
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the reference implementation refuses smaller images
INSTALL_HINT = "corruptions need the optional extra: pip install 'ptqcal[shift]'"
_SEEDED_BY_ARGUMENT = {"impulse_noise", "glass_blur"}  # their generators ignore NumPy's global state

# One corruption at a time in this process: the global NumPy state is seeded per image and restored.
_LOCK = threading.Lock()


class CorruptionError(InputError):
    """A corruption that cannot be applied (unknown name or severity, images too small, no extra)."""


def resolve_corruptions(names: str | Iterable[str]) -> tuple[str, ...]:
    """Corruption names, in the order given without repeats, from names or set names
    (:data:`CORRUPTION_SETS`); a string may list several separated by commas."""
    if isinstance(names, str):
        names = names.split(",")
    resolved: list[str] = []
    for name in (n.strip() for n in names):
        if name in CORRUPTION_SETS:
            found = CORRUPTION_SETS[name]
        elif name in CORRUPTIONS:
            found = (name,)
        else:
            raise CorruptionError(f"unknown corruption {name!r}: choose from {', '.join(CORRUPTION_SETS)} "
                                  f"or {', '.join(CORRUPTIONS)}", "corruptions")
        resolved += [n for n in found if n not in resolved]
    if not resolved:
        raise CorruptionError("no corruption named", "corruptions")
    return tuple(resolved)


def check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise CorruptionError(f"corruption severity must be an integer from 1 to 5, got {severity!r}", "severities")
    return int(severity)


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity; :attr:`key` (``"gaussian_noise@3"``) names it in caches and files."""

    name: str
    severity: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise CorruptionError(f"a corruption name must be a string, got {self.name!r}", "corruptions")
        if self.name not in CORRUPTIONS:
            resolve_corruptions([self.name])  # raises the one-line error listing valid names
            raise CorruptionError(f"{self.name!r} is a set of corruptions, not one", "corruptions")
        object.__setattr__(self, "severity", check_severity(self.severity))

    @property
    def key(self) -> str:
        return f"{self.name}@{self.severity}"

    @classmethod
    def from_key(cls, key: str) -> "Corruption":
        name, _, severity = key.partition("@")
        if not severity.isdigit():
            raise CorruptionError(f"expected 'name@severity', got {key!r}", "corruptions")
        return cls(name, int(severity))


def corruptions(names: str | Iterable[str], severities: Iterable[int] = SEVERITIES) -> tuple[Corruption, ...]:
    """Every named corruption at every severity, corruption by corruption."""
    levels = [check_severity(s) for s in severities]
    return tuple(Corruption(name, s) for name in resolve_corruptions(names) for s in dict.fromkeys(levels))


def image_seed(seed: int, index: int, corruption: Corruption, stream: int = 0) -> np.random.SeedSequence:
    """The seed of one image's corruption. CRC-32 names the corruption (Python's ``hash`` of a
    string changes from process to process). ``stream`` sets splits apart: the calibration image
    and the evaluation image at the same position never draw the same noise."""
    return np.random.SeedSequence([seed, index, zlib.crc32(corruption.name.encode()), corruption.severity,
                                   *([stream] if stream else [])])


def seed_words(seed: int, index: int, corruption: Corruption, stream: int = 0) -> tuple[np.ndarray, int]:
    """(128 bits for ``np.random.seed``, 32 bits for the corruptions that take a ``seed`` argument)."""
    words = image_seed(seed, index, corruption, stream).generate_state(5)
    return words[:4], int(words[4])


# what decides a corrupted image besides its pixels and seed: the reference implementation and the
# libraries it computes with (a new OpenCV may blur differently)
COMPUTED_BY = ("imagecorruptions-imaug", "numpy", "scipy", "scikit-image", "opencv", "numba")


def corruption_versions() -> dict[str, str | None]:
    return versions(COMPUTED_BY)


def check_corruptible(input_size: tuple[int, int, int], dtype: np.dtype | None = None) -> None:
    """One line, before any work, when images of ``input_size`` (channels, height, width) and
    ``dtype`` (``None``: decoded files, always uint8) cannot be corrupted, or the extra is missing."""
    channels, height, width = input_size
    if height < MIN_SIDE or width < MIN_SIDE:
        raise CorruptionError(f"corruptions need images of at least {MIN_SIDE}x{MIN_SIDE} pixels (the reference "
                              f"implementation refuses smaller), and this model reads {height}x{width}")
    if channels not in (1, 3) or (dtype is not None and np.dtype(dtype) != np.uint8):
        raise CorruptionError(f"corruptions apply to uint8 gray or RGB pixels, and these images are "
                              f"{np.dtype(dtype) if dtype is not None else 'uint8'} with {channels} channels")
    _library()


@functools.cache
def _library():
    try:
        import imagecorruptions
    except ImportError:
        raise CorruptionError(INSTALL_HINT) from None
    return imagecorruptions


def corrupt_pixels(pixels: np.ndarray, corruption: Corruption, seed: int, indices: np.ndarray,
                   stream: int = 0) -> np.ndarray:
    """``pixels`` (uint8, ``(n, H, W, C)`` with C 1 or 3, or ``(n, H, W)``) corrupted image by image,
    the same shape and type, exactly as the reference implementation (clipped, then truncated to uint8).

    ``indices`` are the images' positions in the whole dataset: with ``seed``, the corruption and
    ``stream`` (another for each split) they decide each image's random draws, so any chunking of
    the same images gives the same pixels.

    Gray images are corrupted as three equal channels (the reference implementation works on RGB)
    and keep the first: every corruption that treats channels alike gives exactly its gray version,
    with the published noise strengths (averaging the channels would shrink independent
    per-channel noise by a third); ``frost``, ``spatter`` and ``saturate`` at severities 4-5 add
    colour, of which this keeps the red channel.

    The process's global NumPy random state is saved and restored around the call. A module lock
    keeps calls in different threads from interleaving, but code in another thread that draws from
    ``np.random.*`` during a call would both disturb the corruption and be disturbed by it.
    """
    if not isinstance(corruption, Corruption):
        raise TypeError(f"corruption must be a Corruption, got {type(corruption).__name__}")
    pixels, indices = np.asarray(pixels), np.asarray(indices)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or (pixels.ndim == 4 and pixels.shape[3] not in (1, 3)):
        raise CorruptionError(f"corruptions take uint8 (n, H, W) or (n, H, W, 1 or 3) pixels, got {pixels.dtype} "
                              f"of shape {list(pixels.shape)}")
    if indices.shape != (len(pixels),) or (indices.size and (indices.dtype.kind not in "iu" or indices.min() < 0)):
        raise CorruptionError(f"expected {len(pixels)} image indices >= 0, got {indices.dtype} of shape "
                              f"{list(indices.shape)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CorruptionError(f"the corruption seed must be an integer >= 0, got {seed!r}", "seed")
    height, width = pixels.shape[1:3]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise CorruptionError(f"{corruption.name} needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels (the "
                              f"reference implementation refuses smaller), got {height}x{width}")
    corrupt = _library().corrupt
    gray = pixels.ndim == 3 or pixels.shape[3] == 1
    out = np.empty_like(pixels)
    with _LOCK:
        saved = np.random.get_state()
        try:
            for i, (image, index) in enumerate(zip(pixels, indices)):
                if gray:
                    image = np.repeat(image.reshape(height, width, 1), 3, axis=2)
                global_words, argument_seed = seed_words(int(seed), int(index), corruption, stream)
                np.random.seed(global_words)
                extra = {"seed": argument_seed} if corruption.name in _SEEDED_BY_ARGUMENT else {}
                result = corrupt(np.ascontiguousarray(image), corruption_name=corruption.name,
                                 severity=corruption.severity, **extra)
                out[i] = result[..., 0].reshape(out.shape[1:]) if gray else result
        finally:
            np.random.set_state(saved)
    return out
