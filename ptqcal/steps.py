"""The named steps of a run, each composing stages and cached under the key of its inputs.

``ptqcal run`` (:mod:`ptqcal.pipeline`), ``compare-torch`` and later features call these steps
instead of repeating them. Every step takes typed inputs and a :class:`~ptqcal.cache.Cache` and
returns a typed result; a step whose inputs did not change costs one file lookup.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .cache import Cache, array_digest, file_digest, make_key
from .config import RunConfig
from .data import Dataset, decode_images, load_dataset, select
from .errors import UserError
from .versions import package_version, versions
from .models import PreprocessCfg, PreprocessOverrides, get_model_entry, inspect_onnx, onnx_preprocess, without_softmax
from .export import INPUT_NAME
from .models.preprocess import METADATA_KEY
from .data.pixels import Pixels

KEYED = ("onnxruntime", "onnx")  # the packages whose versions are part of every cache key
EXPORT_CHECK_IMAGES = 16  # evaluation images the exported graph is checked on against PyTorch


@dataclass(frozen=True)
class PreparedModel:
    """The float ONNX model a run evaluates as its reference, with how to feed it."""

    name: str
    float_path: Path
    preprocess: PreprocessCfg
    num_classes: int
    input_name: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Images:
    """One calibration draw and the evaluation images as the model's pixels (uint8 or float, not
    yet normalised), streamed: decoded chunk by chunk when read."""

    calib: Pixels
    eval: Pixels
    held_out_from_eval: bool  # calibration images came out of the evaluation split
    calib_note: str | None = None  # how a default calibration size was adapted to the data
    search: Pixels | None = None  # held out of the evaluation split for the mixed-precision search
    search_note: str | None = None

    @property
    def failed(self) -> tuple[Path, ...]:
        """Undecodable files that were skipped (known once every image was read)."""
        return self.calib.failed + self.eval.failed


@dataclass(frozen=True)
class Batches:
    """The batch sizes a run evaluates, checks the simulated path and calibrates with, chosen to fit
    its memory budget."""

    eval: int
    check: int
    calib: int
    note: str


def load_run_dataset(cfg: RunConfig) -> Dataset:
    """The dataset a run evaluates, with ``calib_data`` as its calibration pool when given."""
    if cfg.dataset is None and cfg.is_onnx_file:
        raise UserError(f"which images should {cfg.model_name} be evaluated on? give --dataset (and --data-dir)")
    kind = cfg.dataset or get_model_entry(cfg.model).default_dataset
    dataset = load_dataset(kind, cfg.data_dir, cfg.labels, cfg.download)
    if cfg.calib_data is None:
        return dataset
    pool = load_dataset(kind, cfg.calib_data, cfg.labels)
    return replace(dataset, calib_pool=pool.calib_pool if pool.calib_pool is not None else pool.eval)


def prepare_model(cfg: RunConfig, dataset: Dataset, cache: Cache) -> PreparedModel:
    """A user's ``.onnx`` file as it is (without a final Softmax), or a registry model exported
    with BatchNorm folded and checked against PyTorch (cached under the digest of its weights)."""
    if not cfg.is_onnx_file:
        return _export_registry_model(cfg, dataset, cache)
    info = inspect_onnx(cfg.model)
    path, notes = info.path, ()
    if info.external_data:  # one self-contained file: ORT's pre-processing copies the model alone
        import onnx

        key = make_key(file_digest(path), [file_digest(f) for f in info.external_data], versions(KEYED))
        path = cache.file("inline-graph", key, "onnx", lambda tmp: onnx.save(onnx.load(str(info.path)), str(tmp)))
    if info.ends_in_softmax:
        source = path
        path = cache.file("logits-graph", make_key(file_digest(source), versions(KEYED)), "onnx",
                          lambda tmp: without_softmax(source, tmp))
        notes = ("The model ends in Softmax; its last Softmax was removed so that every configuration is "
                 "evaluated (and quantized) on its logits.",)
    given = PreprocessOverrides(cfg.mean, cfg.std, cfg.pixel_max, cfg.resize, cfg.input_size, cfg.layout)
    preprocess = onnx_preprocess(info, given, cfg.preprocess)
    return PreparedModel(cfg.model_name, path, preprocess, info.num_classes, info.input_name, notes)


def _export_registry_model(cfg: RunConfig, dataset: Dataset, cache: Cache) -> PreparedModel:
    entry = get_model_entry(cfg.model)
    if cfg.cells or cfg.calib_corruption:  # images a corruption cannot take: one line before the export
        from .data.corrupt import check_corruptible

        check_corruptible(entry.preprocess.input_size, None if dataset.eval.is_files else dataset.eval.images.dtype)
    train = None if dataset.train is None else make_key(array_digest(dataset.train.images),
                                                        array_digest(dataset.train.labels))
    key = make_key("export", entry.name, entry.weights_recipe(cfg.weights, train), versions(KEYED),
                   package_version("torch"))

    def export(folder: Path) -> None:  # the model and its check are one entry: a kill keeps both or neither
        # in a child process: PyTorch is loaded for the export only, and the run's process, which
        # then streams the images through ONNX Runtime, never holds it (about 0.6 GB)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            child.submit(export_registry_model, cfg, dataset, folder).result()

    folder = cache.folder("float", key, export)
    check = json.loads((folder / "check.json").read_text())
    note = (f"Exported to ONNX with BatchNorm folded; max |logit difference| vs PyTorch on {check['num_checked']} "
            f"evaluation images: {check['max_abs_diff']:.2e}.")
    return PreparedModel(entry.name, folder / "model.onnx", entry.preprocess, entry.num_classes, INPUT_NAME, (note,))


def export_registry_model(cfg: RunConfig, dataset: Dataset, folder: Path) -> None:
    """Build the registry model ``cfg`` names (trained or loaded), export it to ``folder/model.onnx``
    with BatchNorm folded and write how far ONNX Runtime's logits are from PyTorch's on a few
    evaluation images (``check.json``)."""
    entry = get_model_entry(cfg.model)
    try:
        from .export import export_onnx
    except ImportError as exc:
        raise UserError(f"model {cfg.model!r} is a PyTorch model: pip install 'ptqcal[torch]', "
                        "or pass an .onnx file") from exc
    module = entry.build(cfg.weights, dataset.train, cfg.cache_dir)
    sample, _ = decode_images(dataset.eval.take(np.arange(min(EXPORT_CHECK_IMAGES, len(dataset.eval)))),
                              entry.preprocess.input_size, entry.preprocess.resize, entry.preprocess.interpolation)
    result = export_onnx(module, normalise(entry.preprocess, sample.images), folder / "model.onnx",
                         metadata={METADATA_KEY: entry.preprocess.to_metadata()})
    (folder / "check.json").write_text(json.dumps({"max_abs_diff": result.max_abs_diff,
                                                   "num_checked": result.num_checked}, allow_nan=False))


def check_labels(dataset: Dataset, num_classes: int) -> None:
    """Every label of the evaluation and calibration images must be one of the model's classes."""
    for split in (dataset.calib_pool, dataset.eval):
        if split is not None and len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            raise UserError(f"dataset {dataset.name!r} has labels outside the model's {num_classes} classes "
                            f"(found {split.labels.min()}..{split.labels.max()})")


