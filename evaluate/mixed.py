"""Mixed precision guided by confidence: the order in which layers give up weight bits, and the
typed result of the search (numpy only; :mod:`ptqcal.mixed` quantizes and measures).

The search is greedy. Every layer starts at the run's highest weight width. A *move* lowers one
layer to its next width that stores fewer bytes; moves are ordered by what attribution measured
for them (each layer quantized alone): the increase in confident swaps per byte saved first, then
in swaps, then in quantization noise of the layer's output. A prefix of that order is an
assignment: the longer the prefix, the smaller the weights. The search then measures prefixes of
the whole model (every layer at its width, activations quantized) on held-out images, because
layers' effects do not simply add up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ptqcal.quantize.spec import stored_bits
from .attribution import Attribution

TARGETS = ("max_confident_swaps", "max_size_ratio")


@dataclass(frozen=True)
class Move:
    """Lower ``layer``'s weights from ``from_bits`` to ``to_bits``, saving ``saved`` bytes."""

    layer: str
    from_bits: int
    to_bits: int
    saved: int


def stored_bytes(elements: int, bits: int) -> int:
    """Bytes of ``elements`` weight codes of ``bits`` as stored (int4 packed, else int8)."""
    return math.ceil(elements * stored_bits(bits) / 8)


def ordered_moves(attribution: Attribution, elements: Mapping[str, int], widths: Sequence[int]) -> list[Move]:
    """Every move of every layer in ``elements`` (layer -> weight count, graph order), least
    sensitive per byte saved first; a layer's moves come in order (8 -> 4 before 4 -> 2)."""
    effect = {(e.layer, e.weight_bits): e for e in attribution.effects}

    def cost(layer: str, old: int, new: int, saved: int) -> tuple[float, float, float]:
        before, after = effect[layer, old], effect[layer, new]
        return (float(np.nan_to_num(after.confident_swapped) - np.nan_to_num(before.confident_swapped)) / saved,
                (after.swapped - before.swapped) / saved,
                (10 ** (-after.sqnr_db / 10) - 10 ** (-before.sqnr_db / 10)) / saved)

    widths = sorted(set(widths), reverse=True)
    current = {layer: widths[0] for layer in elements}
    moves = []
    while True:
        candidates = []
        for rank, (layer, count) in enumerate(elements.items()):
            lower = [w for w in widths if stored_bytes(count, w) < stored_bytes(count, current[layer])]
            if lower:
                new, saved = lower[0], stored_bytes(count, current[layer]) - stored_bytes(count, lower[0])
                candidates.append((cost(layer, current[layer], new, saved), rank, Move(layer, current[layer], new, saved)))
        if not candidates:
            return moves
        move = min(candidates, key=lambda c: c[:2])[2]
        moves.append(move)
        current[move.layer] = move.to_bits


def assignment(elements: Mapping[str, int], widths: Sequence[int], moves: Sequence[Move]) -> dict[str, int]:
    """Each layer's width after ``moves`` (from the highest of ``widths``), in graph order."""
    bits = {layer: max(widths) for layer in elements}
    for move in moves:
        bits[move.layer] = move.to_bits
    return bits


@dataclass(frozen=True)
class SearchStep:
    """One assignment the search measured: the first ``moves`` moves, on the held-out images."""

    moves: int
    weight_bytes: int
    confident_swapped: float
    swapped: float


@dataclass(frozen=True)
class MixedChoice:
    """What the search chose for ``target`` <= ``limit`` (a fraction of the confident float
    predictions, or of float's weight bytes), measured on ``images`` held-out images of which the
    float model held ``confident`` with at least attribution's threshold. ``layer_bits`` is empty
    when no assignment of the run's widths meets the target (``steps`` say how close they came)."""

    target: str
    limit: float
    float_weight_bytes: int  # every weight layer in float, the excluded ones included
    images: int
    confident: int
    act_bits: int
    layer_bits: dict[str, int] = field(default_factory=dict)
    steps: list[SearchStep] = field(default_factory=list)  # in the order measured; the chosen one last

    @property
    def met(self) -> bool:
        return bool(self.layer_bits)

    def to_json(self) -> dict:
        return {**asdict(self), "layer_bits": [[k, v] for k, v in self.layer_bits.items()]}

    @classmethod
    def from_json(cls, values: dict) -> "MixedChoice":
        return cls(**{**values, "layer_bits": {k: int(v) for k, v in values["layer_bits"]},
                      "steps": [SearchStep(**s) for s in values["steps"]]})
