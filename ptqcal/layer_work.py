"""Attribution as work an executor can run ahead (``run --ray``): each (layer, bits) measurement is
a task that writes the cache entry the run's own attribution then reads, so a cluster run reports
the numbers of a run on one machine.

A layer measured alone computes the float activations at its cut as a measurement of every layer
does (:func:`ptqcal.evaluate.attribution.layer_effect`), against the float model's logits on the
same images, which are computed once and cached beside the effects.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import Cache, array_digest, file_digest, make_key
from .config import RunConfig
from .data.pixels import Pixels
from .evaluate.attribution import METHOD, Attribution, LayerEffect
from .models import PreprocessCfg


@dataclass(frozen=True)
class AttributionWork:
    """What attribution measures: every weight layer of ``prepared`` at each of ``widths``, on
    ``pixels`` (normalised by ``preprocess``, in batches of ``batch_size``), run as ORT runs it."""

    prepared: Path
    pixels: Pixels
    preprocess: PreprocessCfg
    widths: tuple[int, ...]
    weight_scale: str
    batch_size: int
    provider: str
    threads: int
    keyed: dict  # the versions of the packages every key names
    held_out: bool  # the images were held out of evaluation for a search

    @classmethod
    def of(cls, cfg: RunConfig, preprocess: PreprocessCfg, prepared: Path, images, cache: Cache,
           keyed: dict) -> "AttributionWork":
        """The images held out for a search, or else ``cfg.attribution_size`` images drawn with
        ``cfg.seed`` from the evaluation images (``images``: a run's :class:`~ptqcal.steps.Images`)."""
        from .data import DEFAULT_SEARCH_SIZE, seeded_subset
        from .evaluate.mixed import search_widths

        pixels = images.search if images.search is not None else \
            Pixels(seeded_subset(images.eval.split, cfg.attribution_size or DEFAULT_SEARCH_SIZE, cfg.seed), preprocess,
                   cache, cfg.strict)
        # for a search only, the widths it can choose among (each other width stores and runs as one of them)
        widths = tuple(cfg.weight_bits if cfg.attribute else search_widths(cfg.weight_bits))
        return cls(prepared, pixels, preprocess, widths, str(cfg.weight_scale), cfg.batch_size, cfg.provider,
                   cfg.threads, keyed, images.search is not None)

    def batches(self, limit: int | None):
        return self.pixels.batches(self.batch_size, self.preprocess, limit)

    def _images_key(self) -> list:
        # the model, and the images as it sees them (normalised, with their labels)
        return [file_digest(self.prepared), self.pixels.key, array_digest(self.pixels.labels), asdict(self.preprocess)]

    def effect_key(self, layer: str, bits: int) -> str:
        """The key of one (layer, bits) result: the images, the layer, its width, how ORT runs."""
        return make_key(*self._images_key(), layer, bits, self.weight_scale, self.batch_size, self.provider,
                        self.keyed, METHOD)

    def reference(self, cache: Cache) -> np.ndarray:
        """The float model's logits on the images, computed once (threads change no logit)."""
        from .evaluate.attribution import float_logits

        key = make_key("attribution-float", *self._images_key(), self.batch_size, self.provider, self.keyed)
        return cache.array("attribution-logits", key,
                           lambda: float_logits(self.prepared, self.batches, self.provider, self.threads))

    def effect(self, cache: Cache, layer: str, bits: int, compute: Callable[[], LayerEffect]) -> LayerEffect:
        """The cached result of (``layer``, ``bits``), computed by ``compute`` when missing."""
        from .evaluate.record import finite

        path = cache.file("layer-effect", self.effect_key(layer, bits), "json",
                          lambda tmp: tmp.write_text(json.dumps(finite(asdict(compute())), allow_nan=False)))
        return LayerEffect(**{k: float("nan") if v is None else v for k, v in json.loads(path.read_text()).items()})

    def pending(self, cache: Cache) -> list[tuple[str, int]]:
        """The (layer, bits) results not cached yet, in the order a run measures them."""
        from .evaluate.attribution import weight_layers

        return [(layer, bits) for layer in weight_layers(self.prepared) for bits in self.widths
                if not cache.has("layer-effect", self.effect_key(layer, bits), "json")]


def attribution_float(cache: Cache, work: AttributionWork) -> None:
    """Task: the float model's logits on the attribution's images, into the cache."""
    work.reference(cache)


def layer_effect(cache: Cache, work: AttributionWork, layer: str, bits: int) -> None:
    """Task: one (layer, bits) result, into the cache (nothing travels back but the entry)."""
    from .evaluate.attribution import layer_effect as measure

    def compute() -> LayerEffect:
        return measure(work.prepared, work.batches, work.pixels.labels, work.reference(cache), layer, bits,
                       work.weight_scale, work.provider, work.threads)

    work.effect(cache, layer, bits, compute)


def attribute(cfg: RunConfig, work: AttributionWork, cache: Cache, executor=None) -> Attribution:
    """Attribution of ``work``; with an executor that runs work ahead (a cluster), every (layer, bits)
    not cached yet is first a task of its own (the float logits one before them), and the run then
    reads them all from the cache."""
    from .evaluate.attribution import attribute as measure

    if executor is not None and executor.runs_ahead:
        pending = work.pending(cache)
        if pending:
            inside = replace(work, threads=executor.task_threads(cfg))  # threads change no number
            executor.map(attribution_float, [(cache, inside)])
            executor.map(layer_effect, [(cache, inside, layer, bits) for layer, bits in pending])
    return measure(work.prepared, work.batches, work.pixels.labels, work.widths, work.weight_scale, work.provider,
                   work.threads, lambda layer, bits, compute: work.effect(cache, layer, bits, compute),
                   held_out=work.held_out, reference=work.reference(cache))
