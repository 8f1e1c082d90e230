"""Image files decoded, resized and centre-cropped for the model in parallel worker threads (PIL
releases the GIL while decoding and resizing) into one uint8 array; normalisation happens batch by
batch when a model consumes them."""

from __future__ import annotations

import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import UserError
from .splits import Split


def load_image(path: Path, size: tuple[int, int, int], resize: int | None = None,
               interpolation: str = "bilinear") -> np.ndarray:
    """Decode one image to ``(H, W, C)`` uint8 as torchvision's ``Resize(resize)`` +
    ``CenterCrop((H, W))`` would on a PIL image; without ``resize``, resize straight to (H, W)."""
    from PIL import Image

    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[interpolation]
    # opened without blocking and checked on the open file: a pipe put in an image's place blocks no one
    handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    with handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        return _decode_open(handle, path, size, resize, method)


def _decode_open(handle, path: Path, size: tuple[int, int, int], resize: int | None, method) -> np.ndarray:
    from PIL import Image

    channels, height, width = size
    with Image.open(handle) as image:
        if image.width * image.height > Image.MAX_IMAGE_PIXELS:  # PIL would only warn (a decompression bomb)
            raise ValueError(f"{image.width}x{image.height} pixels is too large to decode")
        image = image.convert("RGB" if channels == 3 else "L")
        if resize is None:
            image = image.resize((width, height), method)
        else:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = resize, int(resize * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), method)
            left = int(round((new_w - width) / 2.0))
            top = int(round((new_h - height) / 2.0))
            image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.uint8)
    return array if channels == 3 else array[..., None]


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (following symbolic links); one that cannot be looked at
    (missing, no permission) counts as one, whose opening fails as a broken image's does."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def decode_images(split: Split, size: tuple[int, int, int], resize: int | None = None,
                  interpolation: str = "bilinear", strict: bool = False, workers: int | None = None,
                  allow_empty: bool = False) -> tuple[Split, list[Path]]:
    """Decode a file split in parallel threads; images that fail are dropped (or raise with
    ``strict``) and returned by path. That none decodes is an error unless ``allow_empty``."""
    if not split.is_files:
        return split, []
    workers = workers or min(8, os.cpu_count() or 1)

    def decode(path: Path) -> np.ndarray | None:
        if not is_regular_file(path):  # a pipe, device or folder is no image, and reading it could block forever
            raise UserError(f"{path} is listed as an image but is not a regular file (a pipe, device or folder)")
        try:
            return load_image(path, size, resize, interpolation)
        except Exception as exc:  # PIL raises many types for broken files
            if strict:
                raise UserError(f"cannot decode {path}: {exc}") from exc
            return None

    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(decode, split.images))
    ok = np.array([d is not None for d in decoded], dtype=bool)
    failed = [p for p, good in zip(split.images, ok) if not good]
    for path in failed:
        warnings.warn(f"skipped an image that fails to decode: {path}", stacklevel=2)
    if not ok.any() and not allow_empty:
        raise UserError("none of the images could be decoded")
    channels, height, width = size
    images = np.stack([d for d in decoded if d is not None]) if ok.any() else \
        np.empty((0, height, width, channels), np.uint8)
    return Split(images, split.labels[ok]), failed
