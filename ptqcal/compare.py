"""``ptqcal compare-torch``: the same quantization built by ONNX Runtime and by ``torch.ao``."""

from __future__ import annotations

import csv
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from . import steps
from .atomic import atomic_path
from .cache import Cache
from .config import RunConfig, flag_of
from .errors import UserError
from .data import Split
from .models import get_model_entry
from .pixels import Pixels


# Ops whose output torch.ao quantizes with their input's scale and zero point
TORCH_SHARED_QPARAM_OPS = ("GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape")


def share_input_ranges(graph, ranges):
    """Give the outputs of :data:`TORCH_SHARED_QPARAM_OPS` their input's range, as torch.ao does
    (ORT calibrates them separately: a pooled tensor gets a range of its own, 3x finer on ResNet20)."""
    from .quantize import CalibrationRanges

    shared = dict(ranges.ranges)
    for node in graph.node:  # graph order, so chains (pool -> flatten) inherit from the start
        if node.op_type in TORCH_SHARED_QPARAM_OPS and node.input[0] in shared:
            shared[node.output[0]] = shared[node.input[0]]
    return CalibrationRanges(ranges.method, ranges.bits, ranges.num_images, shared)


@dataclass(frozen=True)
class TorchAgreement:
    """How far ptqcal's ORT model and torch.ao's agree for one configuration (fractions)."""

    config: str
    top1_agreement: float  # ONNX Runtime vs PyTorch quantized predictions
    max_abs_logit_diff: float
    onnx_top1_error: float
    torch_top1_error: float
    onnx_swapped: float  # predictions each quantized model changed from the float model's
    torch_swapped: float
    # the largest float top-1 minus top-2 logit among the images the two disagree on (0 if none):
    # two faithful quantizers should part only where the float model itself barely decides
    disagreement_max_float_margin: float


def torch_agreement(config: str, float_logits: np.ndarray, onnx_logits: np.ndarray, torch_logits: np.ndarray,
                    labels: np.ndarray) -> TorchAgreement:
    from .evaluate.metrics import logit_margin, quantization_change, top_k_error

    """Agreement of two quantized models' logits, each also against the float model's."""
    disagree = onnx_logits.argmax(1) != torch_logits.argmax(1)
    return TorchAgreement(config, float(np.mean(~disagree)), float(np.max(np.abs(onnx_logits - torch_logits))),
                          top_k_error(onnx_logits, labels), top_k_error(torch_logits, labels),
                          quantization_change(float_logits, onnx_logits, labels).swap_rate,
                          quantization_change(float_logits, torch_logits, labels).swap_rate,
                          float(logit_margin(float_logits)[disagree].max(initial=0.0)))


def _refuse_unmatched(cfg: RunConfig) -> None:
    """The torch.ao side builds HistogramObserver ranges, PyTorch's weight scales, every layer, one draw."""
    unmatched = [text for text, used in (
        (f"{flag_of('calib_method')} {cfg.calib_method}", cfg.calib_method != "mse"),
        (flag_of("calib_ranges"), cfg.calib_ranges is not None), (f"{flag_of('precisions')} fp16", cfg.fp16),
        (flag_of("skip_first_layer"), cfg.skip_first_layer), (flag_of("skip_last_layer"), cfg.skip_last_layer),
        (flag_of("exclude"), bool(cfg.exclude)),
        (f"{flag_of('weight_scale')} {cfg.weight_scale}", cfg.weight_scale != "torch"),
        (f"{flag_of('repeats')} {cfg.repeats}", cfg.repeats > 1)) if used]
    if unmatched:
        raise UserError(f"compare-torch builds one mse calibration of every layer with PyTorch's weight scales "
                        f"on both sides; drop {', '.join(unmatched)}")


def compare_torch(cfg: RunConfig) -> list[TorchAgreement]:
    """Quantize a registry model with ptqcal (ONNX Runtime) and with ``torch.ao`` on the same
    calibration batches, and measure how far the two quantized models agree."""
    cfg.validate()
    if cfg.is_onnx_file:
        raise UserError("compare-torch needs a PyTorch model from the registry, not an .onnx file")
    _refuse_unmatched(cfg)
    try:
        from .torch_reference import torch_fake_quant, torch_logits
    except ImportError as exc:
        raise UserError("compare-torch needs PyTorch: pip install 'ptqcal[torch]'") from exc
    import onnx

    from .quantize import QuantSpec, compute_ranges

    dataset = steps.load_run_dataset(cfg)
    with tempfile.TemporaryDirectory(prefix="ptqcal-compare-") as tmp:
        cache = Cache(Path(tmp))
        model = steps.prepare_model(cfg, dataset, cache)
        module = get_model_entry(cfg.model).build(cfg.weights, dataset.train, cfg.cache_dir)
        images = steps.draw_images(dataset, cfg, model.preprocess, None)
        # torch needs the images whole: compare-torch is a check on small sets, not a streamed run
        calib_split, eval_split = images.calib.materialise(), images.eval.materialise()
        calib = steps.normalise(model.preprocess, calib_split.images)
        inputs = steps.normalise(model.preprocess, eval_split.images)
        prepared = steps.prepare_for_quantization(cache, model.float_path)
        histograms = steps.calibrate(cache, prepared, model.input_name, images.calib, model.preprocess,
                                     steps.CALIB_BATCH, cfg.progress)
        batches = [calib[i:i + steps.CALIB_BATCH] for i in range(0, len(calib), steps.CALIB_BATCH)]
        ready = Pixels(Split(inputs, eval_split.labels), model.preprocess)  # already normalised: no transform
        float_logits = steps.model_logits(cache, model.float_path, ready, None, cfg, "float")
        graph = onnx.load(str(prepared), load_external_data=False).graph
        rows = []
        for spec in (QuantSpec(w, a, cfg.weight_scale) for a in cfg.act_bits for w in cfg.weight_bits):
            ranges = share_input_ranges(graph, compute_ranges(histograms, "mse", spec.act_bits, len(calib)))
            # biases float, like torch.ao's reference model; logits float on both sides, as ptqcal deploys them
            path = steps.quantize_config(cache, prepared, ranges, replace(spec, quantize_bias=False))
            ours = steps.model_logits(cache, path, ready, None, cfg, spec.name, cfg.execution == "deployed")
            theirs = torch_logits(torch_fake_quant(module, batches, spec.weight_bits, spec.act_bits), inputs)
            rows.append(torch_agreement(spec.name, float_logits, ours, theirs, eval_split.labels))
    return rows


def save_agreements(rows: list[TorchAgreement], out_dir: Path) -> Path:
    """``compare_torch.csv`` (one row per configuration) in ``out_dir``, written whole or not at all."""
    path = out_dir / "compare_torch.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[field.name for field in fields(TorchAgreement)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    return path
