"""Which layers flip confident predictions: each weight layer quantized alone, at each weight bit
width, measured against the float model on the same images.

One layer at a time multiplies the work by the number of layers, so the images are few and the
caller may memoise every (layer, bits) result (``memo``). Activations stay float: the weights' own
effect, layer by layer. The SQNR of the layer's output against float uses ORT's ``qdq_loss_debug``
measure, on the first :data:`SQNR_IMAGES` images. The dataclasses import without onnxruntime (a
saved run is analysed anywhere); :func:`attribute` imports it on first use.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .metrics import quantization_change

CONFIDENT = 0.9  # a float prediction held with at least this confidence counts as confident
SQNR_IMAGES = 32
# How the effects are computed, for a caller's memo keys: a result of another way (the graph cut
# without its inputs blocked, whose numbers differ in the last bits) is not mixed with this one's
METHOD = "cut, inputs blocked"

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


def _outputs(model, batches: BatchSource, provider: str, threads: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The first output of ``model`` (a ModelProto) over every batch of ``batches``, concatenated,
    and the shape of the first batch."""
    from .runner import make_session

    session = make_session(model.SerializeToString(), provider=provider, threads=threads)
    feed = session.get_inputs()[0].name
    parts, shape = [], ()
    for batch in batches(None):
        shape = shape or batch.shape
        parts.append(session.run(None, {feed: batch})[0])
    return np.concatenate(parts), tuple(shape)


def _run(session, feeds: Iterable[dict[str, np.ndarray]], output: str, flat: bool = False) -> np.ndarray:
    """``output`` of ``session`` over ``feeds`` (batches of a cut), concatenated; ``flat``: each batch's
    flattened (a layer's output need not have the images first: attention's is (tokens, images, width))."""
    names = [value.name for value in session.get_inputs()]
    parts = [session.run([output], {name: feed[name] for name in names})[0] for feed in feeds]
    return np.concatenate([part.ravel() for part in parts] if flat else parts)


class _LayerRuns:
    """One layer's runs from its cut: the graph after the cut with the layer's weights quantized (on
    every image), and the layer's output, float or quantized (on the first :data:`SQNR_IMAGES`)."""

    def __init__(self, graph, cut, everything, head, session, weight_scale: str):
        self.cut, self.output, self.logits = cut, cut.output, graph.model.graph.output[0].name
        self._graph, self._everything, self._head = graph, everything, head
        self._session, self._scale = session, weight_scale
        self._suffix = self._layer = self._reference = None

    def _quantized(self, model, bits: int):
        from ptqcal.quantize.qdq import with_layer_weights_quantized

        return with_layer_weights_quantized(model, self.cut.layer, bits, self._scale)

    def quantized_logits(self, bits: int) -> np.ndarray:
        if self.logits in self.cut.tensors:  # the layer does not reach the logits
            return np.concatenate([feed[self.logits] for feed in self._everything.feeds(self.cut)])
        if self._suffix is None:
            self._suffix = self._graph.extract(self.cut.tensors, [self.logits])
        return _run(self._session(self._quantized(self._suffix, bits)), self._everything.feeds(self.cut), self.logits)

    def layer_output(self, bits: int | None) -> np.ndarray:
        """The layer's output on the first images (flattened), with float (``bits=None``) or quantized weights."""
        if self._layer is None:
            self._layer = self._graph.extract(self.cut.tensors, [self.output])
        model = self._layer if bits is None else self._quantized(self._layer, bits)
        return _run(self._session(model), self._head.feeds(self.cut), self.output, flat=True)

    def effect(self, bits: int, float_logits: np.ndarray, labels: np.ndarray) -> LayerEffect:
        from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

        change = quantization_change(float_logits, self.quantized_logits(bits), labels)
        if self._reference is None:
            self._reference = self.layer_output(None)
        swapped, held = change.confident_swaps(CONFIDENT)
        return LayerEffect(self.cut.layer, bits, change.swap_rate, swapped / held if held else float("nan"),
                           change.delta_top1_error, float(sqnr(self._reference, self.layer_output(bits))))


def _input_shape(batches: BatchSource) -> tuple[int, ...]:
    """The shape of a batch of one image (what the cuts' sizes are computed from)."""
    with closing(iter(batches(1))) as first:
        return tuple(next(first).shape)


def float_logits(model_path: Path, batches: BatchSource, provider: str = "CPU", threads: int = 0) -> np.ndarray:
    """The float model's logits on every image of ``batches``: what :func:`attribute` measures each
    layer against (a caller may keep them and hand them to it and to :func:`layer_effect`)."""
    import onnx

    return _outputs(onnx.load(str(model_path)), batches, provider, threads)[0]


