"""The built-in model: a small CIFAR-style ResNet trained on scikit-learn's 8x8 digits.

Trained deliberately without regularisation on a small training split so that, like the CIFAR
models of the paper, it is overconfident and wrong on a few percent of held-out images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


def build_digits_resnet() -> CifarResNet:
    """ResNet8 with 16/32/64 channels on 1x8x8 inputs: 8x8 -> 4x4 -> 2x2 -> pool -> 10 logits."""
    return CifarResNet(depth=8, num_classes=10, in_channels=1)


def train_digits_resnet(images: np.ndarray, labels: np.ndarray, cfg: TrainCfg = TrainCfg()) -> CifarResNet:
    """Train deterministically (fixed seed, one-cycle SGD) and return the model in eval mode."""
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the initialisation is seeded without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = build_digits_resnet()
    x = torch.from_numpy(DIGITS_PREPROCESS(images))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    steps_per_epoch = -(-len(y) // cfg.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def cached_digits_resnet(images: np.ndarray, labels: np.ndarray, cache_dir: Path,
                         cfg: TrainCfg = TrainCfg()) -> tuple[CifarResNet, Path]:
    """Load the trained model from ``cache_dir`` or train and cache it; keyed by data and settings."""
    key = hashlib.sha256()
    key.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    key.update(np.ascontiguousarray(images).tobytes())
    key.update(np.ascontiguousarray(labels).tobytes())
    key.update(torch.__version__.encode())
    path = Path(cache_dir) / f"digits_resnet8-{key.hexdigest()[:16]}.pt"
    model = build_digits_resnet()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), path
    model = train_digits_resnet(images, labels, cfg)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model, path


def build_digits_model(weights: Path | None, train, cache_dir: Path, label_smoothing: float = 0.0) -> CifarResNet:
    """The registry's ``digits_resnet8`` (and ``_ls``): trained here on ``train`` (cached in
    ``cache_dir``), or loaded from ``weights`` (or ``random``)."""
    from .weights import ModelError, random_or_loaded

    if weights is not None:
        return random_or_loaded(build_digits_resnet, weights)
    if train is None:
        raise ModelError("the digits models train on the digits dataset's train split; this dataset has none "
                         "(use the digits dataset, or give trained weights)", setting="dataset")
    model, _ = cached_digits_resnet(train.images, train.labels, cache_dir, TrainCfg(label_smoothing=label_smoothing))
    return model
