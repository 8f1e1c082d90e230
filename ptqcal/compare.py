"""``ptqcal compare-torch``: the same quantization built by ONNX Runtime and by ``torch.ao``."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path


from . import csvsafe, steps
from .atomic import atomic_path
from .cache import Cache
from .config import RunConfig, flag_of
from .errors import UserError
from .evaluate.agreement import TorchAgreement, torch_agreement
from .evaluate.memory import CALIB_BATCH
from .data import Split
from .models import get_model_entry
from .data.pixels import Pixels


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
        from .export.torch_reference import torch_fake_quant, torch_logits
    except ImportError as exc:
        raise UserError("compare-torch needs PyTorch: pip install 'ptqcal[torch]'") from exc
    import onnx

    from .quantize import QuantSpec, compute_ranges
    from .quantize.calibrate import share_input_ranges

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
                                     CALIB_BATCH, cfg.progress)
        batches = [calib[i:i + CALIB_BATCH] for i in range(0, len(calib), CALIB_BATCH)]
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
        writer = csvsafe.DictWriter(handle, fieldnames=[field.name for field in fields(TorchAgreement)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    return path
