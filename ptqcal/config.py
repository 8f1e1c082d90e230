"""The settings of one ``ptqcal run``, with their defaults and validation."""

from __future__ import annotations

import os
from importlib import resources
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError

CALIB_METHODS = ("minmax", "mse", "percentile", "entropy")
SHIPPED_CONFIGS = Path(str(resources.files("ptqcal.configs")))  # configs/ installed as ptqcal.configs
EXECUTIONS = ("deployed", "simulated")
DEFAULT_MODELS = ("digits_resnet8", "digits_resnet8_ls")  # plain and label-smoothed training


def default_cache_dir() -> Path:
    """``$PTQCAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/ptqcal``, else ``~/.cache/ptqcal``."""
    if os.environ.get("PTQCAL_CACHE_DIR"):
        return Path(os.environ["PTQCAL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptqcal"


@dataclass
class RunConfig:
    model: str = "digits_resnet8"  # a registry name or a path to an .onnx file
    weights: Path | None = None
    dataset: str | None = None  # a kind (digits, cifar100, imagenet, folder, csv, npz) or FILE.npz
    data_dir: Path | None = None  # where the dataset lives (file or folder)
    labels: Path | None = None  # labels file for a flat ImageNet val folder
    calib_data: Path | None = None  # a separate calibration pool of the same dataset kind
    download: bool = False  # CIFAR through torchvision, when online
    strict: bool = False  # an image that fails to decode is an error instead of a skipped warning
    eval_size: int | None = None  # evaluate on a seeded subset of this many images
    weight_bits: tuple[int, ...] = (8, 7, 6, 5, 4)
    act_bits: tuple[int, ...] = (8,)
    fp16: bool = False  # add half precision to the sweep
    weight_scale: str = "torch"  # "torch": max|w| / ((qmax - qmin) / 2); "ort": max|w| / qmax
    skip_first_layer: bool = False
    skip_last_layer: bool = False
    exclude: tuple[str, ...] = ()  # node names kept in float
    execution: str = "deployed"  # "deployed": ORT's fused integer kernels; "simulated": float ops between Q/DQ
    calib_size: int = 256
    calib_method: str = "mse"
    calib_ranges: Path | None = None  # reuse the ranges an earlier run saved instead of calibrating
    out: Path | None = None  # default: ptqcal_runs/<model>
    seed: int = 0
    repeats: int = 1  # calibration draws (seed, seed + 1, ...): metrics as mean ± std
    batch_size: int = 256
    cache_dir: Path = field(default_factory=default_cache_dir)
    mean: tuple[float, ...] | None = None  # preprocessing overrides for an .onnx model
    std: tuple[float, ...] | None = None
    pixel_max: float | None = None
    resize: int | None = None  # short side before the centre crop, for an .onnx model (0: none)
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
        for label, bits in (("weight", self.weight_bits), ("activation", self.act_bits)):
            if not bits:
                raise UserError(f"give at least one {label} bit width")
            if len(set(bits)) != len(bits):
                raise UserError(f"repeated {label} bit width in {list(bits)}")
        if self.execution not in EXECUTIONS:
            raise UserError(f"unknown execution {self.execution!r}: choose {' or '.join(EXECUTIONS)}")
        if self.calib_method not in CALIB_METHODS:
            raise UserError(f"unknown calibration method {self.calib_method!r}: choose {', '.join(CALIB_METHODS)}")
        if self.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {self.repeats}")
        if self.calib_size < 1 or self.batch_size < 1 or (self.eval_size is not None and self.eval_size < 1):
            raise UserError("--calib-size, --eval-size and --batch-size must be positive")
        if self.weights is not None and self.is_onnx_file:
            raise UserError("--weights is for registry models; an .onnx file carries its own weights")
        return self

    @classmethod
    def fields(cls) -> set[str]:
        return set(cls.__dataclass_fields__)

    def to_dict(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()}


def config_keys() -> set[str]:
    """Settings a config file may hold: the command line's, so ``precisions`` and not ``fp16``."""
    return (RunConfig.fields() - {"fp16", "progress"}) | {"precisions"}


def read_config_file(path: Path) -> dict:
    """Settings from a TOML file whose keys are ``ptqcal run``'s options (``weight-bits`` or
    ``weight_bits``). ``$VARS`` in strings are expanded; a setting whose variable is not set is
    left out, so the command line (or the error for a missing path) decides."""
    import tomllib

    path = Path(path)
    if not path.is_file() and path.suffix == "" and (SHIPPED_CONFIGS / f"{path}.toml").is_file():
        path = SHIPPED_CONFIGS / f"{path}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.toml")))
        raise UserError(f"config file not found: {path} (shipped configs: {shipped})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from exc
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in config_keys():
            raise UserError(f"{path}: unknown setting {key!r}")
        if isinstance(value, str):
            value = os.path.expandvars(value)
            if "$" in value:  # an unset variable: leave the setting to the command line
                continue
        values[name] = value
    return values
