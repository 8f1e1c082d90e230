"""The built-in models, trained here on scikit-learn's 8x8 digits: a small CIFAR-style ResNet (the
default) and a small Vision Transformer (patch embedding, multi-head attention, LayerNorm, GELU MLP).

Both train on a small split without much regularisation so that, like the CIFAR models of the
paper, they are overconfident and wrong on a few percent of held-out images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptqcal.atomic import atomic_path

from .preprocess import DIGITS_PREPROCESS
from .resnet import CifarResNet


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 80
    batch_size: int = 64
    lr: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"  # sgd (momentum 0.9) or adamw
    weight_decay: float = 0.0
    shift: int = 0  # random translation by up to this many pixels (the ViT has no convolution to lend it)


def build_digits_resnet() -> CifarResNet:
    """ResNet8 with 16/32/64 channels on 1x8x8 inputs: 8x8 -> 4x4 -> 2x2 -> pool -> 10 logits."""
    return CifarResNet(depth=8, num_classes=10, in_channels=1)


def build_digits_vit() -> nn.Module:
    """torchvision's ``VisionTransformer`` at a small size: 4x4 patches of a 1x8x8 digit (4 tokens and
    a class token), 2 encoder layers of 4-head attention, width 64, GELU MLP of 128."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10)
    model.conv_proj = nn.Conv2d(1, 64, kernel_size=4, stride=4)  # torchvision's patch embedding takes RGB
    return model


ARCHITECTURES = {  # name: (builder, how it trains), each reaching 95-96% on the held-out digits
    "resnet8": (build_digits_resnet, TrainCfg()),
    "vit": (build_digits_vit, TrainCfg(epochs=150, lr=2e-3, optimizer="adamw", weight_decay=0.05, shift=1)),
}


def _shifted(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``pixels`` in each direction, the border filled with the background."""
    n, channels, height, width = x.shape
    padded = F.pad(x, (pixels,) * 4, value=float(x.min()))
    offsets = torch.randint(0, 2 * pixels + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(height))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(width))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(channels)[None, :, None, None], rows, cols]


def train_digits(build: Callable[[], nn.Module], images: np.ndarray, labels: np.ndarray,
                 cfg: TrainCfg = TrainCfg()) -> nn.Module:
    """Train deterministically (fixed seed, one-cycle schedule) and return the model in eval mode."""
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the initialisation is seeded without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = build()
    x = torch.from_numpy(DIGITS_PREPROCESS(images))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    steps_per_epoch = -(-len(y) // cfg.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9) if cfg.optimizer == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            inputs = _shifted(x[batch], cfg.shift, generator) if cfg.shift else x[batch]
            loss = F.cross_entropy(model(inputs), y[batch], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def cached_digits_model(architecture: str, images: np.ndarray, labels: np.ndarray, cache_dir: Path,
                        cfg: TrainCfg) -> tuple[nn.Module, Path]:
    """Load the trained model from ``cache_dir`` or train and cache it; keyed by data and settings."""
    build = ARCHITECTURES[architecture][0]
    key = hashlib.sha256()
    key.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    key.update(np.ascontiguousarray(images).tobytes())
    key.update(np.ascontiguousarray(labels).tobytes())
    key.update(torch.__version__.encode())
    path = Path(cache_dir) / f"digits_{architecture}-{key.hexdigest()[:16]}.pt"
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), path
    model = train_digits(build, images, labels, cfg)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model, path


def build_digits_model(weights: Path | None, train, cache_dir: Path, label_smoothing: float = 0.0,
                       architecture: str = "resnet8") -> nn.Module:
    """The registry's ``digits_resnet8`` (and ``_ls``) and ``digits_vit``: trained here on ``train``
    (cached in ``cache_dir``), or loaded from ``weights`` (or ``random``)."""
    from .weights import ModelError, random_or_loaded

    build, cfg = ARCHITECTURES[architecture]
    if weights is not None:
        return random_or_loaded(build, weights)
    if train is None:
        raise ModelError("the digits models train on the digits dataset's train split; this dataset has none "
                         "(use the digits dataset, or give trained weights)", setting="dataset")
    model, _ = cached_digits_model(architecture, train.images, train.labels, cache_dir,
                                   replace(cfg, label_smoothing=label_smoothing))
    return model
