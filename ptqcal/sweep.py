"""The configurations a run evaluates, and what each one adds to it: logits, file, deployment
numbers, the deployed-vs-simulated check and its descriptor, what it is (:mod:`ptqcal.pipeline`
decides which and in what order)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import checks, steps
from .cache import Cache
from .config import RunConfig
from .evaluate import FLOAT_NAME, PathAgreement
from .evaluate.attribution import Attribution
from .evaluate.deploy import Deployment
from .evaluate.metrics import quantization_change
from .evaluate.mixed import MixedChoice
from .evaluate.record import ConfigInfo, ConfigKind, base_name
from .quantize.spec import QuantSpec

FP16_NAME = "fp16"
CALIBRATION_STREAM = 1  # calibration images draw their corruptions apart from the evaluation images at their positions


def log(cfg: RunConfig, message: str) -> None:
    if not cfg.quiet:
        print(f"[ptqcal] {message}", flush=True)


@dataclass
class Sweep:
    """What the quantized configurations produced: logits by name, files to place in the run
    folder, the deployed-vs-simulated checks of the first draw, and what each configuration is
    (``descriptors``, for :class:`~ptqcal.evaluate.RunRecord`: the float model's from the start)."""

    logits: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    checks: list[PathAgreement] = field(default_factory=list)
    deployment: dict[str, Deployment] = field(default_factory=dict)
    float_ops: tuple[str, dict[str, int]] | None = None  # a configuration and what ORT runs of it in float
    clipped_biases: dict[str, int] = field(default_factory=dict)  # configuration -> int32 biases ORT clipped
    attribution: Attribution | None = None
    ranges: dict = field(default_factory=dict)  # activation bits -> the first draw's CalibrationRanges
    mixed: MixedChoice | None = None
    descriptors: dict[str, ConfigInfo] = field(
        default_factory=lambda: {FLOAT_NAME: ConfigInfo(FLOAT_NAME, ConfigKind.FLOAT)})
    served: dict[str, Path] = field(default_factory=dict)  # graphs run as another file than the one stored
    notes: list[str] = field(default_factory=list)  # what the configurations beyond the sweep are


def describe(spec: QuantSpec) -> ConfigInfo:
    """What ``spec`` quantizes to, from its fields: widths per layer make it mixed, else one weight
    and one activation width hold for every layer."""
    if spec.layer_bits:
        return ConfigInfo(spec.name, ConfigKind.MIXED)
    return ConfigInfo(spec.name, ConfigKind.UNIFORM, spec.weight_bits, spec.act_bits)


def add_fp16(cfg: RunConfig, model, images, cache: Cache, sweep: Sweep) -> None:
    from .cache import file_digest, make_key
    from .quantize.fp16 import convert_fp16

    path = cache.file("fp16", make_key(file_digest(model.float_path), steps.versions(steps.KEYED)), "onnx",
                      lambda tmp: convert_fp16(model.float_path, tmp))
    sweep.files["model_fp16.onnx"] = path
    sweep.descriptors[FP16_NAME] = ConfigInfo(FP16_NAME, ConfigKind.FP16)
    sweep.logits[FP16_NAME] = steps.model_logits(cache, path, images.eval, model.preprocess, cfg, FP16_NAME)
    sweep.deployment[FP16_NAME] = steps.deployment(cache, path, images.eval, model.preprocess, cfg)


def config_job(cfg: RunConfig, model, name: str, path: Path, pixels) -> steps.LogitsJob:
    """The evaluation of one configuration (on the run's execution path)."""
    return steps.LogitsJob(path, pixels, model.preprocess, name, fused=cfg.execution == "deployed")


def add_config(cfg: RunConfig, model, name: str, path: Path, pixels, batches: steps.Batches, cache: Cache,
               sweep: Sweep, first_draw: bool = True, *, spec: QuantSpec, info: ConfigInfo | None = None) -> None:
    """Evaluate one quantized model, made from ``spec`` (its calibration draw ``name``, e.g.
    ``a8w4#r1``, or a configuration ``info`` describes); the first draw's also gets its file,
    deployment numbers and check."""
    from .quantize.graph import clipped_biases

    if info is None and base_name(name) != spec.name:
        raise ValueError(f"configuration {name!r} is not a draw of {spec.name!r}")
    sweep.descriptors[base_name(name)] = info or describe(spec)

    job = config_job(cfg, model, name, path, pixels)
    sweep.logits[name] = steps.model_logits(cache, path, pixels, model.preprocess, cfg, name, fused=job.fused)
    if first_draw:
        sweep.deployment[name] = steps.deployment(cache, path, pixels, model.preprocess, cfg)
        sweep.clipped_biases[name] = len(clipped_biases(path))
        if sweep.float_ops is None:
            sweep.float_ops = (name, checks.deployed_float_ops(cache, path, cfg))
        sweep.files[f"model_{name}.onnx"] = path
        check = checks.check_deployment(cache, path, name, sweep.logits[name], pixels, model.preprocess, cfg,
                                       batches.check)
        sweep.checks += [check] if check else []
    _log_config(cfg, name, sweep.logits[name], sweep.logits[FLOAT_NAME], pixels.labels)


def add_graph(cfg: RunConfig, model, name: str, served: Path, stored: Path, pixels, batches: steps.Batches,
              cache: Cache, sweep: Sweep, info: ConfigInfo, has_twin: bool) -> None:
    """Evaluate a graph made elsewhere (a user's file, a peer toolchain's): ``served`` runs (fed and
    read as float), ``stored`` is the file placed in the run folder; the deployed-vs-simulated check
    only where the graph has a simulated twin (Q/DQ pairs around float ops)."""
    sweep.descriptors[name] = info
    sweep.logits[name] = steps.model_logits(cache, served, pixels, model.preprocess, cfg, name)
    sweep.deployment[name] = steps.deployment(cache, served, pixels, model.preprocess, cfg)
    sweep.files[f"model_{name}.onnx"] = stored
    sweep.served[name] = served
    if has_twin:
        # its logits are on the deployed path whatever --execution says: the check computes the other
        check = checks.check_deployment(cache, served, name, sweep.logits[name], pixels, model.preprocess,
                                       replace(cfg, execution="deployed"), batches.check)
        sweep.checks += [check] if check else []
    _log_config(cfg, name, sweep.logits[name], sweep.logits[FLOAT_NAME], pixels.labels)


def add_mixed(cfg: RunConfig, model, prepared: Path, batches: steps.Batches, images, exclude, cache: Cache,
              sweep: Sweep, executor=None) -> None:
    """Search the per-layer weight bits on the held-out images (its models measured as ``executor``'s
    tasks when it runs work ahead); evaluate the choice like the others."""
    ranges = sweep.ranges[max(cfg.act_bits)]
    timed = (images.eval, sweep.deployment[FLOAT_NAME]) if cfg.mixed_max_latency_ratio is not None else None
    sweep.mixed, spec = steps.mixed_search(cfg, cache, prepared, ranges, exclude, images.search, model.preprocess,
                                           sweep.attribution, executor=executor, timed=timed)
    if spec is None:
        log(cfg, f"mixed: no assignment of weight bits {list(cfg.weight_bits)} meets the target")
        return
    counts = {bits: sum(b == bits for b in sweep.mixed.layer_bits.values()) for bits in sorted(cfg.weight_bits)}
    log(cfg, "mixed: " + ", ".join(f"{n} layers at {bits} bits" for bits, n in counts.items() if n))
    add_config(cfg, model, spec.name, steps.quantize_config(cache, prepared, ranges, spec), images.eval, batches,
               cache, sweep, spec=spec)


def _log_config(cfg: RunConfig, name: str, logits: np.ndarray, float_logits: np.ndarray, labels: np.ndarray) -> None:
    """One console line per configuration, against the float model's (:func:`log_float` said it first)."""
    if cfg.quiet:  # the change costs a softmax of the float logits: only for a line someone reads
        return
    change = quantization_change(float_logits, logits, labels)  # swaps are counted in one place
    error, float_error = 100 * np.mean(~change.quant_correct), 100 * np.mean(~change.float_correct)
    log(cfg, f"{name}: top-1 error {error:.2f}% (float {float_error:.2f}%, {error - float_error:+.2f} pp), "
             f"{100 * change.swap_rate:.2f}% swapped")


def log_float(cfg: RunConfig, float_logits: np.ndarray, labels: np.ndarray) -> None:
    """The float model's top-1 error, the line every configuration's is read against."""
    log(cfg, f"float: top-1 error {100 * np.mean(float_logits.argmax(axis=1) != labels):.2f}% on {len(labels)} "
             "evaluation images")


def log_recommendation(cfg: RunConfig, report_folder: Path) -> None:
    """The configuration to ship, as the report's ``recommendation.json`` says, and its warnings."""
    import json

    from .analysis.recommend import RECOMMENDATION_FILE

    path = Path(report_folder) / RECOMMENDATION_FILE
    if cfg.quiet or not path.is_file():
        return
    for run in json.loads(path.read_text()).get("runs", []):
        log(cfg, run["sentence"])
        for warning in run.get("warnings", []):
            log(cfg, f"warning: {warning}")


@dataclass(frozen=True)
class HeldOut:
    """Logits by configuration on images the evaluation never sees, and where they came from."""

    source: str  # "search" or "calibration"
    labels: np.ndarray
    logits: dict[str, np.ndarray]


def add_shift_calibrated(cfg: RunConfig, model, prepared: Path, exclude: tuple[str, ...], batches: steps.Batches,
                         images, cache: Cache, sweep: Sweep, executor) -> None:
    """Every swept precision calibrated once more, on the calibration images under
    ``cfg.calibration_corruption`` (activation ranges from noisy images differ), each evaluated like
    its clean-calibrated twin, whose descriptor it shares but for ``calibrated_on``."""
    from .quantize import compute_ranges

    cell = cfg.calibration_corruption
    pixels = images.calib.corrupted(cell, cfg.seed, CALIBRATION_STREAM)
    histograms = executor.map(steps.calibrate, [(cache, prepared, model.input_name, pixels, model.preprocess,
                                                 batches.calib, cfg.progress, executor.task_threads(cfg), exclude)])[0]
    log(cfg, f"calibrated again on the calibration images under {cell.name} at severity {cell.severity}")
    plan = [(compute_ranges(histograms, cfg.calib_method, bits, len(pixels.labels)),
             QuantSpec(weight_bits, bits, cfg.weight_scale, exclude))
            for bits in cfg.act_bits for weight_bits in cfg.weight_bits]
    names = [f"{spec.name}-cal-{cell.name}-s{cell.severity}" for _, spec in plan]
    paths = executor.map(steps.quantize_config, [(cache, prepared, ranges, spec) for ranges, spec in plan])
    executor.warm_logits(cache, [config_job(cfg, model, name, path, images.eval) for name, path in zip(names, paths)],
                         cfg)
    for (_, spec), name, path in zip(plan, names, paths):
        add_config(cfg, model, name, path, images.eval, batches, cache, sweep, spec=spec,
                   info=ConfigInfo(name, ConfigKind.UNIFORM, spec.weight_bits, spec.act_bits, cell.key))


def _evaluated(cfg: RunConfig, sweep: Sweep) -> list[tuple[str, Path, bool]]:
    """(name, file that runs, fused) of every configuration's first draw, the float model first, each
    run as it was evaluated."""
    return [(name, sweep.served.get(name) or sweep.files[f"model_{name}.onnx"],
             cfg.execution == "deployed" or name in (FLOAT_NAME, FP16_NAME) or name in sweep.served)
            for name in sweep.logits if base_name(name) == name]


def shifted_logits(cfg: RunConfig, model, images, cache: Cache, sweep: Sweep, executor) -> dict:
    """Every configuration's logits (first draws, the float model included) on the evaluation images
    under each of ``cfg.cells``: the corrupted pixels are computed chunk by chunk as independent
    work for ``executor`` and cached, then every configuration reads them."""
    cells = [(cell, images.eval.corrupted(cell, cfg.seed)) for cell in cfg.cells]
    if not cells:
        return {}
    channels, height, width = model.preprocess.input_size
    log(cfg, f"{len(cells)} corrupted copies of the evaluation images: about "
             f"{len(cells) * len(images.eval) * channels * height * width / 1e9:.1f} GB of pixels in the run's cache")
    executor.map(steps.corrupt_chunk, [(cache, pixels, index) for _, pixels in cells
                                       for index in range(pixels.num_chunks)])
    configs = _evaluated(cfg, sweep)
    executor.warm_logits(cache, [steps.LogitsJob(path, pixels, model.preprocess, f"{name} ({cell.key})", fused,
                                                 "shift-logits")
                                 for cell, pixels in cells for name, path, fused in configs], cfg)
    shifted = {cell.key: {name: steps.model_logits(cache, path, pixels, model.preprocess, cfg,
                                                   f"{name} ({cell.key})", fused=fused, kind="shift-logits")
                          for name, path, fused in configs} for cell, pixels in cells}
    names = sorted({cell.name for cell, _ in cells})
    severities = ", ".join(map(str, dict.fromkeys(c.severity for c, _ in cells)))
    sweep.notes.append(f"Under shift: every configuration (first calibration draw) on the evaluation images under "
                       f"{len(names)} corruption{'s' * (len(names) > 1)} of ImageNet-C ({', '.join(names)}) at "
                       f"severities {severities}, computed by its reference implementation with ImageNet-C's parameters "
                       "(set for 224-pixel images) on the decoded pixels before normalisation, each image seeded by "
                       "the run's seed, its position, the corruption and the severity.")
    return shifted


def held_out_logits(cfg: RunConfig, model, images, calib_float: np.ndarray, cache: Cache, sweep: Sweep) -> HeldOut:
    """Every configuration's logits on images the evaluation never sees, where a float
    fallback guard's threshold is chosen: the images held out for a search when the run has them,
    else the calibration images (which also set the activation ranges: the report says so)."""
    if images.search is not None:
        source, pixels, kind = "search", images.search, "search-logits"
        reference = steps.model_logits(cache, model.float_path, pixels, model.preprocess, cfg, "float (search)",
                                       kind=kind)
    else:
        source, pixels, kind, reference = "calibration", images.calib, "calib-logits", calib_float
    logits = {FLOAT_NAME: reference}
    for name, path, fused in _evaluated(cfg, sweep)[1:]:
        logits[name] = steps.model_logits(cache, path, pixels, model.preprocess, cfg, f"{name} (held out)",
                                          fused=fused, kind=kind)
    return HeldOut(source, pixels.labels, logits)
