"""``ptqcal run``: model -> ONNX -> calibration -> QDQ models -> logits -> metrics, figures, report."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from . import __version__
from .config import RunConfig
from .data import Dataset, Selection, Split, decode_images, load_dataset, select
from .errors import UserError
from .models import PreprocessCfg, get_model_entry, inspect_onnx
from .models.registry import DIGITS_PREPROCESS, IMAGENET_PREPROCESS

FLOAT_NAME = "float"
REPEAT_MARK = "#r"
FP16_NAME = "fp16"
SIMULATION_CHECK_IMAGES = 256


@dataclass(frozen=True)
class PreparedModel:
    name: str
    float_path: Path  # the float ONNX model evaluated as the reference
    preprocess: PreprocessCfg
    num_classes: int
    notes: tuple[str, ...] = ()


def _log(message: str) -> None:
    print(f"[ptqcal] {message}", flush=True)


def _onnx_preprocess(cfg: RunConfig, chw: tuple[int, int, int] | None, dataset: Dataset) -> PreprocessCfg:
    """A user's model: the graph's input size, the dataset's usual normalisation unless overridden."""
    if dataset.name == "digits":
        base = DIGITS_PREPROCESS
    elif dataset.eval.is_files:
        base = IMAGENET_PREPROCESS
    else:
        base = PreprocessCfg(input_size=chw or (3, 0, 0), mean=(0.0,), std=(1.0,))
    size = chw or base.input_size
    resize = cfg.resize if cfg.resize is not None else (base.resize if size == base.input_size else None)
    return PreprocessCfg(size, cfg.mean or base.mean, cfg.std or base.std, cfg.pixel_max or base.pixel_max,
                         resize or None, base.interpolation)


def prepare_model(cfg: RunConfig, dataset: Dataset, work: Path) -> PreparedModel:
    """A float ONNX model for ``cfg.model``: a user's file as it is, or a registry model exported."""
    if cfg.is_onnx_file:
        info = inspect_onnx(cfg.model)
        notes = ()
        if info.ends_in_softmax:
            notes = ("The model ends in Softmax: confidences are its probabilities (logits = log-probabilities).",)
        preprocess = _onnx_preprocess(cfg, info.chw, dataset)
        float_path = work / "model_float.onnx"
        shutil.copyfile(info.path, float_path)
        return PreparedModel(cfg.model_name, float_path, preprocess, info.num_classes, notes)
    entry = get_model_entry(cfg.model)
    try:
        from .export import export_onnx
    except ImportError as exc:
        raise UserError(f"model {cfg.model!r} is a PyTorch model: pip install 'ptqcal[torch]', "
                        "or pass an .onnx file") from exc
    module = entry.build(cfg.weights, dataset.train, cfg.cache_dir)
    check, _ = decode_images(dataset.eval.take(np.arange(min(16, len(dataset.eval)))), entry.preprocess.input_size,
                             entry.preprocess.resize, entry.preprocess.interpolation)
    result = export_onnx(module, _preprocess(entry.preprocess, check.images), work / "model_float.onnx")
    note = f"Exported to ONNX with BatchNorm folded; max |logit difference| vs PyTorch on {result.num_checked} " \
           f"evaluation images: {result.max_abs_diff:.2e}."
    return PreparedModel(entry.name, result.path, entry.preprocess, entry.num_classes, (note,))


def _check_labels(dataset: Dataset, num_classes: int) -> None:
    for split in (dataset.calib_pool, dataset.eval):
        if split is not None and len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            raise UserError(f"dataset {dataset.name!r} has labels outside the model's {num_classes} classes "
                            f"(found {split.labels.min()}..{split.labels.max()})")


def decode_selection(selection: Selection, preprocess: PreprocessCfg, strict: bool) -> tuple[Split, Split, list]:
    """Pixels of the chosen images at the model's input size; undecodable files are dropped."""
    args = (preprocess.input_size, preprocess.resize, preprocess.interpolation, strict)
    calib, failed_calib = decode_images(selection.calib, *args)
    evaluation, failed_eval = decode_images(selection.eval, *args)
    return calib, evaluation, failed_calib + failed_eval