def weight_layers(model_path: Path) -> list[str]:
    """The weight layers :func:`attribute` measures, in the order it measures them."""
    import onnx

    from .cut import layer_cuts

    return [cut.layer for cut in layer_cuts(onnx.load(str(model_path), load_external_data=False))]


class _Measurement:
    """(layer, bits) effects of one model on one set of images, each layer from the float activations
    at its cut. Those are computed as a measurement of every layer in graph order computes them (each
    cut from the one kept before it) whichever layers are asked for: a layer measured alone (a task
    on a cluster, a resumed run) gets the numbers it gets among all, bit for bit (ORT may round a
    segment of the graph differently from a longer one that contains it)."""

    def __init__(self, model, input_shape, batches: BatchSource, labels: np.ndarray, reference: np.ndarray,
                 weight_scale: str, provider: str, threads: int):
        from .cut import CutActivations, CutGraph
        from .runner import make_session

        def session(sub):
            # a measurement keeps several sessions alive (a segment before the cut, the graph after
            # it, the layer's own), run in turn: spinning, the idle ones' threads took the cores from
            # the one running (10% of ResNet56's attribution on 2 cores, bench/attribute.py)
            return make_session(sub.SerializeToString(), provider=provider, threads=threads, spinning=False)

        self.graph, self._labels, self._reference = CutGraph(model, input_shape), labels, reference
        self._everything = CutActivations(self.graph, lambda: batches(None), len(labels), session)
        self._head = CutActivations(self.graph, lambda: batches(SQNR_IMAGES), min(SQNR_IMAGES, len(labels)), session)
        self._session, self._scale = session, weight_scale
        self._reached = 0  # the cuts before this one were asked for as a measurement of every layer asks
        self._runs: _LayerRuns | None = None

    def effect(self, index: int, bits: int) -> LayerEffect:
        """The effect of the ``index``-th layer (graph order) alone at ``bits``."""
        for earlier in self.graph.cuts[self._reached:index]:
            for activations in (self._everything, self._head):
                activations.feeds(earlier)  # kept when it fits the budget, as if its layer had been measured
        self._reached = max(self._reached, index + 1)
        cut = self.graph.cuts[index]
        if self._runs is None or self._runs.cut != cut:
            self._runs = _LayerRuns(self.graph, cut, self._everything, self._head, self._session, self._scale)
        return self._runs.effect(bits, self._reference, self._labels)


def attribute(model_path: Path, batches: BatchSource, labels: np.ndarray, widths: Sequence[int], weight_scale: str,
              provider: str = "CPU", threads: int = 0, memo: Memo | None = None, held_out: bool = False,
              reference: np.ndarray | None = None) -> Attribution:
    """Every weight layer of the float model at ``model_path`` alone at each of ``widths``, on the
    images ``batches`` yields (with ``labels``), against the float model on the same images (its
    logits ``reference`` when the caller has them, from :func:`float_logits`).

    Quantizing a layer changes nothing before it: the float activations at each layer's cut
    (:mod:`.cut`) are computed once, from the previous layer's, and only the graph after the cut runs
    for each width. ``memo`` lets the caller keep each (layer, bits) result (e.g. in a cache keyed
    by the model and the images): a result it has is not computed, and a layer whose results it all
    has runs nothing; ``held_out`` records that the images were held out of the evaluation."""
    import onnx

    model = onnx.load(str(model_path))
    if reference is None:
        reference, input_shape = _outputs(model, batches, provider, threads)
    else:
        input_shape = _input_shape(batches)
    confident = quantization_change(reference, reference, labels).float_confidence >= CONFIDENT
    measurement = _Measurement(model, input_shape, batches, labels, reference, weight_scale, provider, threads)
    effects = []
    for index, cut in enumerate(measurement.graph.cuts):
        for bits in widths:
            def measure(index=index, bits=bits) -> LayerEffect:
                return measurement.effect(index, bits)

            effects.append(measure() if memo is None else memo(cut.layer, bits, measure))
    return Attribution(effects, len(labels), int(confident.sum()), held_out)


def layer_effect(model_path: Path, batches: BatchSource, labels: np.ndarray, reference: np.ndarray, layer: str,
                 bits: int, weight_scale: str, provider: str = "CPU", threads: int = 0) -> LayerEffect:
    """One (layer, bits) of :func:`attribute` on its own (``reference``: :func:`float_logits` on the
    same images), equal to the effect :func:`attribute` measures for it."""
    import onnx

    model = onnx.load(str(model_path))
    measurement = _Measurement(model, _input_shape(batches), batches, labels, reference, weight_scale, provider,
                               threads)
    index = next((i for i, cut in enumerate(measurement.graph.cuts) if cut.layer == layer), None)
    if index is None:
        raise ValueError(f"{layer!r} is no weight layer of {model_path}")
    return measurement.effect(index, bits)
