"""Preprocessing specs: how raw pixels become a model's input tensor (numpy only, no torch)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .weights import ModelError

MAX_PIXELS = 50_000_000  # per image: a model that asks for more is refused before anything is decoded
METADATA_KEY = "ptqcal.preprocess"  # ONNX metadata_props entry ptqcal writes on export and reads back


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

    def check(self) -> "PreprocessCfg":
        """Raise :class:`ModelError` for constants that cannot normalise (a zero or non-finite
        std, a non-positive pixel_max, per-channel values that do not match the channels)."""
        channels, height, width = self.input_size
        if min(self.input_size) < 1:
            raise ModelError(f"input size (C, H, W) = {self.input_size} has an empty dimension", setting="input_size")
        if height * width > MAX_PIXELS:
            raise ModelError(f"the model asks for {height}x{width} images ({height * width / 1e6:.0f} "
                             f"megapixels); more than {MAX_PIXELS // 1_000_000} megapixels is refused",
                             setting="input_size")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, channels) or not all(math.isfinite(v) for v in values):
                raise ModelError(f"{name} {list(values)} must be 1 or {channels} finite numbers for a "
                                 f"{channels}-channel input", setting=name)
        if any(v == 0 for v in self.std):
            raise ModelError(f"std {list(self.std)} has a zero", setting="std")
        if not (math.isfinite(self.pixel_max) and self.pixel_max > 0):
            raise ModelError(f"pixel_max must be a positive number, got {self.pixel_max}", setting="pixel_max")
        if self.resize is not None and self.resize < 1:
            raise ModelError(f"resize must be a positive size, got {self.resize}", setting="resize")
        return self

    def to_metadata(self) -> str:
        """The JSON ptqcal stores in an exported model's ``metadata_props``."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "input_size"})

    @classmethod
    def from_metadata(cls, text: str, input_size: tuple[int, int, int]) -> "PreprocessCfg":
        try:
            values = json.loads(text)
            return cls(input_size, tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"]),
                       float(values["pixel_max"]), None if values["resize"] is None else int(values["resize"]),
                       str(values.get("interpolation", "bilinear")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"the model's {METADATA_KEY} metadata is not readable ({exc})") from exc

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


# Named preprocessing a user's model can be given (the graph supplies the input size). ``resize`` is
# the short side before the centre crop, for 224-pixel inputs; other sizes keep the same ratio.
PRESETS = {
    "imagenet": IMAGENET_PREPROCESS,  # torchvision: (x/255 - mean) / std
    "inception": PreprocessCfg((3, 299, 299), (0.5,), (0.5,), resize=342),  # x/127.5 - 1
    "tf": EFFICIENTNET_LITE_PREPROCESS,  # (x - 127) / 128
    "cifar100": CIFAR100_PREPROCESS,
    "digits": DIGITS_PREPROCESS,
    "unit": PreprocessCfg((3, 0, 0), (0.0,), (1.0,)),  # x / 255, no normalisation
    "none": PreprocessCfg((3, 0, 0), (0.0,), (1.0,), pixel_max=1.0),  # raw pixel values
}


def preset(name: str, input_size: tuple[int, int, int]) -> PreprocessCfg:
    """Preset ``name`` for a model whose input is ``input_size`` (C, H, W)."""
    if name not in PRESETS:
        raise ModelError(f"unknown preprocessing {name!r}: choose {', '.join(PRESETS)}", setting="preprocess")
    base = PRESETS[name]
    resize = None
    if base.resize is not None and base.input_size[1]:
        resize = round(base.resize * input_size[1] / base.input_size[1])
    return replace(base, input_size=input_size, resize=resize)