def normalise(preprocess: PreprocessCfg, images: np.ndarray) -> np.ndarray:
    """Pixels to model input; a size that does not fit the model is the user's mistake."""
    try:
        return preprocess(images)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def draw_images(dataset: Dataset, cfg: RunConfig, preprocess: PreprocessCfg, cache: Cache | None,
                repeat: int = 0) -> Images:
    """Calibration draw ``repeat`` (seed + repeat) and the evaluation images, to be streamed (image
    files are decoded once, chunk by chunk, and cached: decoding is the slow part of an
    ImageNet-sized run)."""
    selection = select(dataset, cfg.calib_size, cfg.seed, cfg.eval_size, repeat, cfg.repeats,
                       search_size=cfg.attribution_size if cfg.mixed else False)
    search = None if selection.search is None else Pixels(selection.search, preprocess, cache, cfg.strict)
    return Images(Pixels(selection.calib, preprocess, cache, cfg.strict),
                  Pixels(selection.eval, preprocess, cache, cfg.strict), selection.held_out_from_eval,
                  selection.calib_note, search, selection.search_note)


def corrupt_chunk(cache: Cache, pixels: Pixels, index: int) -> None:
    """Chunk ``index`` of ``pixels`` (with a corruption) corrupted into the cache, as independent work:
    the pixels stay on disk, for every configuration to read."""
    del cache  # the pixels' own cache: the argument is the executors' convention
    if not pixels.is_cached(index):  # a re-run reads nothing
        pixels.chunk(index)


