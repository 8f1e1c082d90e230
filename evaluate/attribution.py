"""Which layers flip confident predictions: the typed result of quantizing each weight layer alone
(numpy only; :mod:`ptqcal.attribution` runs the models)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

CONFIDENT = 0.9  # a float prediction held with at least this confidence counts as confident


@dataclass(frozen=True)
class LayerEffect:
    """One weight layer quantized alone at ``weight_bits`` (fractions; SQNR in dB)."""

    layer: str
    weight_bits: int
    swapped: float
    confident_swapped: float  # among the float model's predictions held with >= CONFIDENT (NaN: none)
    delta_top1_error: float
    sqnr_db: float  # the layer's output against float


@dataclass(frozen=True)
class Attribution:
    """Every (layer, bits) effect, measured on ``images`` evaluation images of which ``confident``
    the float model held with at least :data:`CONFIDENT`."""

    effects: list[LayerEffect] = field(default_factory=list)
    images: int = 0
    confident: int = 0
    held_out: bool = False  # the images were held out of evaluation (for a search), not a subset of it

    def ranked(self) -> list[LayerEffect]:
        """Most confident swaps first, then most swaps, then lowest SQNR."""
        return sorted(self.effects, key=lambda e: (-np.nan_to_num(e.confident_swapped), -e.swapped, e.sqnr_db))

    def to_json(self) -> dict:
        """JSON values; an undefined share (NaN: no confident prediction) is ``null`` (JSON has no NaN)."""
        return {"images": self.images, "confident": self.confident, "held_out": self.held_out,
                "effects": [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in asdict(e).items()}
                            for e in self.effects]}

    @classmethod
    def from_json(cls, values: dict) -> "Attribution":
        effects = [LayerEffect(**{k: float("nan") if v is None else v for k, v in e.items()})
                   for e in values["effects"]]
        return cls(effects, int(values["images"]), int(values["confident"]), bool(values.get("held_out", False)))


EFFECT_FIELDS = [f.name for f in fields(LayerEffect)]
