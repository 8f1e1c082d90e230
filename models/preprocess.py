"""Preprocessing specs: how raw pixels become a model's input tensor (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PreprocessCfg:
    """What a classifier expects, in the spirit of timm's ``pretrained_cfg``.

    Pixels are first divided by ``pixel_max`` (to [0, 1]) and then normalised per channel:
    ``(x / pixel_max - mean) / std``. TF-style scaling ``(x*255 - 127) / 128`` is
    ``mean=127/255, std=128/255``.
    """

    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max: float = 255.0
    resize: int | None = None  # short side, before a centre crop to input_size (images only)
    interpolation: str = "bilinear"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Normalise ``(N, H, W, C)`` or ``(N, H, W)`` raw pixels into ``(N, C, H, W)`` float32."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., None]
        channels, height, width = self.input_size
        if x.shape[1:] != (height, width, channels):
            raise ValueError(f"images of shape {x.shape[1:]} do not match the model input (H, W, C) = "
                             f"{(height, width, channels)}")
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x / np.float32(self.pixel_max) - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_dict(self) -> dict:
        return asdict(self)
