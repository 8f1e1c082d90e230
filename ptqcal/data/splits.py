"""Labelled images: a split, a dataset of splits, and the checks every reader applies to what it read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Split:
    """Labelled images: raw pixels ``(N, H, W[, C])`` or image file paths."""

    images: np.ndarray | list[Path]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_files(self) -> bool:
        return isinstance(self.images, list)

    def take(self, index: np.ndarray) -> "Split":
        images = [self.images[i] for i in index] if self.is_files else self.images[index]
        return Split(images, self.labels[index])


@dataclass(frozen=True)
class Dataset:
    name: str
    eval: Split
    calib_pool: Split | None = None  # None: calibration images are held out of ``eval``
    train: Split | None = None  # only for datasets a built-in model is trained on


# The largest pixel value of any integer image format (16 bits). Larger values are not pixels, and
# overflow float32 somewhere in a model (3e38 does at its first layer): refused, not turned into NaN logits.
MAX_PIXEL_VALUE = 65535
MAX_LABEL = np.iinfo(np.int64).max


def checked_labels(labels: list[int] | np.ndarray, where: str) -> np.ndarray:
    """Integer labels as int64, each a class index >= 0 (one line naming ``where`` otherwise)."""
    if isinstance(labels, list):
        outside = next((v for v in labels if not 0 <= v <= MAX_LABEL), None)
        if outside is not None:
            raise UserError(f"{where}: labels must be class indices >= 0, found {outside}")
        return np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or int(labels.max()) > MAX_LABEL):  # uint64 would wrap to negative
        raise UserError(f"{where}: labels must be class indices >= 0, found "
                        f"{labels.min() if labels.min() < 0 else labels.max()}")
    return labels.astype(np.int64)


def checked_split(images: np.ndarray, labels: np.ndarray, where: str, minimum: int = 1) -> Split:
    """Pixels ``(N, H, W[, C])`` of a real number type, all finite and within 16 bits, with ``N``
    integer labels >= 0; anything else is one line naming ``where``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{where}: labels must be one integer per image, got {labels.dtype} of shape "
                        f"{list(labels.shape)}")
    labels = checked_labels(labels, where)
    if images.ndim not in (3, 4) or images.dtype.kind not in "uif" or (images.ndim == 4 and images.shape[3] > 4):
        raise UserError(f"{where}: images must be (N, H, W) or (N, H, W, C) pixel arrays, got {images.dtype} of "
                        f"shape {list(images.shape)}")
    if len(images) != len(labels) or len(labels) < minimum:
        raise UserError(f"{where}: {len(images)} images and {len(labels)} labels (at least {minimum} needed)")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise UserError(f"{where}: images hold NaN or infinite values")
    if images.size and images.dtype.itemsize > 1:  # 8-bit pixels are within bounds by their type
        low, high = images.min(), images.max()
        if high > MAX_PIXEL_VALUE or low < -MAX_PIXEL_VALUE:
            raise UserError(f"{where}: images hold values from {low:.3g} to {high:.3g}; pixel values are at most "
                            f"{MAX_PIXEL_VALUE} (16 bits) in magnitude, and larger ones overflow a model's float32")
    return Split(images, labels)


def checked_split_files(paths: list[Path], labels: list[int], where: str) -> Split:
    return Split(paths, checked_labels(labels, where))


