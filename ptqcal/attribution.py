"""Which layers flip confident predictions: each weight layer quantized alone, at each weight bit
width, measured against the float model on a seeded subset of the evaluation images.

One layer at a time multiplies the work by the number of layers, so the subset is small
(``attribution_size``) and every (layer, bits) result is cached. Activations stay float: the
weights' own effect, layer by layer. The SQNR of the layer's output against float uses ORT's
``qdq_loss_debug`` measure, on the first :data:`SQNR_IMAGES` images.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .cache import Cache, file_digest, make_key
from .config import RunConfig
from .data import DEFAULT_SEARCH_SIZE
from .evaluate.attribution import CONFIDENT, Attribution, LayerEffect
from .models import PreprocessCfg
from .pixels import Pixels

SQNR_IMAGES = 32


def _with_output(model, tensor: str):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return copy


def _run(model, pixels: Pixels, preprocess: PreprocessCfg, cfg: RunConfig, limit: int | None = None) -> list:
    """Every output of ``model`` (a ModelProto) on ``pixels``, concatenated over batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = cfg.threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    parts = [session.run(None, {feed: batch}) for batch in pixels.batches(cfg.batch_size, preprocess, limit)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def attribute(cache: Cache, prepared: Path, pixels: Pixels, preprocess: PreprocessCfg, cfg: RunConfig,
              held_out: bool = False) -> Attribution:
    """Every weight layer of ``prepared`` alone at each of ``cfg.weight_bits``, on ``pixels`` (held
    out of the evaluation images, or a subset of them)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    from .evaluate.metrics import softmax
    from .quantize.qdq import weighted_nodes, with_layer_weights_quantized

    model = onnx.load(str(prepared))
    labels = pixels.labels
    float_logits = _run(model, pixels, preprocess, cfg)[0]
    confident = softmax(float_logits.astype(np.float64)).max(axis=1) >= CONFIDENT
    float_error = np.mean(float_logits.argmax(1) != labels)
    effects = []
    for node in weighted_nodes(model):
        output, reference = node.output[0], []  # the float layer output, computed only if a width is not cached
        for bits in cfg.weight_bits:
            key = make_key(file_digest(prepared), pixels.key, node.name, bits, str(cfg.weight_scale), cfg.batch_size)

            def measure(tmp: Path) -> None:
                variant = with_layer_weights_quantized(model, node.name, bits, cfg.weight_scale)
                logits = _run(variant, pixels, preprocess, cfg)[0]
                layer_output = _run(_with_output(variant, output), pixels, preprocess, cfg, SQNR_IMAGES)[1]
                if not reference:
                    reference.append(_run(_with_output(model, output), pixels, preprocess, cfg, SQNR_IMAGES)[1])
                swapped = logits.argmax(1) != float_logits.argmax(1)
                effect = LayerEffect(node.name, bits, float(swapped.mean()),
                                     float(swapped[confident].mean()) if confident.any() else float("nan"),
                                     float(np.mean(logits.argmax(1) != labels) - float_error),
                                     float(sqnr(reference[0], layer_output)))
                tmp.write_text(json.dumps(asdict(effect)))

            effects.append(LayerEffect(**json.loads(cache.file("layer-effect", key, "json", measure).read_text())))
    return Attribution(effects, len(labels), int(confident.sum()), held_out)


def attribute_run(cfg: RunConfig, preprocess: PreprocessCfg, prepared: Path, images, cache: Cache) -> Attribution:
    """:func:`attribute` on the images held out for a search (:class:`~ptqcal.steps.Images`), or
    else on ``cfg.attribution_size`` images drawn with ``cfg.seed`` from the evaluation images."""
    if images.search is not None:
        return attribute(cache, prepared, images.search, preprocess, cfg, held_out=True)
    evaluation = images.eval.split
    size = cfg.attribution_size or DEFAULT_SEARCH_SIZE
    chosen = np.sort(np.random.default_rng(cfg.seed).permutation(len(evaluation))[:size])
    return attribute(cache, prepared, Pixels(evaluation.take(chosen), preprocess, cache, cfg.strict), preprocess, cfg)