@functools.lru_cache(maxsize=2)
def prepared_graph(prepared: Path):
    """The prepared graph (no external data), loaded once per run for its readers (a cache entry never
    changes in place: the path names its content)."""
    import onnx

    return onnx.load(str(prepared), load_external_data=False)


def layers_kept_float(prepared: Path, cfg: RunConfig) -> tuple[str, ...]:
    """The nodes every quantized configuration of ``cfg`` keeps float (``--exclude``'s names, each
    checked to be a node, and the first or last weight layer when asked)."""

    from .quantize import layers_to_exclude

    graph = prepared_graph(prepared)
    return layers_to_exclude(graph, cfg.exclude, cfg.skip_first_layer, cfg.skip_last_layer)


def choose_batches(prepared: Path, preprocess: PreprocessCfg, cfg: RunConfig,
                   exclude: tuple[str, ...] = ()) -> Batches:
    """The batches :func:`ptqcal.evaluate.memory.plan_batches` fits into ``cfg.max_memory`` (up to
    ``cfg.batch_size``), from the graph's activation sizes (a calibration for quantizations that keep
    ``exclude``'s nodes float); a budget one image does not fit is the user's to change."""

    from .data.pixels import CHUNK_BYTES, PREFETCH
    from .evaluate.memory import activation_bytes, plan_batches, size_text
    from .quantize.graph import ranges_set_by_ort

    channels, height, width = preprocess.input_size
    shape = (1, channels, height, width) if preprocess.layout == "NCHW" else (1, height, width, channels)
    graph = prepared_graph(prepared)
    sizes = activation_bytes(prepared, shape, frozenset(ranges_set_by_ort(graph, exclude)))
    inputs = (PREFETCH + 2) * channels * height * width * np.dtype(preprocess.dtype).itemsize
    budget = max(1, cfg.max_memory - 2 * CHUNK_BYTES)  # a decoded chunk in use and one being decoded
    plan = plan_batches(sizes, inputs, budget, cfg.batch_size, cfg.execution == "deployed")
    if not plan.fits:
        raise UserError(f"--max-memory {size_text(cfg.max_memory)} cannot be met: one image of this model needs "
                        f"{size_text(sizes.peak)} of activations at their peak ({size_text(sizes.total)} all together) "
                        f"besides {size_text(2 * CHUNK_BYTES)} of decoded pixels; give a larger budget")
    note = (f"Batches of {plan.eval} (evaluation), {plan.check} (simulated-path check) and {plan.calib} (calibration) "
            f"images: per image the model's activations take {size_text(sizes.peak)} at their peak when it runs and "
            f"{size_text(sizes.total)} all together ({size_text(sizes.binned)} binned by calibration), within a memory "
            f"budget of {size_text(cfg.max_memory)}.")
    return Batches(plan.eval, plan.check, plan.calib, note)


