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


def checked_split(images: np.ndarray, labels: np.ndarray, where: str, minimum: int = 1) -> Split:
    """Pixels ``(N, H, W[, C])`` of a real number type, all finite, with ``N`` integer labels >= 0;
    anything else is one line naming ``where``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{where}: labels must be one integer per image, got {labels.dtype} of shape "
                        f"{list(labels.shape)}")
    if len(labels) and labels.min() < 0:
        raise UserError(f"{where}: labels must be class indices >= 0, found {labels.min()}")
    if images.ndim not in (3, 4) or images.dtype.kind not in "uif" or (images.ndim == 4 and images.shape[3] > 4):
        raise UserError(f"{where}: images must be (N, H, W) or (N, H, W, C) pixel arrays, got {images.dtype} of "
                        f"shape {list(images.shape)}")
    if len(images) != len(labels) or len(labels) < minimum:
        raise UserError(f"{where}: {len(images)} images and {len(labels)} labels (at least {minimum} needed)")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise UserError(f"{where}: images hold NaN or infinite values")
    return Split(images, labels.astype(np.int64))


def checked_split_files(paths: list[Path], labels: list[int], where: str) -> Split:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0:
        raise UserError(f"{where}: labels must be class indices >= 0, found {labels.min()}")
    return Split(paths, labels)


