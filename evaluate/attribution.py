"""Which layers flip confident predictions: each weight layer quantized alone, at each weight bit
width, measured against the float model on the same images.

One layer at a time multiplies the work by the number of layers, so the images are few and the
caller may memoise every (layer, bits) result (``memo``). Activations stay float: the weights' own
effect, layer by layer. The SQNR of the layer's output against float uses ORT's ``qdq_loss_debug``
measure, on the first :data:`SQNR_IMAGES` images. The dataclasses import without onnxruntime (a
saved run is analysed anywhere); :func:`attribute` imports it on first use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .metrics import quantization_change

CONFIDENT = 0.9  # a float prediction held with at least this confidence counts as confident
SQNR_IMAGES = 32

# batches(limit) -> the model-input batches of the images (the first ``limit`` images, or all)
BatchSource = Callable[[int | None], Iterable[np.ndarray]]
# memo(layer, bits, compute) -> compute() or a result stored for the same inputs
Memo = Callable[[str, int, Callable[[], "LayerEffect"]], "LayerEffect"]


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


def _with_output(model, tensor: str):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return copy


def _outputs(model, batches: BatchSource, provider: str, threads: int, limit: int | None = None) -> list[np.ndarray]:
    """Every output of ``model`` (a ModelProto) over ``batches(limit)``, concatenated."""
    from .runner import make_session

    session = make_session(model.SerializeToString(), provider=provider, threads=threads)
    feed = session.get_inputs()[0].name
    parts = [session.run(None, {feed: batch}) for batch in batches(limit)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def attribute(model_path: Path, batches: BatchSource, labels: np.ndarray, widths: Sequence[int], weight_scale: str,
              provider: str = "CPU", threads: int = 0, memo: Memo | None = None, held_out: bool = False) -> Attribution:
    """Every weight layer of the float model at ``model_path`` alone at each of ``widths``, on the
    images ``batches`` yields (with ``labels``), against the float model on the same images.

    ``memo`` lets the caller keep each (layer, bits) result (e.g. in a cache keyed by the model and
    the images); ``held_out`` records that the images were held out of the evaluation."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    from ptqcal.quantize.graph import weighted_nodes
    from ptqcal.quantize.qdq import with_layer_weights_quantized

    model = onnx.load(str(model_path))
    float_logits = _outputs(model, batches, provider, threads)[0]
    reference_change = quantization_change(float_logits, float_logits, labels)
    confident = reference_change.float_confidence >= CONFIDENT
    effects = []
    for node in weighted_nodes(model):
        output, reference = node.output[0], []  # the float layer output, computed only if a width is not memoised
        for bits in widths:
            def measure(node=node, output=output, reference=reference, bits=bits) -> LayerEffect:
                variant = with_layer_weights_quantized(model, node.name, bits, weight_scale)
                logits = _outputs(variant, batches, provider, threads)[0]
                layer_output = _outputs(_with_output(variant, output), batches, provider, threads, SQNR_IMAGES)[1]
                if not reference:
                    reference.append(_outputs(_with_output(model, output), batches, provider, threads, SQNR_IMAGES)[1])
                change = quantization_change(float_logits, logits, labels)
                swapped, held = change.confident_swaps(CONFIDENT)
                return LayerEffect(node.name, bits, change.swap_rate, swapped / held if held else float("nan"),
                                   change.delta_top1_error, float(sqnr(reference[0], layer_output)))

            effects.append(measure() if memo is None else memo(node.name, bits, measure))
    return Attribution(effects, len(labels), int(confident.sum()), held_out)