@dataclass(frozen=True)
class LogitsJob:
    """The logits of one model on some pixels: what :func:`model_logits` computes and caches."""

    path: Path
    pixels: Pixels
    preprocess: PreprocessCfg | None
    desc: str
    fused: bool = True
    kind: str = "logits"

    def key(self, cfg: RunConfig, limit: int | None = None) -> str:
        extra = ([] if cfg.provider == "CPU" else [cfg.provider]) + ([] if limit is None else [limit])
        return make_key(file_digest(self.path), self.pixels.key, asdict(self.preprocess) if self.preprocess else None,
                        self.fused, cfg.batch_size, versions(KEYED), *extra)

    def compute(self, cfg: RunConfig, start: int = 0, count: int | None = None, progress: bool = True,
                timings: list[tuple[int, float]] | None = None) -> np.ndarray:
        """The logits of images ``start`` .. ``start + count`` (batches of ``cfg.batch_size`` from
        ``start``: a batch-aligned ``start`` gives the batches of the whole run); ``timings`` gets
        each batch's (images, seconds) of ``session.run``."""
        from .evaluate import make_session
        from .evaluate.runner import predict_batches

        total = len(self.pixels) - start if count is None else count
        session = make_session(self.path, fused=self.fused, provider=cfg.provider, threads=cfg.threads)
        return predict_batches(session, self.pixels.batches(cfg.batch_size, self.preprocess, count, start), total,
                               self.desc, cfg.progress and progress, timings)


def model_logits(cache: Cache, path: Path, pixels: Pixels, preprocess: PreprocessCfg | None, cfg: RunConfig,
                 desc: str, fused: bool = True, kind: str = "logits", limit: int | None = None) -> np.ndarray:
    """The logits of the model at ``path`` on ``pixels`` (the first ``limit`` images if given),
    normalised batch by batch with ``preprocess`` while the previous batch runs, on ORT's fused
    integer kernels or (``fused=False``) the simulated path."""
    from .evaluate.deploy import TIMING_FORMAT

    job = LogitsJob(path, pixels, preprocess, desc, fused, kind)
    count = None if limit is None else min(limit, len(pixels))
    key = job.key(cfg, limit)

    def compute() -> np.ndarray:
        timings: list[tuple[int, float]] = []
        logits = job.compute(cfg, count=count, timings=timings)
        if count is None and kind == "logits":  # each batch's (images, seconds): deployment() reads them
            cache.file("throughput", make_key(_speed_key(key, cfg), TIMING_FORMAT), "json",
                       lambda tmp: tmp.write_text(json.dumps(timings)))
        return logits

    return cache.array(kind, key, compute, check_logits)


def _speed_key(logits_key: str, cfg: RunConfig) -> str:
    """The key of an evaluation's speed: its logits' key (model, images, batch, provider), and the
    thread count, which changes the speed and not the logits."""
    return make_key(logits_key, cfg.threads)


def check_logits(logits: np.ndarray) -> None:
    """Only logits a report can use are stored: (N, classes) and finite."""
    if logits.ndim != 2:
        raise UserError(f"the model's output has shape {list(logits.shape)}, expected (N, classes)")
    if not np.isfinite(logits).all():
        raise UserError("the model's logits are NaN or infinite on these images: check the preprocessing "
                        "(--preprocess, --mean, --std, --pixel-max) and the images")


def first_seconds(cache: Cache, logits: dict[str, np.ndarray], seconds: float) -> float:
    """The wall time of the run that first computed these logits (a cached re-run reports that,
    not its own few seconds)."""
    key = make_key({name: array_digest(values) for name, values in logits.items()})
    path = cache.file("seconds", key, "json", lambda tmp: tmp.write_text(json.dumps(seconds)))
    return float(json.loads(path.read_text()))


