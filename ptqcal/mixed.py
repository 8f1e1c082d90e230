"""``--max-confident-swaps`` / ``--max-size-ratio``: per-layer weight bits chosen on images held
out of evaluation, guided by which layers flip confident predictions.

The order in which layers give up bits comes from attribution (:mod:`ptqcal.evaluate.mixed`).
Along that order the search measures whole models — every layer at its width, activations
quantized as in the run, on the run's execution path — on the held-out images only:

* ``max_confident_swaps``: the longest prefix (fewest weight bytes) whose confident swaps stay
  within the limit, found by bisection (assuming that lowering more layers does not swap fewer);
* ``max_size_ratio``: the shortest prefix (fewest confident swaps, greedily) whose weight bytes fit.

The chosen model is then evaluated on the evaluation images like every other configuration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import steps
from .cache import Cache
from .config import RunConfig
from .errors import UserError
from .evaluate.attribution import CONFIDENT, Attribution
from .evaluate.metrics import softmax
from .evaluate.mixed import MixedChoice, SearchStep, assignment, ordered_moves, stored_bytes
from .models import PreprocessCfg
from .pixels import Pixels
from .quantize import QuantSpec


def _weights(prepared: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Each weight layer's element count and float bytes, in graph order."""
    import onnx
    from onnx import numpy_helper

    from .quantize.qdq import weighted_nodes

    model = onnx.load(str(prepared))
    inits = {init.name: init for init in model.graph.initializer}
    arrays = {node.name: numpy_helper.to_array(inits[node.input[1]]) for node in weighted_nodes(model)}
    return {k: a.size for k, a in arrays.items()}, {k: a.nbytes for k, a in arrays.items()}


def search(cfg: RunConfig, cache: Cache, prepared: Path, ranges, exclude: tuple[str, ...], pixels: Pixels,
           preprocess: PreprocessCfg, attribution: Attribution) -> tuple[MixedChoice, QuantSpec | None]:
    """The search for ``cfg``'s target on ``pixels`` (held out of evaluation), and the spec of the
    chosen model (``None`` when no assignment of ``cfg.weight_bits`` meets the target)."""
    elements, float_bytes = _weights(prepared)
    quantized = {layer: count for layer, count in elements.items() if layer not in exclude}
    kept_float = sum(b for layer, b in float_bytes.items() if layer in exclude)
    moves = ordered_moves(attribution, quantized, cfg.weight_bits)
    act_bits, widths = max(cfg.act_bits), cfg.weight_bits

    def spec(k: int) -> QuantSpec:
        bits = assignment(quantized, widths, moves[:k])
        return QuantSpec(max(widths), act_bits, cfg.weight_scale, exclude, layer_bits=tuple(bits.items()))

    def size(k: int) -> int:
        return kept_float + sum(stored_bytes(quantized[layer], bits) for layer, bits in spec(k).layer_bits)

    float_logits = steps.model_logits(cache, prepared, pixels, preprocess, cfg, "float (search)", kind="search-logits")
    confident = softmax(float_logits.astype(np.float64)).max(axis=1) >= CONFIDENT
    if cfg.max_confident_swaps is not None and not confident.any():
        raise UserError(f"the float model holds none of the {len(pixels)} held-out images with {CONFIDENT:.0%} "
                        "confidence, so there are no confident swaps to bound: use --max-size-ratio")
    measured: dict[int, SearchStep] = {}

    def measure(k: int) -> SearchStep:
        if k not in measured:
            path = steps.quantize_config(cache, prepared, ranges, spec(k))
            logits = steps.model_logits(cache, path, pixels, preprocess, cfg, f"mixed search ({k} moves)",
                                        fused=cfg.execution == "deployed", kind="search-logits")
            swapped = logits.argmax(1) != float_logits.argmax(1)
            measured[k] = SearchStep(k, size(k), float(swapped[confident].mean()) if confident.any() else 0.0,
                                     float(swapped.mean()))
        return measured[k]

    chosen = _confident_prefix(cfg.max_confident_swaps, len(moves), measure) if cfg.max_confident_swaps is not None \
        else _size_prefix(cfg.max_size_ratio * sum(float_bytes.values()), len(moves), size, measure)
    target, limit = ("max_confident_swaps", cfg.max_confident_swaps) if cfg.max_confident_swaps is not None \
        else ("max_size_ratio", cfg.max_size_ratio)
    history = list(measured.values())
    if chosen is not None and history[-1].moves != chosen:  # the choice is the last row
        history.append(measured[chosen])
    choice = MixedChoice(target, limit, sum(float_bytes.values()), len(pixels), int(confident.sum()), act_bits,
                         {} if chosen is None else dict(spec(chosen).layer_bits), history)
    return choice, None if chosen is None else spec(chosen)


def _confident_prefix(limit: float, count: int, measure) -> int | None:
    """The most moves whose model swaps at most ``limit`` of the confident predictions (bisection)."""
    if measure(0).confident_swapped > limit:
        return None
    if measure(count).confident_swapped <= limit:
        return count
    good, bad = 0, count
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if measure(middle).confident_swapped <= limit else (good, middle)
    return good


def _size_prefix(budget: float, count: int, size, measure) -> int | None:
    """The fewest moves whose weights fit ``budget`` bytes (measured, to report it)."""
    fitting = next((k for k in range(count + 1) if size(k) <= budget), None)
    measure(count if fitting is None else fitting)
    return fitting
