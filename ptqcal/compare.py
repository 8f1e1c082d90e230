"""``ptqcal compare-torch``: the same quantization built by ONNX Runtime and by ``torch.ao``."""

from __future__ import annotations

import csv
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .cache import Cache
from .config import RunConfig
from .data import select
from .errors import UserError
from .models import get_model_entry
from .pipeline import CALIB_BATCH, decode_selection, load_run_dataset, normalise, prepare_model


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
    config: str
    top1_agreement_pct: float  # ONNX Runtime vs PyTorch quantized predictions
    max_abs_logit_diff: float
    onnx_top1_error: float
    torch_top1_error: float
    onnx_swapped_pct: float  # predictions each quantized model changed from the float model's
    torch_swapped_pct: float
    # the largest float top-1 minus top-2 logit among the images the two disagree on (0 if none):
    # two faithful quantizers should part only where the float model itself barely decides
    disagreement_max_float_margin: float


def torch_agreement(config: str, float_logits: np.ndarray, onnx_logits: np.ndarray, torch_logits: np.ndarray,
                    labels: np.ndarray) -> TorchAgreement:
    from .evaluate.metrics import logit_margin, quantization_change, top_k_error

    disagree = onnx_logits.argmax(1) != torch_logits.argmax(1)
    return TorchAgreement(config, 100 * float(np.mean(~disagree)), float(np.max(np.abs(onnx_logits - torch_logits))),
                          100 * top_k_error(onnx_logits, labels), 100 * top_k_error(torch_logits, labels),
                          quantization_change(float_logits, onnx_logits, labels).swapped_pct,
                          quantization_change(float_logits, torch_logits, labels).swapped_pct,
                          float(logit_margin(float_logits)[disagree].max(initial=0.0)))


def compare_torch(cfg: RunConfig) -> list[TorchAgreement]:
    """Quantize a registry model with ptqcal (ONNX Runtime) and with ``torch.ao`` on the same
    calibration batches, and measure how far the two quantized models agree."""
    cfg.validate()
    if cfg.is_onnx_file:
        raise UserError("compare-torch needs a PyTorch model from the registry, not an .onnx file")
    unmatched = [option for option, used in (
        ("--calib-method " + cfg.calib_method, cfg.calib_method != "mse"), ("--calib-ranges", cfg.calib_ranges),
        ("--precisions fp16", cfg.fp16), ("--skip-first-layer", cfg.skip_first_layer),
        ("--skip-last-layer", cfg.skip_last_layer), ("--exclude", cfg.exclude),
        ("--weight-scale ort", cfg.weight_scale != "torch"), (f"--repeats {cfg.repeats}", cfg.repeats > 1)) if used]
    if unmatched:  # the torch.ao side: HistogramObserver ranges, PyTorch's weight scales, every layer, one draw
        raise UserError(f"compare-torch builds one mse calibration of every layer with PyTorch's weight scales "
                        f"on both sides; drop {', '.join(unmatched)}")
    import onnx

    from .evaluate import make_session, predict
    from .quantize import ArrayDataReader, QuantSpec, collect_histograms, compute_ranges, prepare, quantize_qdq
    from .quantize.torch_reference import torch_fake_quant, torch_logits

    specs = [QuantSpec(w, a, cfg.weight_scale).validate() for a in cfg.act_bits for w in cfg.weight_bits]
    entry = get_model_entry(cfg.model)
    dataset = load_run_dataset(cfg)
    with tempfile.TemporaryDirectory(prefix="ptqcal-compare-") as tmp:
        model = prepare_model(cfg, dataset, Cache(Path(tmp)))
        module = entry.build(cfg.weights, dataset.train, cfg.cache_dir)
        calib_split, evaluation, _ = decode_selection(select(dataset, cfg.calib_size, cfg.seed, cfg.eval_size),
                                                      model.preprocess, cfg.strict)
        calib = normalise(model.preprocess, calib_split.images)
        inputs = normalise(model.preprocess, evaluation.images)
        reader = ArrayDataReader("input", calib, CALIB_BATCH)
        prepared = prepare(model.float_path, Path(tmp) / "prepared.onnx")
        histograms = collect_histograms(prepared, reader, progress=cfg.progress)
        batches = [calib[i:i + reader.batch_size] for i in range(0, len(calib), reader.batch_size)]
        float_logits = predict(make_session(model.float_path), inputs, cfg.batch_size, "float", cfg.progress)
        rows = []
        graph = onnx.load(str(prepared), load_external_data=False).graph
        for spec in specs:
            ranges = share_input_ranges(graph, compute_ranges(histograms, "mse", spec.act_bits, len(calib)))
            # biases float, like torch.ao's reference model; logits float on both sides, as ptqcal deploys them
            path = quantize_qdq(prepared, Path(tmp) / f"{spec.name}.onnx", ranges, replace(spec, quantize_bias=False))
            ours = predict(make_session(path, fused=cfg.execution == "deployed"), inputs, cfg.batch_size,
                           spec.name, cfg.progress)
            theirs = torch_logits(torch_fake_quant(module, batches, spec.weight_bits, spec.act_bits), inputs)
            rows.append(torch_agreement(spec.name, float_logits, ours, theirs, evaluation.labels))
    return rows


def save_agreements(rows: list[TorchAgreement], out_dir: Path) -> Path:
    """``compare_torch.csv`` (one row per configuration) in ``out_dir``, written whole or not at all."""
    path = out_dir / "compare_torch.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[field.name for field in fields(TorchAgreement)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    return path