def _preprocess(preprocess: PreprocessCfg, images: np.ndarray) -> np.ndarray:
    try:
        return preprocess(images)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def excluded_nodes(cfg: RunConfig, prepared: Path) -> tuple[str, ...]:
    """``--exclude`` plus the first/last weight layer when asked to skip them."""
    import onnx

    from .quantize.qdq import weight_nodes

    layers = weight_nodes(onnx.load(str(prepared), load_external_data=False))
    chosen = list(cfg.exclude)
    if cfg.skip_first_layer and layers:
        chosen.append(layers[0])
    if cfg.skip_last_layer and layers:
        chosen.append(layers[-1])
    return tuple(dict.fromkeys(chosen))


def _load_dataset(cfg: RunConfig) -> Dataset:
    kind = cfg.dataset or ("digits" if cfg.is_onnx_file else get_model_entry(cfg.model).default_dataset)
    dataset = load_dataset(kind, cfg.data_dir, cfg.labels, cfg.download)
    if cfg.calib_data is None:
        return dataset
    pool = load_dataset(kind, cfg.calib_data, cfg.labels)
    return replace(dataset, calib_pool=pool.calib_pool if pool.calib_pool is not None else pool.eval)


def run(cfg: RunConfig) -> Path:
    """Run the whole analysis; returns the path of ``report.md``. Nothing is left behind on error."""
    cfg.validate()
    from .quantize import QuantSpec

    specs = [QuantSpec(w, a, cfg.weight_scale).validate() for a in cfg.act_bits for w in cfg.weight_bits]
    out = cfg.out_dir
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "run.json").exists())):
        raise UserError(f"{out} exists and is not a ptqcal run folder; choose another --out")
    dataset = _load_dataset(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would carry over to the finished run folder
    try:
        _run_in(cfg, dataset, specs, work)
        from .analysis import build_report

        build_report([work], work)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out / "report.md"


def run_models(cfg: RunConfig, models: list[str]) -> Path:
    """Several models, each in ``out/<model>``, and one report comparing them in ``out``."""
    if len(models) == 1:
        return run(replace(cfg, model=models[0]))
    out = cfg.out if cfg.out is not None else Path("ptqcal_runs") / "_vs_".join(Path(m).stem for m in models)
    if out.exists() and any(out.iterdir()) and not (out / "report.md").exists():
        raise UserError(f"{out} exists and is not a ptqcal run folder; choose another --out")
    folders = []
    for model in models:
        folders.append(run(replace(cfg, model=model, out=out / Path(model).stem)).parent)
    from .analysis import build_report

    return build_report(folders, out)


def _calibrate_and_quantize(cfg, model, specs, calib_inputs, input_name, exclude, prepared, work, suffix):
    """One calibration pass and every quantized model of one repeat."""
    from .quantize import ArrayDataReader, collect_histograms, compute_ranges, quantize_qdq

    histograms = collect_histograms(prepared, ArrayDataReader(input_name, calib_inputs, 64), progress=cfg.progress)
    ranges = {bits: compute_ranges(histograms, cfg.calib_method, bits, len(calib_inputs)) for bits in cfg.act_bits}
    for bits, bit_ranges in ranges.items():
        bit_ranges.save(work / f"calibration_ranges_a{bits}{suffix}.json")
    paths = {}
    for spec in specs:
        name = f"model_{spec.name}{suffix}.onnx"
        paths[spec] = quantize_qdq(prepared, work / name, ranges[spec.act_bits], replace(spec, exclude=exclude))
    return len(histograms), paths


def _run_in(cfg: RunConfig, dataset: Dataset, specs: list, work: Path) -> None:
    from .evaluate import make_session, predict
    from .quantize import prepare
    from .quantize.fp16 import convert_fp16

    started = time.perf_counter()
    model = prepare_model(cfg, dataset, work)
    _check_labels(dataset, model.num_classes)
    selections = [select(dataset, cfg.calib_size, cfg.seed, cfg.eval_size, r, cfg.repeats) for r in range(cfg.repeats)]
    calib, evaluation, failed = decode_selection(selections[0], model.preprocess, cfg.strict)
    _preprocess(model.preprocess, evaluation.images[:1])  # a size mismatch is a user error, said now
    eval_images, labels = evaluation.images, evaluation.labels
    notes = list(model.notes)
    if failed:
        notes.append(f"{len(failed)} images failed to decode and were skipped: "
                     + ", ".join(str(p) for p in failed[:5]) + (" …" if len(failed) > 5 else ""))
    _log(f"model {model.name}: {len(calib)} calibration / {len(labels)} evaluation images ({dataset.name})")

    session = make_session(model.float_path)
    input_name = session.get_inputs()[0].name
    evaluate = partial(predict, inputs=eval_images, batch_size=cfg.batch_size, progress=cfg.progress,
                       transform=model.preprocess)
    logits = {FLOAT_NAME: evaluate(session, desc=FLOAT_NAME)}
    if logits[FLOAT_NAME].ndim != 2 or logits[FLOAT_NAME].shape[1] != model.num_classes:
        raise UserError(f"{cfg.model}: output has shape {list(logits[FLOAT_NAME].shape)}, expected (N, classes)")
    calib_inputs = _preprocess(model.preprocess, calib.images)
    calib_float = predict(session, calib_inputs, cfg.batch_size, progress=False)
    if cfg.fp16:
        logits[FP16_NAME] = evaluate(make_session(convert_fp16(model.float_path, work / "model_fp16.onnx")),
                                     desc=FP16_NAME)

    prepared = prepare(model.float_path, work / "model_prepared.onnx")
    exclude = excluded_nodes(cfg, prepared)
    simulation_rows = []
    check = model.preprocess(eval_images[:SIMULATION_CHECK_IMAGES])
    for repeat, selection in enumerate(selections):
        suffix = "" if repeat == 0 else f"{REPEAT_MARK}{repeat}"
        if repeat:
            calib_inputs = _preprocess(model.preprocess, decode_selection(selection, model.preprocess, cfg.strict)[0].images)
        tensors, paths = _calibrate_and_quantize(cfg, model, specs, calib_inputs, input_name, exclude, prepared,
                                                 work, suffix)
        _log(f"calibrated {tensors} tensors in one pass ({cfg.calib_method}, repeat {repeat + 1}/{cfg.repeats}); "
             "reused for every precision")
        for spec, path in paths.items():
            deployed, simulated = make_session(path, fused=True), make_session(path, fused=False)
            logits[spec.name + suffix] = evaluate(simulated if cfg.execution == "simulated" else deployed,
                                                  desc=spec.name + suffix)
            if repeat == 0:
                fused_check = predict(deployed, check, progress=False)
                simulated_check = predict(simulated, check, progress=False)
                simulation_rows.append((spec.name, float(np.max(np.abs(fused_check - simulated_check))),
                                        100 * float(np.mean(fused_check.argmax(1) == simulated_check.argmax(1)))))
            if repeat:
                path.unlink()  # repeats keep their logits and ranges, not a model file each
            swapped = 100 * np.mean(logits[spec.name + suffix].argmax(1) != logits[FLOAT_NAME].argmax(1))
            _log(f"{spec.name + suffix}: top-1 error {100 * np.mean(logits[spec.name + suffix].argmax(1) != labels):.2f}%, "
                 f"{swapped:.2f}% swapped")
    prepared.unlink()

    notes += _notes(cfg, specs, exclude, simulation_rows, len(check))
    _save_npz(work / "logits.npz", labels=labels, calib_labels=calib.labels, calib_float=calib_float, **logits)
    info = {
        "model": model.name,
        "configs": list(logits),
        "notes": notes,
        "run": {
            "model": model.name, "dataset": dataset.name,
            "calibration images": f"{len(calib)} (seed {cfg.seed}"
                                  + (f", {cfg.repeats} draws" if cfg.repeats > 1 else "") + ", "
                                  + ("held out of the evaluation split)" if selections[0].held_out_from_eval
                                     else "from the calibration pool, disjoint from evaluation)"),
            "evaluation images": len(labels) if not failed else f"{len(labels)} ({len(failed)} undecodable skipped)",
            "preprocessing": _describe(model.preprocess),
            "calibration": f"{cfg.calib_method} histogram ranges",
            "weights": f"per-channel symmetric, scale convention {cfg.weight_scale!r}",
            "activations": "per-tensor asymmetric (uint8 container)",
            "execution": cfg.execution,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "config": cfg.to_dict(),
    }
    (work / "run.json").write_text(json.dumps(info, indent=2))


def _notes(cfg: RunConfig, specs: list, exclude: tuple[str, ...], simulation_rows: list, checked: int) -> list[str]:
    notes = [f"Evaluated with the {cfg.execution} path. Deployed (ORT's fused integer kernels) vs simulated (float "
             f"ops between Q/DQ) on the first {checked} evaluation images: "
             + "; ".join(f"{name}: max |Δlogit| {diff:.2e}, top-1 agreement {agree:.1f}%"
                         for name, diff, agree in simulation_rows) + "."]
    if any(s.weight_bits == 4 for s in specs):
        notes.append("int4 weights (QInt4, opset 21) have no integer Conv kernel on CPU: ORT dequantizes them "
                     "and runs those Convs in float, so a*w4 is simulated even on the deployed path.")
    if any(s.act_bits < 8 for s in specs):
        notes.append("Activations below 8 bits are clipped to their b-bit range before QuantizeLinear; the Clip "
                     "keeps ORT from fusing QLinearConv, so those configurations run the simulated path.")
    if exclude:
        notes.append(f"Kept in float: {', '.join(exclude)}.")
    return notes


def _describe(p: PreprocessCfg) -> str:
    resize = f"resize {p.resize} + centre crop {p.input_size[1]}x{p.input_size[2]}" if p.resize else \
        f"{p.input_size[1]}x{p.input_size[2]}"
    return f"{resize}, (x/{p.pixel_max:g} - {[round(m, 4) for m in p.mean]}) / {[round(s, 4) for s in p.std]}"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


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


def compare_torch(cfg: RunConfig, work: Path | None = None) -> list[TorchAgreement]:
    """Quantize a registry model with ptqcal (ONNX Runtime) and with ``torch.ao`` on the same
    calibration batches, and measure how far the two quantized models agree."""
    cfg.validate()
    if cfg.is_onnx_file:
        raise UserError("compare-torch needs a PyTorch model from the registry, not an .onnx file")
    import onnx

    from .evaluate import make_session, predict
    from .quantize import ArrayDataReader, QuantSpec, collect_histograms, compute_ranges, prepare, quantize_qdq
    from .quantize.torch_reference import torch_fake_quant, torch_logits

    specs = [QuantSpec(w, a, cfg.weight_scale).validate() for a in cfg.act_bits for w in cfg.weight_bits]
    entry = get_model_entry(cfg.model)
    dataset = _load_dataset(cfg)
    with tempfile.TemporaryDirectory(prefix="ptqcal-compare-") as tmp:
        model = prepare_model(cfg, dataset, Path(tmp))
        module = entry.build(cfg.weights, dataset.train, cfg.cache_dir)
        calib_split, evaluation, _ = decode_selection(select(dataset, cfg.calib_size, cfg.seed, cfg.eval_size),
                                                      model.preprocess, cfg.strict)
        calib = _preprocess(model.preprocess, calib_split.images)
        inputs = _preprocess(model.preprocess, evaluation.images)
        labels = evaluation.labels
        reader = ArrayDataReader("input", calib, 64)
        prepared = prepare(model.float_path, Path(tmp) / "prepared.onnx")
        histograms = collect_histograms(prepared, reader, progress=cfg.progress)
        batches = [calib[i:i + reader.batch_size] for i in range(0, len(calib), reader.batch_size)]
        rows = []
        graph = onnx.load(str(prepared), load_external_data=False).graph
        for spec in specs:
            ranges = share_input_ranges(graph, compute_ranges(histograms, "mse", spec.act_bits, len(calib)))
            # like torch.ao's reference model: logits quantized, biases float
            path = quantize_qdq(prepared, Path(tmp) / f"{spec.name}.onnx", ranges,
                                replace(spec, quantize_outputs=True, quantize_bias=False))
            ours = predict(make_session(path, fused=cfg.execution == "deployed"), inputs, cfg.batch_size,
                           spec.name, cfg.progress)
            theirs = torch_logits(torch_fake_quant(module, batches, spec.weight_bits, spec.act_bits), inputs)
            rows.append(TorchAgreement(spec.name, 100 * float(np.mean(ours.argmax(1) == theirs.argmax(1))),
                                       float(np.max(np.abs(ours - theirs))),
                                       100 * float(np.mean(ours.argmax(1) != labels)),
                                       100 * float(np.mean(theirs.argmax(1) != labels))))
    return rows
