"""Preprocessing specs: how raw pixels become a model's input tensor (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

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


# What the built-in models were trained with (one place: the registry, the ONNX models' defaults
# and the digits trainer read them from here).
DIGITS_PREPROCESS = PreprocessCfg(input_size=(1, 8, 8), mean=(0.3,), std=(0.4,), pixel_max=16.0)
CIFAR100_PREPROCESS = PreprocessCfg(input_size=(3, 32, 32), mean=(0.5071, 0.4867, 0.4408),
                                    std=(0.2675, 0.2565, 0.2761))
IMAGENET_PREPROCESS = PreprocessCfg(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406),
                                    std=(0.229, 0.224, 0.225), resize=256)
# TF-style (x * 255 - 127) / 128 on [0, 1] pixels
EFFICIENTNET_LITE_PREPROCESS = PreprocessCfg(input_size=(3, 224, 224), mean=(127 / 255,) * 3,
                                             std=(128 / 255,) * 3, resize=256)
