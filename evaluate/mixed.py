"""Mixed precision guided by confidence: the order in which layers give up weight bits, the search
along that order, and its typed result (numpy only: the caller quantizes and runs the models it
asks for).

The search is greedy. Every layer starts at the run's highest weight width. A *move* lowers one
layer to its next width that stores fewer bytes; moves are ordered by what attribution measured
for them (each layer quantized alone): the increase in confident swaps per byte saved first, then
in swaps, then in quantization noise of the layer's output. A prefix of that order is an
assignment: the longer the prefix, the smaller the weights. The search then measures prefixes of
the whole model (every layer at its width, activations quantized) on held-out images, because
layers' effects do not simply add up:

* ``max_confident_swaps``: the longest prefix (fewest weight bytes) whose confident swaps stay
  within the limit, found by bisection (assuming that lowering more layers does not swap fewer);
* ``max_size_ratio``: the shortest prefix (fewest confident swaps, greedily) whose weight bytes fit.

Either may also cap the added top-1 error and the batch-1 latency over the float model's (a model
whose int4 layers ORT dequantizes on the CPU can be slower than float): a prefix beyond a cap is not
within the target, and lowering more layers is assumed not to make the model quicker either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ptqcal.errors import InputError
from ptqcal.quantize.spec import stored_bytes
from .attribution import CONFIDENT, Attribution
from .metrics import quantization_change

TARGETS = ("max_confident_swaps", "max_size_ratio")


@dataclass(frozen=True)
class Move:
    """Lower ``layer``'s weights from ``from_bits`` to ``to_bits``, saving ``saved`` bytes."""

    layer: str
    from_bits: int
    to_bits: int
    saved: int


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


def search_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """The widths a search can choose among: the highest of each stored size (8 for 8..5 in int8
    containers, 4 for 4 and 3 in INT4, 2), highest first; the others store and run as those do."""
    best: dict[int, int] = {}
    for width in widths:
        size = stored_bytes(1 << 20, width)
        best[size] = max(best.get(size, width), width)
    return tuple(sorted(best.values(), reverse=True))


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
    delta_top1_error: float = float("nan")  # on the search's images (NaN: measured without labels)
    latency_ratio: float = float("nan")  # batch-1 latency over float's on this CPU (NaN: not measured)


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
    max_delta_error: float | None = None  # the cap on the added top-1 error, when the run set one
    max_latency_ratio: float | None = None  # the cap on batch-1 latency over float's, when the run set one

    @property
    def met(self) -> bool:
        return bool(self.layer_bits)

    def to_json(self) -> dict:
        return {**asdict(self), "layer_bits": [[k, v] for k, v in self.layer_bits.items()]}

    @classmethod
    def from_json(cls, values: dict) -> "MixedChoice":
        """Strictly (``ValueError``, or ``TypeError`` for an unknown key): a tampered run record is one
        line, not a traceback when the report formats it. ``null`` is NaN in a step, unset in a cap."""
        def number(value, optional=False):
            if (value is None and optional) or (type(value) in (int, float)):
                return value
            raise ValueError(f"not a number: {str(value)[:20]!r}")

        steps = [SearchStep(**{k: float("nan") if v is None else number(v) for k, v in s.items()})
                 for s in values["steps"]]
        if any(type(s.moves) is not int or type(s.weight_bytes) is not int for s in steps) or \
                not isinstance(values["target"], str) or not all(isinstance(k, str) and type(v) is int
                                                                 for k, v in values["layer_bits"]):
            raise ValueError("mixed: not the search's steps, target and widths")
        return cls(**{**values, "layer_bits": {k: v for k, v in values["layer_bits"]}, "steps": steps,
                      **{k: number(values[k]) for k in ("limit", "float_weight_bytes", "images", "confident",
                                                          "act_bits")},
                      **{k: number(values.get(k), optional=True) for k in ("max_delta_error", "max_latency_ratio")}})


class SearchError(InputError):
    """A target the search cannot work towards on the images it was given."""


# measure(layer_bits) -> the logits, on the search's images, of the model whose weight layers take
# these widths (every other setting as in the run)
Measure = Callable[[dict[str, int]], np.ndarray]
# latency(layer_bits) -> the batch-1 latency of that model over the float model's, on this CPU
Latency = Callable[[dict[str, int]], float]
# ahead(assignments): models the search is about to measure, handed over together first (a cluster
# measures them side by side; measure_logits then reads them), whatever it then finds
Ahead = Callable[[list[dict[str, int]]], None]


