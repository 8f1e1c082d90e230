"""The configurations a run evaluates, and what each one adds to it: logits, file, deployment
numbers and the deployed-vs-simulated check (:mod:`ptqcal.pipeline` decides which and in what
order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import steps
from .cache import Cache
from .config import RunConfig
from .evaluate import FLOAT_NAME, PathAgreement
from .evaluate.attribution import Attribution
from .evaluate.deploy import Deployment
from .evaluate.mixed import MixedChoice

FP16_NAME = "fp16"


def log(cfg: RunConfig, message: str) -> None:
    if not cfg.quiet:
        print(f"[ptqcal] {message}", flush=True)


@dataclass
class Sweep:
    """What the quantized configurations produced: logits by name, files to place in the run
    folder, and the deployed-vs-simulated checks of the first draw."""

    logits: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    checks: list[PathAgreement] = field(default_factory=list)
    deployment: dict[str, Deployment] = field(default_factory=dict)
    float_ops: tuple[str, dict[str, int]] | None = None  # a configuration and what ORT runs of it in float
    clipped_biases: dict[str, int] = field(default_factory=dict)  # configuration -> int32 biases ORT clipped
    attribution: Attribution | None = None
    ranges: dict = field(default_factory=dict)  # activation bits -> the first draw's CalibrationRanges
    mixed: MixedChoice | None = None


def add_fp16(cfg: RunConfig, model, images, cache: Cache, sweep: Sweep) -> None:
    from .cache import file_digest, make_key
    from .quantize.fp16 import convert_fp16

    path = cache.file("fp16", make_key(file_digest(model.float_path), steps.versions()), "onnx",
                      lambda tmp: convert_fp16(model.float_path, tmp))
    sweep.files["model_fp16.onnx"] = path
    sweep.logits[FP16_NAME] = steps.model_logits(cache, path, images.eval, model.preprocess, cfg, FP16_NAME)
    sweep.deployment[FP16_NAME] = steps.deployment(cache, path, images.eval, model.preprocess, cfg)


def config_job(cfg: RunConfig, model, name: str, path: Path, pixels) -> steps.LogitsJob:
    """The evaluation of one configuration (on the run's execution path)."""
    return steps.LogitsJob(path, pixels, model.preprocess, name, fused=cfg.execution == "deployed")


def add_config(cfg: RunConfig, model, name: str, path: Path, pixels, batches: steps.Batches, cache: Cache,
               sweep: Sweep, first_draw: bool = True) -> None:
    """Evaluate one quantized model; the first draw's also gets its file, deployment numbers and check."""
    from .quantize.graph import clipped_biases

    job = config_job(cfg, model, name, path, pixels)
    sweep.logits[name] = steps.model_logits(cache, path, pixels, model.preprocess, cfg, name, fused=job.fused)
    if first_draw:
        sweep.deployment[name] = steps.deployment(cache, path, pixels, model.preprocess, cfg)
        sweep.clipped_biases[name] = len(clipped_biases(path))
        if sweep.float_ops is None:
            sweep.float_ops = (name, steps.deployed_float_ops(cache, path, cfg))
        sweep.files[f"model_{name}.onnx"] = path
        check = steps.check_deployment(cache, path, name, sweep.logits[name], pixels, model.preprocess, cfg,
                                       batches.check)
        sweep.checks += [check] if check else []
    _log_config(cfg, name, sweep.logits[name], sweep.logits[FLOAT_NAME], pixels.labels)


def add_mixed(cfg: RunConfig, model, prepared: Path, batches: steps.Batches, images, exclude, cache: Cache,
              sweep: Sweep) -> None:
    """Search the per-layer weight bits on the held-out images; evaluate the choice like the others."""
    ranges = sweep.ranges[max(cfg.act_bits)]
    sweep.mixed, spec = steps.mixed_search(cfg, cache, prepared, ranges, exclude, images.search, model.preprocess,
                                     sweep.attribution)
    if spec is None:
        log(cfg, f"mixed: no assignment of weight bits {list(cfg.weight_bits)} meets the target")
        return
    counts = {bits: sum(b == bits for b in sweep.mixed.layer_bits.values()) for bits in sorted(cfg.weight_bits)}
    log(cfg, "mixed: " + ", ".join(f"{n} layers at {bits} bits" for bits, n in counts.items() if n))
    add_config(cfg, model, spec.name, steps.quantize_config(cache, prepared, ranges, spec), images.eval, batches,
               cache, sweep)


def _log_config(cfg: RunConfig, name: str, logits: np.ndarray, float_logits: np.ndarray, labels: np.ndarray) -> None:
    swapped = np.mean(logits.argmax(1) != float_logits.argmax(1))
    log(cfg, f"{name}: top-1 error {100 * np.mean(logits.argmax(1) != labels):.2f}%, {100 * swapped:.2f}% swapped")