def prepare_for_quantization(cache: Cache, float_path: Path) -> Path:
    """ORT's ``quant_pre_process`` of the float model (shape inference, graph optimisation)."""
    from .quantize import prepare

    from .evaluate.runner import make_session

    # a model ONNX Runtime cannot load is one line from the session factory, before quant_pre_process
    # logs its own traceback
    return cache.file("prepared", make_key(file_digest(float_path), versions(KEYED)), "onnx",
                      lambda tmp: (make_session(float_path), prepare(float_path, tmp)))


def calibrate(cache: Cache, prepared: Path, input_name: str, pixels: Pixels, preprocess: PreprocessCfg,
              batch_size: int, progress: bool, threads: int = 0, exclude: tuple[str, ...] = ()) -> dict:
    """Histograms of every activation of ``prepared`` over ``pixels`` (normalised batch by batch),
    in one pass, for quantizations that keep ``exclude``'s nodes float; every range method and
    activation bit width is computed from them."""
    from .quantize import BatchDataReader, collect_histograms, load_histograms, save_histograms
    from .quantize.calibrate import DEFAULT_BINS

    key = make_key(file_digest(prepared), pixels.key, asdict(preprocess), batch_size, DEFAULT_BINS, sorted(exclude),
                   versions(KEYED))

    def collect(tmp: Path) -> None:
        reader = BatchDataReader(input_name, lambda: pixels.batches(batch_size, preprocess),
                                 -(-len(pixels) // batch_size))
        save_histograms(collect_histograms(prepared, reader, DEFAULT_BINS, progress, threads, exclude), tmp)

    return load_histograms(cache.file("histograms", key, "npz", collect))


def quantize_config(cache: Cache, prepared: Path, ranges, spec) -> Path:
    """The QDQ model of ``spec`` (a :class:`~ptqcal.quantize.QuantSpec`) with ``ranges``."""
    from .quantize import quantize_qdq
    from .quantize.graph import op_types_to_quantize

    key = make_key(file_digest(prepared), ranges.ranges, asdict(spec), op_types_to_quantize(), versions(KEYED))
    return cache.file("quantized", key, "onnx", lambda tmp: quantize_qdq(prepared, tmp, ranges, spec))


def deployment(cache: Cache, path: Path, pixels: Pixels, preprocess: PreprocessCfg, cfg: RunConfig):
    """The size of the model at ``path`` and (unless ``cfg.timing`` is off) its latency and
    throughput on this machine (a :class:`~ptqcal.evaluate.deploy.Deployment`), measured once and
    cached: a re-run reports the first run's timings, as it reports its wall time. The throughput
    is that of the deployed path's evaluation on ``pixels`` when this process ran it and its full
    batches took long enough (:func:`~ptqcal.evaluate.deploy.evaluation_runs`), else of timed runs."""
    from .evaluate.deploy import TIMING_FORMAT, Deployment, evaluation_runs, measure_deployment

    key = make_key(file_digest(path), cfg.threads, cfg.batch_size, cfg.timing, cfg.provider, versions(KEYED),
                   TIMING_FORMAT)
    seen = make_key(_speed_key(LogitsJob(path, pixels, preprocess, "", fused=True).key(cfg), cfg), TIMING_FORMAT)

    def measure(tmp: Path) -> None:
        batch = preprocess(pixels.head(cfg.batch_size))
        timings = json.loads(cache.path("throughput", seen, "json").read_text()) \
            if cache.has("throughput", seen, "json") else []
        evaluation = evaluation_runs([(int(images), float(seconds)) for images, seconds in timings], len(batch))
        numbers = measure_deployment(path, batch, cfg.threads, cfg.provider, cfg.timing, evaluation)
        tmp.write_text(json.dumps(asdict(numbers)))

    return Deployment(**json.loads(cache.file("deployment", key, "json", measure).read_text()))


def attribution(cfg: RunConfig, preprocess: PreprocessCfg, prepared: Path, images: Images, cache: Cache,
                executor=None):
    """Which layers flip confident predictions (:func:`ptqcal.evaluate.attribution.attribute`), on
    the images held out for a search, or else on ``cfg.attribution_size`` images drawn with
    ``cfg.seed`` from the evaluation images; every (layer, bits) result is cached, and with an
    ``executor`` that runs work ahead (a cluster) each one is a task (:mod:`ptqcal.layer_work`)."""
    from .layer_work import AttributionWork, attribute

    work = AttributionWork.of(cfg, preprocess, prepared, images, cache, versions(KEYED))
    return attribute(cfg, work, cache, executor)


def mixed_search(cfg: RunConfig, cache: Cache, prepared: Path, ranges, exclude: tuple[str, ...], pixels: Pixels,
                 preprocess: PreprocessCfg, attribution, executor=None, timed: tuple | None = None):
    """The mixed-precision search for ``cfg``'s target (:func:`ptqcal.evaluate.mixed.search`) on
    ``pixels`` (held out of evaluation), each model it measures quantized and run through the cache
    (with an ``executor`` that runs work ahead, as tasks: the quantizations side by side, the logits in
    shards); returns the choice and the spec of the chosen model (``None`` when no assignment meets it).
    ``timed``: (the evaluation's pixels, the float model's Deployment), for a latency cap: each model
    is timed as its evaluation would time it, and set against the float model the report shows."""
    from .evaluate.mixed import search
    from .quantize import QuantSpec
    from .quantize.graph import weight_sizes

    elements, float_bytes = weight_sizes(prepared)
    act_bits, widths, fused = max(cfg.act_bits), cfg.weight_bits, cfg.execution == "deployed"
    ahead = executor is not None and executor.runs_ahead

    def spec(layer_bits: dict[str, int]) -> QuantSpec:
        return QuantSpec(max(widths), act_bits, cfg.weight_scale, exclude, layer_bits=tuple(layer_bits.items()))

    def measure(layer_bits: dict[str, int]) -> np.ndarray:
        path = quantize_config(cache, prepared, ranges, spec(layer_bits))
        return model_logits(cache, path, pixels, preprocess, cfg, "mixed search", fused=fused, kind="search-logits")

    def measure_ahead(assignments: list[dict[str, int]]) -> None:  # the models the search measures next
        paths = executor.map(quantize_config, [(cache, prepared, ranges, spec(bits)) for bits in assignments])
        executor.warm_logits(cache, [LogitsJob(path, pixels, preprocess, "mixed search", fused, "search-logits")
                                     for path in paths], cfg)

    def latency(layer_bits: dict[str, int]) -> float:  # batch-1, over float's, each measured once and cached
        from .evaluate.deploy import latency_ratio

        path = quantize_config(cache, prepared, ranges, spec(layer_bits))
        ratio = latency_ratio(deployment(cache, path, timed[0], preprocess, cfg), timed[1])
        return float("nan") if ratio is None else ratio.value

    if executor is not None:  # (a local executor computes nothing ahead)
        executor.warm_logits(cache, [LogitsJob(prepared, pixels, preprocess, "float (search)", True, "search-logits")],
                             cfg)
    float_logits = model_logits(cache, prepared, pixels, preprocess, cfg, "float (search)", kind="search-logits")
    target, limit = ("max_confident_swaps", cfg.max_confident_swaps) if cfg.max_confident_swaps is not None \
        else ("max_size_ratio", cfg.max_size_ratio)
    quantized = {layer: count for layer, count in elements.items() if layer not in exclude}
    choice = search(target, limit, quantized, float_bytes, widths, act_bits, attribution, float_logits, measure,
                    pixels.labels, cfg.mixed_max_delta_error, measure_ahead if ahead else None,
                    cfg.mixed_max_latency_ratio, latency if timed is not None else None)
    return choice, spec(choice.layer_bits) if choice.met else None
