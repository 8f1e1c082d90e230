"""The settings of one ``ptqcal run``, with their defaults and validation."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError

CALIB_METHODS = ("minmax", "mse", "percentile", "entropy")


def default_cache_dir() -> Path:
    """``$PTQCAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/ptqcal``, else ``~/.cache/ptqcal``."""
    if os.environ.get("PTQCAL_CACHE_DIR"):
        return Path(os.environ["PTQCAL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptqcal"


@dataclass
class RunConfig:
    model: str = "digits_resnet8"  # a registry name or a path to an .onnx file
    weights: Path | None = None
    dataset: str | None = None  # default: the model's own dataset
    weight_bits: tuple[int, ...] = (8, 4)
    act_bits: int = 8
    calib_size: int = 256
    calib_method: str = "mse"
    out: Path | None = None  # default: ptqcal_runs/<model>
    seed: int = 0
    batch_size: int = 256
    cache_dir: Path = field(default_factory=default_cache_dir)
    mean: tuple[float, ...] | None = None  # preprocessing overrides for an .onnx model
    std: tuple[float, ...] | None = None
    pixel_max: float | None = None
    progress: bool = True

    @property
    def is_onnx_file(self) -> bool:
        return self.model.endswith(".onnx")

    @property
    def model_name(self) -> str:
        return Path(self.model).stem if self.is_onnx_file else self.model

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("ptqcal_runs") / self.model_name

    def validate(self) -> "RunConfig":
        if not self.weight_bits:
            raise UserError("give at least one weight bit width")
        if len(set(self.weight_bits)) != len(self.weight_bits):
            raise UserError(f"repeated weight bit width in {list(self.weight_bits)}")
        if self.calib_method not in CALIB_METHODS:
            raise UserError(f"unknown calibration method {self.calib_method!r}: choose {', '.join(CALIB_METHODS)}")
        if self.calib_size < 1 or self.batch_size < 1:
            raise UserError("--calib-size and --batch-size must be positive")
        if self.weights is not None and self.is_onnx_file:
            raise UserError("--weights is for registry models; an .onnx file carries its own weights")
        return self

    def to_dict(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()}
