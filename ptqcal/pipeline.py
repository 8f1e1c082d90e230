"""``ptqcal run``: model -> ONNX -> calibration -> QDQ models -> logits -> run record -> report.

:func:`measure` reads top to bottom as the run's steps (:mod:`ptqcal.steps`); :func:`run` gives it
a run folder that is replaced in one rename, so a failed run leaves the previous one whole. Every
expensive step goes through the folder's cache: re-running recomputes nothing, a new bit width
computes only itself, and a killed run resumes.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path

from . import steps
from .cache import Cache, link_or_copy
from .executors import Executor, make_executor
from .config import RunConfig
from .deployed import check_inputs, recorded_settings
from .errors import UserError
from .evaluate import FLOAT_NAME, REPEAT_MARK, RunRecord
from .quantize import QuantSpec
from .report_text import run_notes, run_summary
from .reports import report_once
from .runfolder import COMPARISON, RUN, check_target, new_work_dir, swap_in, write_marker, writing
from .sweep import (Sweep, add_config, add_fp16, add_mixed, add_shift_calibrated, config_job, held_out_logits, log,
                    log_float, log_recommendation, shifted_logits)


def _export(cache: Cache, cfg: RunConfig, dataset) -> steps.PreparedModel:
    return steps.prepare_model(cfg, dataset, cache)


def measure(cfg: RunConfig, dataset, cache: Cache, new_work_dir, executor: Executor) -> Path:
    """Run every step of ``cfg`` and write its record into a new work folder; returns the folder.
    ``executor`` (:mod:`ptqcal.executors`) runs the independent work."""
    started = time.perf_counter()
    from .evaluate.runner import execution_provider

    execution_provider(cfg.provider)  # an unavailable provider is said before any work
    model = executor.map(_export, [(cache, cfg, dataset)])[0]
    steps.check_labels(dataset, model.num_classes)
    draws = [steps.draw_images(dataset, cfg, model.preprocess, cache, r) for r in range(cfg.repeats)]
    images = draws[0]
    check_inputs(cfg, model, images)
    for cell in (*cfg.cells, *filter(None, [cfg.calibration_corruption])):
        images.eval.corrupted(cell, cfg.seed)  # images a corruption cannot take are one line before any work
    prepared = steps.prepare_for_quantization(cache, model.float_path)
    exclude = steps.layers_kept_float(prepared, cfg)
    batches = steps.choose_batches(prepared, model.preprocess, cfg, exclude)
    recorded, cfg = cfg, replace(cfg, batch_size=batches.eval)
    log(cfg, f"model {model.name}: {len(images.calib)} calibration / {len(images.eval)} evaluation images "
         f"({dataset.name}); batches of {batches.eval} (evaluation) and {batches.calib} (calibration)")
    executor.warm_logits(cache, [steps.LogitsJob(model.float_path, images.eval, model.preprocess, FLOAT_NAME),
                                steps.LogitsJob(model.float_path, images.calib, model.preprocess, "calibration",
                                                kind="calib-logits")], cfg)
    float_logits = steps.model_logits(cache, model.float_path, images.eval, model.preprocess, cfg, FLOAT_NAME)
    if float_logits.ndim != 2 or float_logits.shape[1] != model.num_classes:
        raise UserError(f"{cfg.model}: output has shape {list(float_logits.shape)}, expected (N, classes)")
    log_float(cfg, float_logits, images.eval.labels)
    work = new_work_dir()  # from here on, the run only fails for internal reasons
    calib_float = steps.model_logits(cache, model.float_path, images.calib, model.preprocess, cfg,
                                     "calibration", kind="calib-logits")
    sweep = Sweep({FLOAT_NAME: float_logits}, {"model_float.onnx": model.float_path})
    sweep.deployment[FLOAT_NAME] = steps.deployment(cache, model.float_path, images.eval, model.preprocess, cfg)
    if cfg.fp16:
        add_fp16(cfg, model, images, cache, sweep)
    _quantize_sweep(cfg, model, prepared, exclude, batches, draws, cache, work, sweep, executor)
    _beyond_the_sweep(cfg, model, prepared, exclude, batches, images, cache, sweep, executor)
    shifted = shifted_logits(cfg, model, images, cache, sweep, executor)
    held_out = held_out_logits(cfg, model, images, calib_float, cache, sweep)
    for name, source in sweep.files.items():
        link_or_copy(source, work / name, within=cache.root)
    notes = [*model.notes, batches.note, *([images.search_note] if images.search_note else []),
             *sweep.notes, *run_notes(cfg, exclude, sweep.checks, images.failed, images.calib_note, sweep.float_ops,
                       sweep.clipped_biases, descriptors=sweep.descriptors)]
    RunRecord(model.name, images.eval.labels, sweep.logits, images.calib.labels, calib_float,
              run_summary(cfg, model, dataset.name, images), notes, recorded_settings(recorded),
              steps.first_seconds(cache, sweep.logits, round(time.perf_counter() - started, 1)),
              sweep.deployment, sweep.attribution, sweep.mixed, sweep.descriptors, held_out.labels, held_out.logits,
              held_out.source, dict([cfg.guard_target]), shifted).save(work)
    return work


def _beyond_the_sweep(cfg: RunConfig, model, prepared: Path, exclude: tuple[str, ...], batches: steps.Batches, images,
                      cache: Cache, sweep: Sweep, executor: Executor) -> None:
    """A calibration under a corruption, graphs made elsewhere (``--quantized``, ``--also``),
    attribution and the mixed-precision search."""
    if cfg.calibration_corruption:
        add_shift_calibrated(cfg, model, prepared, exclude, batches, images, cache, sweep, executor)
    if cfg.quantized or cfg.also:
        from .deployed import add_deployed

        add_deployed(cfg, model, prepared, images, batches, cache, sweep)
    if cfg.attribute or cfg.mixed:
        sweep.attribution = steps.attribution(cfg, model.preprocess, prepared, images, cache, executor=executor)
    if cfg.mixed:
        add_mixed(cfg, model, prepared, batches, images, exclude, cache, sweep, executor)


def _quantize_sweep(cfg: RunConfig, model, prepared: Path, exclude: tuple[str, ...], batches: steps.Batches, draws,
                    cache: Cache, work: Path, sweep: Sweep, executor: Executor) -> None:
    """Every calibration draw x activation bits x weight bits, with ``exclude``'s nodes kept float.
    The draws' calibrations, the configurations' quantizations and their logits are independent
    work for ``executor``; the results are then gathered in sweep order."""

    from .quantize import CalibrationRanges, compute_ranges
    from .quantize.graph import quantized_tensors

    graph = steps.prepared_graph(prepared)
    given = None if cfg.calib_ranges is None else CalibrationRanges.load(cfg.calib_ranges).check_fits(
        graph, cfg.act_bits if cfg.repeats == 1 else (), exclude)
    if given is None:
        histograms = executor.map(steps.calibrate, [(cache, prepared, model.input_name, images.calib, model.preprocess,
                                                    batches.calib, cfg.progress, executor.task_threads(cfg), exclude)
                                                   for images in draws])
        binned = sum(not h.same_as for h in histograms[0].values())
        log(cfg, f"calibrated {binned} tensors, {len(histograms[0]) - binned} more given the next Relu/Clip's range "
                 f"as ORT does ({cfg.repeats} draw{'s' * (cfg.repeats > 1)}; {cfg.calib_method} ranges for every "
                 "precision)")
    plan = []  # (draw, ranges, spec) in sweep order
    for repeat, images in enumerate(draws):
        for bits in cfg.act_bits:
            ranges = given or compute_ranges(histograms[repeat], cfg.calib_method, bits, len(images.calib.labels))
            sweep.ranges.setdefault(bits, ranges)  # the first draw's, for a mixed-precision model
            plan += [(repeat, ranges, QuantSpec(w, bits, cfg.weight_scale, exclude)) for w in cfg.weight_bits]
    paths = executor.map(steps.quantize_config, [(cache, prepared, ranges, spec) for _, ranges, spec in plan])
    names = [spec.name + ("" if repeat == 0 else f"{REPEAT_MARK}{repeat}") for repeat, _, spec in plan]
    executor.warm_logits(cache, [config_job(cfg, model, name, path, draws[0].eval)
                                for name, path in zip(names, paths)], cfg)
    for (repeat, ranges, spec), name, path in zip(plan, names, paths):
        if spec.weight_bits == cfg.weight_bits[0]:  # which ranges the graph uses, beside the others
            ranges.save(work / f"calibration_ranges_a{spec.act_bits}{name[len(spec.name):]}.json",
                        quantized_tensors(path))
        add_config(cfg, model, name, path, draws[0].eval, batches, cache, sweep, repeat == 0, spec=spec)


def run(cfg: RunConfig, executor: Executor | None = None) -> Path:
    """Run the whole analysis of one model; returns the path of ``report.md``.

    The finished run folder replaces the old one in one rename; its ``cache/`` carries over. On
    an input error nothing new is left behind; after a crash or a kill only cache entries
    (whole files) stay, so the next run resumes. ``executor``: where the independent work runs
    (default: the one ``cfg`` asks for, closed after the run).
    """
    cfg = cfg.validate().resolved()  # every path absolute before any leaves this process (Ray workers)
    if executor is None:
        with closing(make_executor(cfg.check_timed())) as executor:
            return run(cfg, executor)
    out = cfg.out_dir
    with writing(out, RUN):
        dataset = steps.load_run_dataset(cfg)
        cache = Cache(out / "cache")
        works: list[Path] = []
        try:
            work = measure(cfg, dataset, cache, lambda: works.append(new_work_dir(out)) or works[-1], executor)
            write_marker(work, RUN)
            report_once([work], work, previous=out)
            swap_in(work, out)
        finally:  # a crash or a kill keeps the cache entries already written: the next run resumes
            for folder in works:
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
    log_recommendation(cfg, out)
    log(cfg, f"cache: {cache.hits} reused, {cache.misses} computed")
    return out / "report.md"


def run_models(cfg: RunConfig, models: list[str]) -> Path:
    """Several models, each in ``out/<model>``, and one report comparing them in ``out``."""
    cfg.validate().check_timed()
    with closing(make_executor(cfg)) as executor:
        return _run_models(cfg, models, executor)


def _run_models(cfg: RunConfig, models: list[str], executor: Executor) -> Path:
    if len(models) == 1:
        return run(replace(cfg, model=models[0]), executor)
    stems = [Path(m).stem for m in models]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise UserError(f"several models are named {', '.join(twice)}: each model's run folder is its name; "
                        "rename a copy or run them separately")
    out = (cfg.out if cfg.out is not None else Path("ptqcal_runs") / "_vs_".join(stems)).absolute()
    for stem in stems:
        check_target(out / stem, (RUN,))
    with writing(out, COMPARISON, stems):
        configs = [replace(cfg, model=model, out=out / stem) for model, stem in zip(models, stems)]
        if executor.side_by_side:
            # all models' tasks at once, untimed (no timing amid other tasks; a latency-capped search meets
            # nothing); then each model alone, timed, the rest read from its cache
            log(cfg, f"{len(configs)} models side by side on the cluster")
            with ThreadPoolExecutor(len(configs)) as pool:
                list(pool.map(lambda c: run(replace(c, timing=False, quiet=True), executor), configs))
        folders = [run(c, executor).parent for c in configs]
        return report_once(folders, out, previous=out)