def search(target: str, limit: float, elements: Mapping[str, int], float_bytes: Mapping[str, int],
           widths: Sequence[int], act_bits: int, attribution: Attribution, float_logits: np.ndarray,
           measure_logits: Measure, labels: np.ndarray | None = None,
           max_delta_error: float | None = None, ahead: Ahead | None = None,
           max_latency_ratio: float | None = None, latency: Latency | None = None) -> MixedChoice:
    """Per-layer weight widths for ``target`` <= ``limit`` (see :data:`TARGETS`), and, with
    ``max_delta_error`` (a fraction; ``labels`` needed), a top-1 error at most that much above the
    float model's on the search's images; with ``max_latency_ratio`` (``latency`` needed), a batch-1
    latency at most that many times float's.

    ``elements``: weight count of every quantized layer (graph order); ``float_bytes``: float bytes
    of every weight layer, those kept float included; ``float_logits``: the float model on the
    search's images. The choice's ``layer_bits`` is empty when no assignment meets it (``ahead``: see :data:`Ahead`)."""
    _check_target(target, max_delta_error, labels, max_latency_ratio is not None and latency is None)
    moves = ordered_moves(attribution, elements, widths)
    kept_float = sum(b for layer, b in float_bytes.items() if layer not in elements)
    prefix_bits = lambda k: assignment(elements, widths, moves[:k])  # noqa: E731

    def size(k: int) -> int:
        return kept_float + sum(stored_bytes(elements[layer], bits) for layer, bits in prefix_bits(k).items())

    labelled = labels is not None
    labels = np.zeros(len(float_logits), np.int64) if labels is None else labels  # swaps need no labels
    confident = _confident(float_logits, labels, target)
    measured: dict[int, SearchStep] = {}
    hand = _handing(ahead, prefix_bits)

    def measure(k: int) -> SearchStep:
        if k not in measured:
            hand([k])
            change = quantization_change(float_logits, measure_logits(prefix_bits(k)), labels)
            swapped, held = change.confident_swaps(CONFIDENT)
            measured[k] = SearchStep(k, size(k), swapped / held if held else 0.0, change.swap_rate,
                                     change.delta_top1_error if labelled else float("nan"),
                                     latency(prefix_bits(k)) if latency is not None else float("nan"))
        return measured[k]

    def within(k: int) -> bool:
        step = measure(k)
        return (target != "max_confident_swaps" or step.confident_swapped <= limit) and \
            (max_delta_error is None or step.delta_top1_error <= max_delta_error) and \
            (max_latency_ratio is None or step.latency_ratio <= max_latency_ratio)

    chosen = _longest_within(len(moves), within, hand) if target == "max_confident_swaps" \
        else _size_prefix(limit * sum(float_bytes.values()), len(moves), size, within)
    history = list(measured.values())
    if chosen is not None and history[-1].moves != chosen:  # the choice is the last row
        history.append(measured[chosen])
    return MixedChoice(target, limit, sum(float_bytes.values()), len(float_logits), confident, act_bits,
                       {} if chosen is None else prefix_bits(chosen), history, max_delta_error, max_latency_ratio)


def _confident(float_logits: np.ndarray, labels: np.ndarray, target: str) -> int:
    """How many held-out predictions the float model holds confidently (none: nothing to bound)."""
    confident = int((quantization_change(float_logits, float_logits, labels).float_confidence >= CONFIDENT).sum())
    if target == "max_confident_swaps" and not confident:
        raise SearchError(f"the float model holds none of the {len(float_logits)} held-out images with "
                          f"{CONFIDENT:.0%} confidence, so there are no confident swaps to bound: bound the weights' "
                          "size instead", setting="max_confident_swaps")
    return confident


def _check_target(target: str, max_delta_error: float | None, labels: np.ndarray | None, untimed: bool) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    if max_delta_error is not None and labels is None:
        raise ValueError("a cap on the added error needs the search images' labels")
    if untimed:
        raise ValueError("a cap on the latency needs the models' latencies")


def _handing(ahead: Ahead | None, prefix_bits) -> Callable[[list[int]], None]:
    """``ahead`` of the prefixes (move counts) not handed over yet."""
    handed: set[int] = set()

    def hand(prefixes: list[int]) -> None:
        new = sorted(set(prefixes) - handed)
        handed.update(new)
        if ahead is not None and new:
            ahead([prefix_bits(k) for k in new])
    return hand


def _longest_within(count: int, within, hand=lambda prefixes: None) -> int | None:
    """The most moves whose model stays within the targets (bisection: lowering more layers is
    assumed to change no fewer predictions). Both ends are handed over at once: the second is
    measured for nothing only when no move is within."""
    hand([0, count])
    if not within(0):
        return None
    if within(count):
        return count
    good, bad = 0, count
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if within(middle) else (good, middle)
    return good


def _size_prefix(budget: float, count: int, size, within) -> int | None:
    """The fewest moves whose weights fit ``budget`` bytes, if that model is within the other
    targets (measured either way, to report it)."""
    fitting = next((k for k in range(count + 1) if size(k) <= budget), None)
    ok = within(count if fitting is None else fitting)
    return fitting if ok else None
