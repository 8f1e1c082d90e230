"""Images the benchmarks share: CIFAR-sized pixels from the real samples in ../shared (a leaf that
every bench script may import, so that none imports another)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("PTQCAL_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def cifar_images(count: int, seed: int) -> np.ndarray:
    """``count`` CIFAR-sized uint8 images: the real ones in ../shared, flipped and shifted."""
    files = [SHARED / "data/cifar100/test_head20.npz", SHARED / "data/cifar100/train_subset.npz"]
    rng = np.random.default_rng(seed)
    if not all(f.exists() for f in files):
        return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    base = np.concatenate([np.load(f)["images"] for f in files])
    picks = base[rng.integers(0, len(base), count)]
    flips = rng.uniform(size=count) < 0.5
    picks[flips] = picks[flips, :, ::-1]
    shifts = rng.integers(-4, 5, (count, 2))
    return np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(picks, shifts)])
