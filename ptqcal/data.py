"""Datasets as raw-pixel arrays with a calibration pool and an evaluation split (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # raw pixels, (N, H, W[, C])
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    name: str
    calib_pool: Split  # images the calibration subset is drawn from; never evaluated on
    eval: Split
    train: Split | None = None  # only for datasets a built-in model is trained on


def load_digits() -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits: 300 train, 300 calibration pool, 1,197 evaluation.

    The split is fixed (seed 0) so that the trained model and the evaluation set do not depend
    on the run's seed; the run's seed only draws the calibration subset.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise UserError("the digits dataset needs scikit-learn: pip install 'ptqcal[torch]'") from exc
    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    train, calib, evaluation = order[:300], order[300:600], order[600:]
    everything = Split(images, labels)
    return Dataset("digits", everything.take(calib), everything.take(evaluation), everything.take(train))


def load_npz(path: Path) -> Dataset:
    """An ``.npz`` with ``images`` (N, H, W[, C]) and ``labels`` (N,), plus optional
    ``calib_images``/``calib_labels``; without them the first half is the calibration pool."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    try:
        arrays = np.load(path)
        images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path} is not an .npz with 'images' and 'labels' arrays") from exc
    if len(images) != len(labels) or len(labels) < 2:
        raise UserError(f"{path}: 'images' and 'labels' must have the same length (>= 2)")
    if "calib_images" in arrays:
        calib = Split(arrays["calib_images"], arrays["calib_labels"].astype(np.int64))
        return Dataset(path.stem, calib, Split(images, labels))
    half = len(labels) // 2
    return Dataset(path.stem, Split(images[:half], labels[:half]), Split(images[half:], labels[half:]))


def load_dataset(name: str) -> Dataset:
    if name == "digits":
        return load_digits()
    if name.endswith(".npz"):
        return load_npz(Path(name))
    raise UserError(f"unknown dataset {name!r}: use 'digits' or a path to an .npz file")


def draw_calibration(pool: Split, size: int, seed: int) -> Split:
    """A reproducible calibration subset of ``size`` images drawn from the pool with ``seed``."""
    if size < 1:
        raise UserError(f"--calib-size must be at least 1, got {size}")
    if size > len(pool):
        raise UserError(f"--calib-size {size} is larger than the calibration pool ({len(pool)} images)")
    index = np.sort(np.random.default_rng(seed).choice(len(pool), size=size, replace=False))
    return pool.take(index)
