"""What one quantized configuration is: bit widths and conventions (no onnxruntime)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from ptqcal.errors import InputError

BIT_WIDTHS = range(2, 9)
MIXED_NAME = "mixed"  # the configuration whose weight bits are chosen layer by layer


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
    # (layer, bits) pairs that override ``weight_bits`` for those layers: a mixed-precision model
    layer_bits: tuple[tuple[str, int], ...] = ()

    @property
    def name(self) -> str:
        return MIXED_NAME if self.layer_bits else f"a{self.act_bits}w{self.weight_bits}"

    def bits_of(self, layer: str) -> int:
        """The weight bit width of ``layer`` (a Conv/Gemm/MatMul node name)."""
        return dict(self.layer_bits).get(layer, self.weight_bits)

    @property
    def all_weight_bits(self) -> set[int]:
        return {self.weight_bits, *(bits for _, bits in self.layer_bits)}

    def validate(self) -> "QuantSpec":
        """Raise :class:`QuantizeError` unless both bit widths are 2..8; returns ``self``."""
        for setting, label, bits in (*(("weight_bits", "weight", b) for b in sorted(self.all_weight_bits)),
                                     ("act_bits", "activation", self.act_bits)):
            if bits not in BIT_WIDTHS:
                raise QuantizeError(f"{label} bit width {bits} is not supported: choose 2 to 8", setting=setting)
        WeightScale(self.weight_scale)
        return self


def weight_grid(bits: int) -> tuple[int, int]:
    """The signed b-bit integer range [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def stored_bits(bits: int) -> int:
    """The bits each b-bit weight code takes in the file: 2-bit codes are packed INT2 (four to a
    byte), 3- and 4-bit codes packed INT4 (two to a byte), and 5..8-bit codes sit in int8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def stored_bytes(elements: int, bits: int) -> int:
    """The bytes ``elements`` b-bit weight codes take in the file (:func:`stored_bits` each)."""
    return math.ceil(elements * stored_bits(bits) / 8)
