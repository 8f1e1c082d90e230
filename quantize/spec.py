"""What one quantized configuration is: bit widths and conventions (no onnxruntime)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ptqcal.errors import InputError

BIT_WIDTHS = range(2, 9)


class QuantizeError(InputError):
    """A quantization that cannot be built as asked (bit width, layer names, saved ranges)."""


class WeightScale(StrEnum):
    """How a b-bit per-channel symmetric weight scale is derived from max|w|."""

    TORCH = "torch"  # PyTorch's per_channel_symmetric: max|w| / ((qmax - qmin) / 2)
    ORT = "ort"  # ONNX Runtime's symmetric: max|w| / qmax


@dataclass(frozen=True)
class QuantSpec:
    """One point of the sweep: per-channel symmetric weights, per-tensor asymmetric activations."""

    weight_bits: int
    act_bits: int = 8
    weight_scale: WeightScale = WeightScale.TORCH
    exclude: tuple[str, ...] = field(default=(), compare=False)  # node names left in float
    quantize_outputs: bool = False  # also quantize the logits (ORT's default; off so they stay float)
    quantize_bias: bool = True  # int32 biases (needed by the integer kernels); False keeps them float

    @property
    def name(self) -> str:
        return f"a{self.act_bits}w{self.weight_bits}"

    def validate(self) -> "QuantSpec":
        """Raise :class:`QuantizeError` unless both bit widths are 2..8; returns ``self``."""
        for setting, label, bits in (("weight_bits", "weight", self.weight_bits),
                                     ("act_bits", "activation", self.act_bits)):
            if bits not in BIT_WIDTHS:
                raise QuantizeError(f"{label} bit width {bits} is not supported: choose 2 to 8", setting=setting)
        WeightScale(self.weight_scale)
        return self


def weight_grid(bits: int) -> tuple[int, int]:
    """The signed b-bit integer range [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
