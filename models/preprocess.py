"""Preprocessing specs: how raw pixels become a model's input tensor (numpy only, no torch)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .weights import ModelError

MAX_PIXELS = 50_000_000  # per image: a model that asks for more is refused before anything is decoded
METADATA_KEY = "ptqcal.preprocess"  # ONNX metadata_props entry ptqcal writes on export and reads back
LAYOUTS = ("NCHW", "NHWC")
INPUT_DTYPES = ("float32", "float16", "float64", "uint8")  # uint8: raw pixels, normalised inside the graph


@dataclass(frozen=True)
class PreprocessCfg:
    """What a classifier expects, in the spirit of timm's ``pretrained_cfg``.

    Pixels are first divided by ``pixel_max`` (to [0, 1]) and then normalised per channel:
    ``(x / pixel_max - mean) / std``. TF-style scaling ``(x*255 - 127) / 128`` is
    ``mean=127/255, std=128/255``.

    ``layout`` and ``dtype`` are what the graph's input declares (read from it, never stored in
    metadata): a ``uint8`` input takes the resized pixels as they are and normalises them inside
    the graph, so ``mean``, ``std`` and ``pixel_max`` do not apply to it.
    """

    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max: float = 255.0
    resize: int | None = None  # short side, before a centre crop to input_size (images only)
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    dtype: str = "float32"

    @property
    def normalises(self) -> bool:
        """Whether ptqcal normalises the pixels (False: the graph takes raw uint8 pixels)."""
        return self.dtype != "uint8"

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
        if channels not in (1, 3):
            raise ModelError(f"the model takes {channels}-channel images; ptqcal feeds RGB (3) or grayscale (1)",
                             setting="model")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, channels) or not all(math.isfinite(v) for v in values):
                raise ModelError(f"{name} {list(values)} must be 1 or {channels} finite numbers for a "
                                 f"{channels}-channel input", setting=name)
        if any(v <= 0 for v in self.std):  # a negative std would mirror the images, a zero divides by zero
            raise ModelError(f"std {list(self.std)} must be positive: it has "
                             f"{'a zero' if 0 in self.std else 'a negative value'}", setting="std")
        if not (math.isfinite(self.pixel_max) and self.pixel_max > 0):
            raise ModelError(f"pixel_max must be a positive number, got {self.pixel_max}", setting="pixel_max")
        if self.layout not in LAYOUTS:
            raise ModelError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}", setting="layout")
        if self.dtype not in INPUT_DTYPES:
            raise ModelError(f"input type {self.dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        if self.resize is not None and self.resize < 1:
            raise ModelError(f"resize must be a positive size, got {self.resize}", setting="resize")
        if self.resize is not None and self.resize * self.resize > MAX_PIXELS:  # the smallest image it makes
            raise ModelError(f"resizing the short side to {self.resize} makes images of more than "
                             f"{MAX_PIXELS // 1_000_000} megapixels, which is refused", setting="resize")
        return self

    def to_metadata(self) -> str:
        """The JSON ptqcal stores in an exported model's ``metadata_props``."""
        return json.dumps({k: v for k, v in asdict(self).items() if k not in ("input_size", "layout", "dtype")})

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
        """``(N, H, W, C)`` or ``(N, H, W)`` raw pixels as the model's input: normalised to
        ``dtype`` (or kept as uint8 pixels), in ``layout``."""
        x = np.asarray(images)
        if x.ndim == 1 and not x.size:  # no image decoded: nothing to feed the model
            raise ModelError("none of the images could be decoded")
        if x.ndim == 3:
            x = x[..., None]
        channels, height, width = self.input_size
        if x.shape[1:] != (height, width, channels):
            raise ModelError(f"images of shape {x.shape[1:]} do not match the model input (H, W, C) = "
                             f"{(height, width, channels)}: every image (calibration and evaluation) must have "
                             "the model's size")
        # A 1-channel image has the same bytes in either layout (the transpose is a view at the end);
        # other images are transposed while still pixels, a quarter of the bytes float32 would move.
        early = self.layout == "NCHW" and channels > 1
        if early:
            x = x.transpose(0, 3, 1, 2)
        if self.normalises:
            shape = (-1, 1, 1) if early else (-1,)
            mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
            std = np.asarray(self.std, dtype=np.float32).reshape(shape)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # checked below, said in one line
                x = np.ascontiguousarray(x).astype(np.float32)  # one copy, then the float32 arithmetic in place
                x /= np.float32(self.pixel_max)
                x -= mean
                x /= std
                x = x.astype(self.dtype, copy=False)
            if not np.isfinite(x).all():
                raise ModelError(f"the images overflow {self.dtype} once normalised ((pixel / {self.pixel_max:g} - "
                                 f"mean) / std): their pixel values are too large for this preprocessing")
        elif x.dtype != np.uint8:
            if not (np.all((x >= 0) & (x <= 255)) and np.all(np.round(x) == x)):
                raise ModelError("the model takes uint8 pixels, and these images hold values that are not whole "
                                 "numbers in 0..255")
            x = x.astype(np.uint8)
        if self.layout == "NCHW" and not early:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

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
