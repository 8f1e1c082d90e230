"""The sentences a run record carries into its report: the header lines and the notes, composed
from the run's settings and what it measured. Sentences that judge numbers are made in
:mod:`ptqcal.analysis.judgement`; this module only says where they go."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .config import RunConfig
from .evaluate import PathAgreement
from .quantize.spec import stored_bits
from .evaluate.record import ConfigInfo
from .models import PreprocessCfg


def run_summary(cfg: RunConfig, model, dataset_name: str, images) -> dict[str, str | int]:
    """What the report's header says about a run."""
    draws = f", {cfg.repeats} draws" if cfg.repeats > 1 else ""
    source = "held out of the evaluation split" if images.held_out_from_eval \
        else "from the calibration pool, disjoint from evaluation"
    n_eval, n_failed = len(images.eval.labels), len(images.failed)
    held = {} if images.search is None else {"search images": f"{len(images.search)} held out of evaluation (seed "
                                             f"{cfg.seed}): the mixed-precision search saw only these"}
    return {
        "model": model.name, "dataset": dataset_name,
        "calibration images": f"{len(images.calib.labels)} (seed {cfg.seed}{draws}, {source})",
        "evaluation images": n_eval if not n_failed else f"{n_eval} ({n_failed} undecodable skipped)",
        "preprocessing": describe_preprocess(model.preprocess),
        "calibration": f"ranges from {cfg.calib_ranges}" if cfg.calib_ranges
        else f"{cfg.calib_method} histogram ranges",
        "weights": f"per-channel symmetric, scale convention '{cfg.weight_scale}'",
        "activations": "per-tensor asymmetric (uint8 container)",
        "execution": f"{cfg.execution} on ONNX Runtime's {cfg.provider} execution provider",
        **held,
    }


def describe_preprocess(p: PreprocessCfg) -> str:
    """The geometry, the normalisation (exact: enough to reproduce) and the input the graph takes."""
    channels, height, width = p.input_size
    resize = f"resize {p.resize} + centre crop {height}x{width}" if p.resize else f"{height}x{width}"
    colour = "RGB" if channels == 3 else "grayscale"
    if not p.normalises:
        return f"{resize}, {colour} uint8 pixels in {p.layout} (the graph normalises them)"
    return f"{resize}, (x/{p.pixel_max!r} - {list(p.mean)}) / {list(p.std)}, {colour} {p.dtype} in {p.layout}"


def run_notes(cfg: RunConfig, exclude: tuple[str, ...], checks: Sequence[PathAgreement],
              failed: Sequence[Path], calib_note: str | None = None,
              float_ops: tuple[str, dict[str, int]] | None = None,
              clipped_biases: dict[str, int] | None = None,
              descriptors: Mapping[str, ConfigInfo] | None = None) -> list[str]:
    """Notes on how the run was evaluated and what it could not do. ``descriptors`` (the sweep's)
    say which checked configurations have 8-bit weights; without them a check whose paths part
    fails loudly rather than guess from the names."""
    from .analysis.judgement import kernel_notes
    from .evaluate.cpu import has_vnni

    notes = [calib_note + "."] if calib_note else []
    clipped = {name: count for name, count in (clipped_biases or {}).items() if count}
    if clipped:
        notes.append("ONNX Runtime clipped int32 biases to the int32 range, so those layers add a bias other than "
                     "the float model's (a bias's scale is the input's scale times the weight's, too small for "
                     "it when a channel's weights are tiny, as in depthwise convolutions): "
                     + ", ".join(f"{name} {count} layer{'s' if count > 1 else ''}" for name, count in clipped.items())
                     + ".")
    if float_ops is not None and cfg.execution == "deployed":
        config, counts = float_ops
        notes.append(f"In the graph ONNX Runtime runs for {config}, " + (
            "every arithmetic op runs on an integer kernel." if not counts else
            "these ops still compute in float (no integer kernel, or no quantized input): "
            + ", ".join(f"{op} ×{n}" for op, n in counts.items()) + "."))
    if failed:
        notes.append(f"{len(failed)} images failed to decode and were skipped: "
                     + ", ".join(str(p) for p in failed[:5]) + (" …" if len(failed) > 5 else ""))
    if checks:
        notes.append(f"Evaluated with the {cfg.execution} path. Deployed (ORT's fused integer kernels) vs simulated "
                     f"(float ops between Q/DQ) on the first {checks[0].images} evaluation images: "
                     + "; ".join(f"{c.config}: max |Δlogit| {c.max_abs_logit_diff:.2e}, top-1 agreement "
                                 f"{100 * c.top1_agreement:.1f}%" for c in checks) + ".")
    notes += kernel_notes(checks, descriptors or {}, has_vnni())
    if any(stored_bits(bits) == 4 for bits in cfg.weight_bits):
        notes.append("3- and 4-bit weights (packed INT4, opset 21) have no integer Conv, Gemm or MatMul kernel on "
                     "CPU: ORT dequantizes them and runs those layers in float, so a*w4 and a*w3 are simulated even "
                     "on the deployed path.")
    if any(stored_bits(bits) == 2 for bits in cfg.weight_bits):
        notes.append("2-bit weights are stored packed as INT2 (opset 25) and reach their DequantizeLinear through a "
                     "Cast to int8 that ORT folds when it loads the model: on the deployed path they run ORT's int8 "
                     "kernels (its fusion would otherwise build a QLinearConv that cannot take INT2).")
    if any(bits < 8 for bits in cfg.act_bits):
        notes.append("Activations below 8 bits are clipped to their b-bit range before QuantizeLinear; the Clip "
                     "keeps ORT from fusing integer kernels, so those configurations run the simulated path.")
    if exclude:
        notes.append(f"Kept in float: {', '.join(exclude)}.")
    return notes
