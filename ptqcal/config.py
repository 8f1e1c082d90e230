"""The settings of one ``ptqcal run``: each field's default, help and parsing in one place.

The command line (:mod:`ptqcal.cli`) and config files are generated from the field metadata of
:class:`RunConfig`, so a default or a choice is written once, here, or in the stage that owns it
(calibration methods and weight-scale conventions are the quantize stage's enums).
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .analysis.recommend import ALLOW_SLOWER, MAX_CONFIDENT_SWAPPED, MAX_DELTA_ERROR, ORDER, ORDERS
from .errors import InputError, UserError
from .parsing import parse_bytes, parse_guard_target, percent
from .data import DEFAULT_CALIB_SIZE, DEFAULT_SEARCH_SIZE
from .data.corrupt import CORRUPTION_SETS, SEVERITIES, Corruption, corruptions
from .evaluate.results import Execution
from .models.preprocess import LAYOUTS, PRESETS
from .models.weights import RANDOM_WEIGHTS
from .quantize.ranges import CalibMethod
from .quantize.spec import QuantSpec, WeightScale

SHIPPED_CONFIGS = Path(str(resources.files("ptqcal.configs")))  # configs/ installed as ptqcal.configs
DEFAULT_MODELS = ("digits_resnet8", "digits_resnet8_ls")  # plain and label-smoothed training
PRECISIONS = ("fp16",)
# ONNX Runtime's thread pools take what they are given: 100,000 threads exhaust the memory before the
# first batch. A thread count beyond this is a typo, not a machine (the cap is the same on every machine,
# so a config file means the same everywhere, and a cluster's nodes may have more cores than this one).
MAX_THREADS = 1024
MAX_REPEATS = 1000  # calibration draws: each is a full calibration and a sweep


def default_cache_dir() -> Path:
    """``$PTQCAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/ptqcal``, else ``~/.cache/ptqcal``."""
    if os.environ.get("PTQCAL_CACHE_DIR"):
        return Path(os.environ["PTQCAL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptqcal"


CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def _setting(default: Any, help: str, parse: Callable[[str], Any] | type | None = None, *, many: bool = False,
             metavar: str | None = None, flag: str | None = None, **extra) -> Any:
    """A RunConfig field: its default, its help, how one value is parsed (``many``: a list)."""
    metadata = {"help": help, "parse": parse, "many": many, "metavar": metavar, "flag": flag, **extra}
    if callable(default) and not isinstance(default, (type, Enum)):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything one ``ptqcal run`` of one model needs; ``validate`` checks it."""

    model: str = _setting(DEFAULT_MODELS[0], "registry names (see 'ptqcal models') or .onnx classifiers; several "
                          "are compared in one report",
                          str, many=True, metavar="NAME|FILE.onnx")
    weights: Path | None = _setting(None, "state dict (.pth) for a registry model ('random': untrained)", Path)
    dataset: str | None = _setting(None, "digits, cifar100, cifar10, imagenet, folder, csv, npz, or FILE.npz "
                                   "(default: the model's own dataset)", str)
    data_dir: Path | None = _setting(None, "the dataset's folder or file ($PTQCAL_CIFAR100_DIR, "
                                     "$PTQCAL_IMAGENET_DIR)", Path)
    labels: Path | None = _setting(None, "labels file for a flat ImageNet val folder", Path)
    calib_data: Path | None = _setting(None, "a separate calibration pool, of the same kind as --dataset "
                                       "(default: the dataset's train split, or images held out of evaluation)", Path)
    download: bool = _setting(False, "download CIFAR with torchvision (online only)")
    strict: bool = _setting(False, "stop at an image that fails to decode (default: skip it, warn, and count it "
                            "in the report)")
    eval_size: int | None = _setting(None, "evaluate a seeded subset of N images", int, metavar="N")
    weight_bits: tuple[int, ...] = _setting((8, 7, 6, 5, 4), "weight bit widths to sweep, 2..8 (per-channel "
                                            "symmetric; 2 packed INT2, 3 and 4 packed INT4, 5..8 int8 containers)", int, many=True,
                                            metavar="B")
    act_bits: tuple[int, ...] = _setting((8,), "activation bit widths, 2..8 (per-tensor asymmetric); several "
                                         "sweep activations too", int, many=True, metavar="B")
    precisions: tuple[str, ...] = _setting((), "extra precisions: fp16 adds the float16 graph (float32 "
                                           "inputs/outputs)", str, many=True, choices=PRECISIONS)
    weight_scale: WeightScale = _setting(WeightScale.TORCH, "per-channel scale: PyTorch's max|w|/((qmax-qmin)/2) "
                                         "or ORT's max|w|/qmax", WeightScale)
    skip_first_layer: bool = _setting(False, "keep the first Conv/Gemm in float")
    skip_last_layer: bool = _setting(False, "keep the last Conv/Gemm/MatMul in float")
    exclude: tuple[str, ...] = _setting((), "ONNX node names to keep in float", str, many=True, metavar="NODE")
    quantized: tuple[str, ...] = _setting((), "your own quantized graphs of the model (from NNCF/OpenVINO, ORT, "
                                          "Olive, QAT, a float16 copy...), each evaluated against the float model "
                                          "like the built-in configurations, named NAME or after the file", str,
                                          many=True, metavar="[NAME=]FILE.onnx")
    also: tuple[str, ...] = _setting((), "other toolchains' quantizations on the run's calibration images: ort-qdq, "
                                     "ort-qop, nbits-rtn-b32, nbits-rtn-b128, nbits-hqq-b32, nbits-hqq-b128, nncf, "
                                     "nncf-fbc", str, many=True, metavar="PEER")
    execution: Execution = _setting(Execution.DEPLOYED, "deployed: ORT fuses Q/DQ into integer kernels "
                                    "(QLinearConv); simulated: float ops between Q/DQ. Both are compared on a "
                                    "subset in the report", Execution)
    calib_size: int | None = _setting(None, f"calibration images, drawn with --seed from the calibration pool "
                                      f"(default: {DEFAULT_CALIB_SIZE}, or the whole pool when it is smaller)", int,
                                      metavar="N")
    calib_method: CalibMethod = _setting(CalibMethod.MSE, "activation range: min/max, the L2 search of PyTorch's "
                                         "HistogramObserver, a percentile, or KL entropy", CalibMethod)
    calib_ranges: Path | None = _setting(None, "reuse the activation ranges a run saved "
                                         "(calibration_ranges_a8.json) instead of calibrating", Path,
                                         metavar="FILE.json")
    batch_size: int = _setting(256, "largest evaluation batch (smaller when --max-memory says so)", int)
    max_memory: int = _setting(parse_bytes("1G"), "memory for a batch's activations and the images prepared ahead "
                               "(e.g. 1G, 512M): the evaluation and calibration batches are chosen from the "
                               "model's activation sizes to fit it", parse_bytes, metavar="SIZE", shown="1G")
    attribute: bool = _setting(False, "attribute the swaps to layers: each weight layer quantized alone at each "
                               "weight bit width (layers.csv and a report note)")
    attribution_size: int | None = _setting(None, f"seeded evaluation images the attribution measures on (default: "
                                            f"{DEFAULT_SEARCH_SIZE}, or fewer when the data has fewer to spare); "
                                            "with a mixed-precision target they are held out of evaluation", int,
                                            metavar="N")
    max_confident_swaps: float | None = _setting(None, "add 'mixed': per-layer weight bits (from --weight-bits) "
                                                 "with the fewest weight bytes that swap at most P percent of the "
                                                 "confident float predictions", percent, metavar="P")
    max_size_ratio: float | None = _setting(None, "add 'mixed': per-layer weight bits (from --weight-bits) with "
                                            "weights at most R x float's bytes, swapping the fewest confident "
                                            "predictions", float, metavar="R")
    ship_objective: str = _setting(ORDER, "what the report recommends shipping: the smallest configuration within "
                                   "the --ship-max-* thresholds (then the fastest on this CPU), or the fastest (then "
                                   "the smallest)", str, choices=ORDERS)
    ship_max_delta_error: float = _setting(MAX_DELTA_ERROR, "the recommended configuration's top-1 error is at most "
                                           "PP percentage points above float's", percent, metavar="PP",
                                           shown=f"{100 * MAX_DELTA_ERROR:g}")
    ship_max_confident_swapped: float = _setting(MAX_CONFIDENT_SWAPPED, "the recommended configuration swaps at most "
                                                 "P percent of the float model's confident (>= 90 percent) predictions",
                                                 percent, metavar="P", shown=f"{100 * MAX_CONFIDENT_SWAPPED:g}")
    ship_allow_slower: bool = _setting(ALLOW_SLOWER, "the recommendation may be a configuration slower than float on "
                                       "this CPU (by default it must not be)")
    guard_target: tuple[str, float] = _setting(("max_differing", 0.001), "the float fallback guard's target: "
                                               "differ=P (at most P percent of predictions differ from the float "
                                               "model's once the least confident go to it) or route=P (at most P "
                                               "percent go to it); its threshold is chosen on images the evaluation "
                                               "never sees", parse_guard_target, metavar="differ=P|route=P",
                                               shown="differ=0.1")
    mixed_max_delta_error: float | None = _setting(None, "with a mixed-precision target: the chosen model's top-1 "
                                                   "error at most PP percentage points above float's on the held-out "
                                                   "images too", percent, metavar="PP")
    corruptions: tuple[str, ...] = _setting((), "also evaluate every configuration, the float model included, on the "
                                            "evaluation images under these ImageNet-C corruptions (Hendrycks & "
                                            "Dietterich's reference implementation: pip install 'ptqcal[shift]'): "
                                            f"names, or the sets {', '.join(CORRUPTION_SETS)}", str, many=True,
                                            metavar="NAME")
    severities: tuple[int, ...] = _setting(SEVERITIES, "the severities, 1..5, of every corruption", int, many=True,
                                           metavar="S", shown=" ".join(map(str, SEVERITIES)))
    calib_corruption: str | None = _setting(None, "also calibrate every swept configuration on the calibration "
                                            "images under this corruption (NAME@S, e.g. gaussian_noise@3), each "
                                            "named aXwY-cal-NAME-sS and evaluated beside its clean-calibrated twin "
                                            "(calibrated even when --calib-ranges gives the clean ranges)",
                                            str, metavar="NAME@S")
    mixed_max_latency_ratio: float | None = _setting(None, "with a mixed-precision target: the chosen model's "
                                                     "batch-1 latency at most R x the float model's on this CPU "
                                                     "(each model the search tries is timed)", float, metavar="R")
    check_images: int = _setting(64, "images on which the deployed and simulated paths are compared (0: no check)",
                                 int, metavar="N")
    out: Path | None = _setting(None, "run folder (default: ptqcal_runs/<model>)", Path)
    seed: int = _setting(0, "seed of the calibration draw", int)
    repeats: int = _setting(1, "re-draw the calibration images K times (seeds S..S+K-1): mean ± std and bands",
                            int, metavar="K")
    cache_dir: Path = _setting(default_cache_dir, "where trained built-in models are cached ($PTQCAL_CACHE_DIR)",
                               Path)
    preprocess: str | None = _setting(None, "named preprocessing of an .onnx model (imagenet, inception, tf, "
                                      "cifar100, digits, unit: x/255, none: raw pixels); without it, the model's "
                                      "own metadata or --mean and --std", str, choices=tuple(PRESETS))
    mean: tuple[float, ...] | None = _setting(None, "per-channel mean on [0,1] pixels, for an .onnx model", float,
                                              many=True, metavar="M[,M,...]", comma=True)
    std: tuple[float, ...] | None = _setting(None, "per-channel std on [0,1] pixels, for an .onnx model", float,
                                             many=True, metavar="S[,S,...]", comma=True)
    pixel_max: float | None = _setting(None, "raw pixel value that maps to 1.0, for an .onnx model", float)
    input_size: tuple[int, ...] | None = _setting(None, "H[,W]: the image size of an .onnx model whose graph "
                                                  "leaves height and width open", int, many=True,
                                                  metavar="H[,W]", comma=True)
    resize: int | None = _setting(None, "short side before the centre crop, for an .onnx model (0: resize "
                                  "straight to the input size)", int)
    layout: str | None = _setting(None, "NCHW or NHWC, for an .onnx model whose input shape does not tell (read "
                                  "from the graph otherwise)", str, choices=LAYOUTS)
    progress: bool = _setting(True, "hide progress bars (shown only on a terminal; TQDM_DISABLE=1 hides them too)",
                              flag="--no-progress", in_file=False)
    provider: str = _setting("CPU", "ONNX Runtime execution provider that evaluates every model (calibration "
                             "runs on CPU)", str)
    quiet: bool = _setting(False, "print nothing but errors and the report's path", in_file=False)
    ray: str | None = _setting(None, "run the independent work as Ray tasks: on the cluster at ADDRESS (auto, "
                               "host:port), or without one on a Ray started on this machine for the run; the run "
                               "folder and the images must be on storage every node sees", str, metavar="ADDRESS",
                               const="local", in_file=True)
    threads: int = _setting(0, "ONNX Runtime's intra-op threads for every session (0: its default, one per "
                            "physical core); the report's speeds say which", int, metavar="N")
    timing: bool = _setting(True, "skip measuring each configuration's latency and throughput (sizes are still "
                            "reported)", flag="--no-timing")

    @property
    def is_onnx_file(self) -> bool:
        return self.model.endswith(".onnx")

    @property
    def model_name(self) -> str:
        return Path(self.model).stem if self.is_onnx_file else self.model

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("ptqcal_runs") / self.model_name

    @property
    def fp16(self) -> bool:
        return "fp16" in self.precisions

    @property
    def cells(self) -> tuple[Corruption, ...]:
        """Every corruption at every severity the evaluation images are also evaluated under."""
        return corruptions(self.corruptions, self.severities) if self.corruptions else ()

    @property
    def calibration_corruption(self) -> Corruption | None:
        return None if self.calib_corruption is None else Corruption.from_key(self.calib_corruption)

    @property
    def mixed(self) -> bool:
        """A mixed-precision configuration is searched for (on images held out of evaluation)."""
        return self.max_confident_swaps is not None or self.max_size_ratio is not None

    def validate(self) -> "RunConfig":
        """Raise :class:`UserError` (naming the flag) for settings that cannot work together."""
        for name, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if not bits:
                raise UserError(f"{flag_of(name)}: give at least one bit width")
            if len(set(bits)) != len(bits):
                raise UserError(f"{flag_of(name)}: repeated bit width in {list(bits)}")
        for weight_bits in self.weight_bits:  # every configuration of the sweep must be one a stage can build
            for act_bits in self.act_bits:
                QuantSpec(weight_bits, act_bits, self.weight_scale).validate()
        for name, least in (("repeats", 1), ("calib_size", 1), ("batch_size", 1), ("eval_size", 2), ("seed", 0),
                            ("check_images", 0), ("max_memory", 1 << 20), ("threads", 0), ("attribution_size", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise UserError(f"{flag_of(name)} must be at least {least}, got {value}")
        for name, most in (("threads", MAX_THREADS), ("repeats", MAX_REPEATS)):
            if getattr(self, name) > most:
                raise UserError(f"{flag_of(name)} must be at most {most}, got {getattr(self, name)}")
        if self.ray is not None:
            _check_ray_address(self.ray)
        given = [flag_of(name) for name in ("preprocess", "mean", "std", "pixel_max", "resize", "input_size",
                                                "layout")
                 if getattr(self, name) is not None]
        if given and not self.is_onnx_file:
            raise UserError(f"{', '.join(given)}: for .onnx models; a registry model carries its own preprocessing")
        if self.weights is not None and self.is_onnx_file:
            raise UserError("--weights is for registry models; an .onnx file carries its own weights")
        if self.input_size is not None and (len(self.input_size) not in (1, 2) or min(self.input_size) < 1):
            raise UserError(f"--input-size takes H or H,W (positive), got {list(self.input_size)}")
        self._check_mixed()
        if self.dataset is not None and self.dataset.endswith(".npz") and self.data_dir is not None:
            raise UserError(f"--dataset {self.dataset} names the .npz file; --data-dir {self.data_dir} would name "
                            "another: give one (--dataset npz --data-dir FILE.npz is the same)")
        if self.calib_ranges is not None and self.calib_ranges.exists() and not self.calib_ranges.is_file():
            raise UserError(f"--calib-ranges {self.calib_ranges}: not a regular file")  # a pipe would block forever
        if self.calib_ranges is not None and self.repeats > 1:
            raise UserError("--calib-ranges reuses one calibration: drop --repeats")
        self.extra_configs()  # names and files checked before any work
        self._check_corruptions()
        return self

    def _check_mixed(self) -> None:
        """A mixed-precision target and its caps, checked before any work."""
        if self.max_confident_swaps is not None and self.max_size_ratio is not None:
            raise UserError("--max-confident-swaps and --max-size-ratio are two targets: give one")
        if self.max_size_ratio is not None and not 0 < self.max_size_ratio <= 1:
            raise UserError(f"--max-size-ratio is a fraction of float's weight bytes in (0, 1], got {self.max_size_ratio}")
        if self.mixed_max_delta_error is not None and not self.mixed:
            raise UserError("--mixed-max-delta-error caps a mixed-precision search: give --max-confident-swaps or "
                            "--max-size-ratio too")
        if self.mixed_max_latency_ratio is not None and not (self.mixed and self.mixed_max_latency_ratio > 0):
            raise UserError("--mixed-max-latency-ratio caps a mixed-precision search by timing each model it tries: "
                            "give --max-confident-swaps or --max-size-ratio too, and a ratio above 0")
        if self.mixed and len(self.weight_bits) < 2:
            raise UserError("a mixed-precision target chooses among the run's weight bit widths: give at least two "
                            "to --weight-bits (e.g. 8 4)")

    def check_timed(self) -> "RunConfig":
        """A latency cap needs timings: one line for ``--no-timing`` beside it. (Not part of
        :meth:`validate`: a pass that times nothing on purpose, several models side by side on a
        cluster, leaves the capped search unmet and its timed pass searches again.)"""
        if self.mixed_max_latency_ratio is not None and not self.timing:
            raise UserError("--mixed-max-latency-ratio times each model the search tries: drop --no-timing")
        return self

    def _check_corruptions(self) -> None:
        """Corruption names and severities, checked before any work."""
        if not self.severities:
            raise UserError("--severities: give at least one severity")
        self.cells  # noqa: B018 - resolving them checks them
        try:
            self.calibration_corruption  # noqa: B018
        except InputError as exc:  # the corruption's own message names --corruptions or --severities
            raise UserError(f"--calib-corruption {self.calib_corruption}: {exc}") from None

    def resolved(self) -> "RunConfig":
        """The same settings with every path made absolute from this process's working directory, so
        that a Ray worker started elsewhere, or a later step, reads the same files (names stay literal:
        symbolic links are not followed)."""
        def absolute(path: Path | None) -> Path | None:
            return path if path is None or path == RANDOM_WEIGHTS else Path(path).absolute()

        def graph(item: str) -> str:
            name, equals, file = item.partition("=")
            return f"{name}={Path(file).absolute()}" if equals and not Path(item).is_file() else str(Path(item).absolute())

        paths = {name: absolute(getattr(self, name)) for name in ("weights", "data_dir", "labels", "calib_data",
                                                                   "calib_ranges", "cache_dir")}
        return replace(self, **paths, out=self.out_dir.absolute(),
                       model=str(Path(self.model).absolute()) if self.is_onnx_file else self.model,
                       dataset=str(Path(self.dataset).absolute()) if self.dataset and self.dataset.endswith(".npz")
                       else self.dataset, quantized=tuple(graph(item) for item in self.quantized))

    def extra_configs(self) -> dict[str, Path | str]:
        """The configurations beside the sweep: ``--quantized`` files by name (``NAME=FILE`` or the
        file's stem) and ``--also`` peers by their own names, each name once and none a built-in's."""
        named: dict[str, Path | str] = {}
        for item in self.quantized:
            name, equals, file = item.partition("=")
            if not equals or Path(item).is_file():  # a file whose own name holds '=' is a file
                name, file = Path(item).stem, item
            if not Path(file).is_file():
                raise UserError(f"--quantized {item}: no such file")
            named[self._new_name(name, named, "--quantized")] = Path(file)
        for peer in self.also:
            named[self._new_name(peer, named, "--also")] = peer
        return named

    def _new_name(self, name: str, named: dict, flag: str) -> str:
        builtin = {"float", "fp16", "mixed"} | {f"a{a}w{w}" for a in self.act_bits for w in self.weight_bits}
        if not CONFIG_NAME.fullmatch(name) or name in builtin or name in named:
            raise UserError(f"{flag} {name!r}: a configuration name of letters, digits, '.', '_', '+' or '-' that is "
                            "not float, fp16, mixed, a swept aXwY or another configuration's")
        return name

    def to_dict(self) -> dict:
        """The settings as JSON values (paths and enums as strings)."""
        return {key: (str(value) if isinstance(value, Path) else value.value if isinstance(value, Enum) else value)
                for key, value in asdict(self).items()}


def _check_ray_address(address: str) -> None:
    """A ``host:port`` address must name a port that can exist (the cluster module says the rest)."""
    host, colon, port = address.rpartition(":")
    if colon and port.isdigit() and not (port.isascii() and 0 < int(port) < 1 << 16):
        raise UserError(f"--ray {address}: the port must be from 1 to 65535")


def settings() -> list:
    """The dataclass fields of :class:`RunConfig`, each with its metadata."""
    return list(fields(RunConfig))


def default_of(setting) -> Any:
    return setting.default_factory() if setting.default is MISSING else setting.default


def flag_of(name: str) -> str:
    """The command-line flag of setting ``name`` (``calib_size`` -> ``--calib-size``)."""
    setting = RunConfig.__dataclass_fields__[name]
    return setting.metadata.get("flag") or "--" + name.replace("_", "-")


def parse_value(setting, value: Any, where: str) -> Any:
    """One setting's value from the command line (strings) or a config file (TOML values), typed
    as the field is; :class:`UserError` naming ``where`` when it does not parse."""
    meta = setting.metadata
    parse = meta.get("parse")
    if parse is None:  # a switch
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if meta.get("many"):
        items = value if isinstance(value, (list, tuple)) else \
            (str(value).split(",") if meta.get("comma") else [value])
        return tuple(_parse_one(parse, item, where, meta.get("choices")) for item in items)
    return _parse_one(parse, value, where, meta.get("choices"))


def _parse_one(parse, value: Any, where: str, choices) -> Any:
    if isinstance(value, bool):  # a switch's value: bool is an int (and 1.0) to Python, never a number here
        raise UserError(f"{where}: expected a value, got {str(value).lower()} (this setting is not a switch)")
    try:
        if parse is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        result = parse(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError) as exc:
        options = [e.value for e in parse] if isinstance(parse, type) and issubclass(parse, Enum) else None
        hint = f" (choose {', '.join(options)})" if options else ""
        raise UserError(f"{where}: invalid value {value!r}{hint}") from exc
    if choices and result not in choices:
        raise UserError(f"{where}: invalid value {value!r} (choose {', '.join(choices)})")
    return result


def read_config_file(path: Path) -> dict:
    """Settings from a TOML file whose keys are ``ptqcal run``'s options (``weight-bits`` or
    ``weight_bits``), typed. ``$VARS`` in strings are expanded; a setting whose variable is not
    set is left out, so the command line (or the error for a missing path) decides."""
    import tomllib

    path = Path(path)
    if not path.is_file() and path.suffix == "" and (SHIPPED_CONFIGS / f"{path}.toml").is_file():
        path = SHIPPED_CONFIGS / f"{path}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.toml")))
        raise UserError(f"config file not found: {path} (shipped configs: {shipped})")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or table
        raise UserError(f"{path} nests arrays or tables too deeply to be a ptqcal config") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    known = {s.name: s for s in settings() if s.metadata.get("in_file", True)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"{path}: unknown setting {key!r}")
        if isinstance(value, str):
            value = os.path.expandvars(value)
            if "$" in value:  # an unset variable: leave the setting to the command line
                continue
        values[name] = parse_value(known[name], value, f"{path}: {key}")
    return values
