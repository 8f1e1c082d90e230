"""The saved run: what ``ptqcal run`` writes and ``ptqcal report`` reads (numpy and json only).

A run folder holds ``logits.npz`` (labels, the float model's logits on the evaluation and the
calibration images, and one array per configuration and calibration draw, e.g. ``a8w4`` and
``a8w4#r1``) and ``run.json`` (format version, model, settings, header lines, notes, and a
:class:`ConfigInfo` per configuration). One type writes and reads both, so no key is spelled twice.

What a configuration is (its kind and bit widths) is a field of the record, never parsed from its
name: a name is a label, and a user's or another toolchain's model can be called anything.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from ptqcal import __version__
from ptqcal.atomic import atomic_path
from ptqcal.errors import InputError

from .attribution import Attribution
from .deploy import Deployment
from .guard import GuardTarget
from .mixed import MixedChoice
from .results import REPEAT_MARK

# 1: the unversioned records of ptqcal 0.2; 2: no configuration descriptors; 3: a ConfigInfo per
# configuration; 4: logits under corruptions, and the calibration's corruption in ConfigInfo (a
# record of format 3 reads as one without). Records before 3 are refused, not read: their kinds and
# bit widths could only be guessed from the names.
FORMAT_VERSION = 4
DESCRIBED_SINCE = 3
RECORD_FILE = "run.json"
LOGITS_FILE = "logits.npz"
HELD_OUT = "held_out:"  # logits.npz key prefix of the held-out images' logits (no configuration name has a colon)
SHIFT = "shift:"  # logits.npz key prefix of logits under a corruption: shift:<name@severity>:<configuration>
CELL = re.compile(r"([a-z_]{1,40})@([1-5])")  # a corruption at a severity, as a record names it


class RunRecordError(InputError):
    """A folder that holds no readable ptqcal run."""


class ConfigKind(StrEnum):
    """What produced a configuration's logits."""

    FLOAT = "float"  # the float model: the reference every change is measured against
    FP16 = "fp16"  # the float model with float16 weights and activations
    UNIFORM = "uniform"  # ptqcal's QDQ model, one weight and one activation width for every layer
    MIXED = "mixed"  # ptqcal's QDQ model, weight widths chosen layer by layer
    EXTERNAL = "external"  # a graph the user brought (their toolchain's), evaluated as it is
    PEER = "peer"  # another toolchain's quantization of the run's model (ORT's quantize_static, NNCF, ...)


# The kinds whose bit widths are known without looking: integer widths for every layer, or none.
_HAS_BITS = {ConfigKind.FLOAT: False, ConfigKind.FP16: False, ConfigKind.UNIFORM: True, ConfigKind.MIXED: False,
             ConfigKind.EXTERNAL: False, ConfigKind.PEER: False}
MAX_BITS = 32  # wider than any integer format a classifier is quantized to; anything above is damage


def _bits(value: Any, what: str) -> int | None:
    # bool is an int to Python, and 8.0 or "8" would be a guess: only a JSON integer is a width
    if value is None or (type(value) is int and 1 <= value <= MAX_BITS):
        return value
    raise ValueError(f"{what} must be an integer from 1 to {MAX_BITS} or null, not {str(value)[:20]!r}")


@dataclass(frozen=True)
class ConfigInfo:
    """What one configuration of a run is.

    Attributes
    ----------
    name : str
        The configuration's name (the key of its logits; calibration draws ``a8w4#r1`` share
        ``a8w4``'s descriptor).
    kind : ConfigKind
    weight_bits, act_bits : int or None
        The integer width of every quantized layer's weights and activations, where one width holds
        for every layer (``uniform``); ``None`` where it does not (``mixed``) or nothing is integer.
    calibrated_on : str or None
        The corruption (``"fog@3"``) its activation ranges were calibrated under; ``None``: clean images.
    """

    name: str
    kind: ConfigKind
    weight_bits: int | None = None
    act_bits: int | None = None
    calibrated_on: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ConfigKind(self.kind))
        for what in ("weight_bits", "act_bits"):
            _bits(getattr(self, what), what)
        has_bits = (self.weight_bits is not None, self.act_bits is not None)
        wanted = _HAS_BITS.get(self.kind)
        if wanted is not None and has_bits != (wanted, wanted):
            raise ValueError(f"a {self.kind} configuration has {'both bit widths' if wanted else 'no bit widths'}")
        if self.calibrated_on is not None and (not isinstance(self.calibrated_on, str) or
                                               not CELL.fullmatch(self.calibrated_on)):
            raise ValueError(f"calibrated_on must be 'name@severity', not {str(self.calibrated_on)[:40]!r}")

    @property
    def uniform(self) -> bool:
        """One weight and one activation width for every layer."""
        return self.weight_bits is not None and self.act_bits is not None

    @property
    def swept(self) -> bool:
        """A step of the bit-width sweep: uniform, calibrated on the run's clean calibration images
        (a twin calibrated under a corruption is a variant of its step, not a step of its own)."""
        return self.uniform and self.calibrated_on is None

    def to_json(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                **({} if self.calibrated_on is None else {"calibrated_on": self.calibrated_on})}

    @classmethod
    def from_json(cls, name: str, value: Any) -> "ConfigInfo":
        """Strictly: the three keys (and ``calibrated_on`` when it was not clean), a known kind,
        integer or null widths (``ValueError``)."""
        keys = {"kind", "weight_bits", "act_bits"}
        if not isinstance(value, dict) or set(value) - {"calibrated_on"} != keys:
            raise ValueError("not an object of kind, weight_bits and act_bits")
        if not isinstance(value["kind"], str) or value["kind"] not in set(ConfigKind):
            raise ValueError(f"unknown kind {str(value['kind'])[:20]!r}")
        return cls(name, ConfigKind(value["kind"]), _bits(value["weight_bits"], "weight_bits"),
                   _bits(value["act_bits"], "act_bits"), value.get("calibrated_on"))


def base_name(config: str) -> str:
    """The configuration a calibration draw belongs to (``a8w4#r1`` -> ``a8w4``)."""
    return config.split(REPEAT_MARK)[0]


@dataclass
class RunRecord:
    """Everything one run measured.

    Attributes
    ----------
    model : str
        The model's name.
    labels : ndarray, shape (N,)
        Labels of the evaluation images.
    logits : dict of str to ndarray
        Configuration name (``"float"``, ``"a8w8"``, ``"a8w8#r1"``, in the order run) to its
        ``(N, classes)`` float32 logits.
    calib_labels, calib_float : ndarray
        Labels and the float model's logits on the calibration images (for temperature fits).
    summary : dict of str to str
        What the report's header says about the run (dataset, sizes, preprocessing, ...).
    notes : list of str
        Sentences the report lists under the run.
    settings : dict
        The run's configuration, as JSON.
    seconds : float
        Wall time of the run that computed it.
    deployment : dict of str to Deployment
        Configuration name to its size and speed on the machine that ran it.
    attribution : Attribution or None
        Each weight layer quantized alone (``run --attribute``).
    mixed : MixedChoice or None
        The mixed-precision search and what it chose (a target was given).
    descriptors : dict of str to ConfigInfo
        Configuration name (without draw suffix) to what it is. Empty by default: nothing is
        derived, and a record that leaves a configuration undescribed is refused when saved or
        analysed.
    held_out_labels, held_out_logits : ndarray, dict of str to ndarray
        Images the evaluation never sees (``held_out_source``: ``"calibration"`` or ``"search"``):
        their labels, and the float model's and each quantized configuration's (first draw) logits
        on them, where a float fallback guard's threshold is chosen.
    guard_target : dict or None
        The guard's target, as :class:`~ptqcal.evaluate.guard.GuardTarget`'s fields.
    shifted : dict of str to dict of str to ndarray
        Corruption at a severity (``"fog@3"``) to configuration name to its logits on the
        evaluation images under that corruption (the same images and labels; first draws only).
    """

    model: str
    labels: np.ndarray
    logits: dict[str, np.ndarray]
    calib_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    calib_float: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    deployment: dict[str, Deployment] = field(default_factory=dict)
    attribution: Attribution | None = None
    mixed: MixedChoice | None = None
    descriptors: dict[str, ConfigInfo] = field(default_factory=dict)
    held_out_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    held_out_logits: dict[str, np.ndarray] = field(default_factory=dict)
    held_out_source: str = ""
    guard_target: dict[str, float] | None = None
    shifted: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def configs(self) -> list[str]:
        return list(self.logits)

    def descriptor(self, config: str) -> ConfigInfo:
        """What ``config`` (or the configuration a calibration draw of it belongs to) is."""
        try:
            return self.descriptors[base_name(config)]
        except KeyError:
            self.require_descriptors()  # says what is missing, and why it matters
            raise

    def require_descriptors(self) -> None:
        """Raise ``LookupError`` unless every configuration, and nothing else, is described: a
        missing descriptor is a bug of whatever built the record, so it fails loudly (a traceback,
        not a one-line input error), and nothing guesses the kind from the name."""
        names = {base_name(config) for config in self.logits}
        missing, extra = sorted(names - set(self.descriptors)), sorted(set(self.descriptors) - names)
        wrong = [name for name, info in self.descriptors.items() if info.name != name]
        if missing or extra or wrong:
            raise LookupError(f"the run record of {self.model!r} describes its configurations wrongly (missing "
                              f"{missing}, without logits {extra}, under another name {wrong}): whatever builds a "
                              "RunRecord must pass descriptors= (e.g. Sweep.descriptors)")

    def save(self, folder: str | Path) -> Path:
        """Write ``logits.npz`` and ``run.json`` into ``folder`` (each whole or not at all)."""
        folder = Path(folder)
        self.require_descriptors()  # a record that could not be read back is not written
        # not compressed: float32 logits shrink by a tenth, and compressing them took a second of a
        # 10,000-image sweep
        with atomic_path(folder / LOGITS_FILE) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, labels=self.labels, calib_labels=self.calib_labels, calib_float=self.calib_float,
                     held_out_labels=self.held_out_labels, **self.logits,
                     **{HELD_OUT + name: values for name, values in self.held_out_logits.items()},
                     **{f"{SHIFT}{cell}:{name}": values for cell, logits in self.shifted.items()
                        for name, values in logits.items()})
        info = {"format": FORMAT_VERSION, "model": self.model, "configs": self.configs, "notes": self.notes,
                "run": self.summary, "seconds": self.seconds, "config": self.settings,
                "deployment": {name: asdict(numbers) for name, numbers in self.deployment.items()},
                "attribution": None if self.attribution is None else self.attribution.to_json(),
                "mixed": None if self.mixed is None else self.mixed.to_json(),
                "descriptors": {name: info.to_json() for name, info in self.descriptors.items()},
                "held_out": {"source": self.held_out_source, "configs": list(self.held_out_logits)},
                "guard_target": self.guard_target,
                "shift": {"cells": list(self.shifted), "configs": list(next(iter(self.shifted.values()), {}))}}
        with atomic_path(folder / RECORD_FILE) as tmp:
            tmp.write_text(json.dumps(finite(info), indent=2, allow_nan=False))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "RunRecord":
        """Read a run folder; :class:`RunRecordError` (one line) for anything that is not one."""
        folder = Path(folder)
        if not (folder / RECORD_FILE).is_file() or not (folder / LOGITS_FILE).is_file():
            raise RunRecordError(f"{folder} is not a ptqcal run folder (no {RECORD_FILE} and {LOGITS_FILE})")
        info = _read_info(folder)
        descriptors = _read_descriptors(folder, info.get("descriptors"))
        try:
            _check_members(folder / LOGITS_FILE)  # before numpy allocates what a header claims
            with np.load(folder / LOGITS_FILE, allow_pickle=False) as arrays:
                stored = {key: arrays[key] for key in arrays.files}
            logits = {str(name): stored[name] for name in info["configs"]}
            _check_arrays(stored["labels"], logits)
            deployment = {str(k): Deployment(**v) for k, v in info.get("deployment", {}).items()}
            attribution = Attribution.from_json(info["attribution"]) if info.get("attribution") else None
            mixed = MixedChoice.from_json(info["mixed"]) if info.get("mixed") else None
            record = cls(str(info.get("model", folder.name)), stored["labels"], logits,
                         stored.get("calib_labels", np.zeros(0, np.int64)),
                         stored.get("calib_float", np.zeros((0, 0), np.float32)), dict(info.get("run", {})),
                         [str(n) for n in info.get("notes", [])], dict(info.get("config", {})),
                         _number(info.get("seconds", 0.0)), deployment, attribution, mixed, descriptors,
                         *_held_out(info, stored), _shifted(info, stored, labels=stored["labels"], logits=logits))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile,
                io.UnsupportedOperation) as exc:
            raise RunRecordError(f"{folder} holds a damaged ptqcal run ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:100]})") from None
        try:
            record.require_descriptors()
        except LookupError:
            raise RunRecordError(f"{folder} holds a damaged ptqcal run (its descriptors do not match its "
                                 "configurations)") from None
        return record


def _check_members(path: Path) -> None:
    """Every member of ``logits.npz`` is stored uncompressed (as :meth:`RunRecord.save` writes it: a
    member can then hold no more than the file's own bytes, so no zip bomb) and is an array whose
    header claims exactly the bytes that follow it (no header asking for terabytes)."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{member.filename} is compressed")
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(handle)
                if dtype.hasobject or math.prod(shape) * dtype.itemsize != member.file_size - handle.tell():
                    raise ValueError(f"{member.filename} is not the array its header says")


def _check_arrays(labels: np.ndarray, logits: dict[str, np.ndarray]) -> None:
    """Integer labels >= 0, one per image, and every configuration's logits finite, (images,
    classes) with the float model's classes, each label one of them."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
        raise ValueError("labels are not class indices, one per image")
    classes = {values.shape[1] if values.ndim == 2 else -1 for values in logits.values()}
    if any(values.ndim != 2 or len(values) != len(labels) or values.dtype.kind != "f" for values in logits.values()) \
            or len(classes) != 1:
        raise ValueError("logits are not (images, classes) floats, alike for every configuration")
    if len(labels) and labels.max() >= classes.pop():
        raise ValueError("a label is not one of the model's classes")
    if not all(np.isfinite(values).all() for values in logits.values()):
        raise ValueError("logits hold NaN or infinite values")


def _number(value: Any) -> float:
    """A number as saved: ``null`` is NaN (undefined); anything else but a number is damage."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {str(value)[:20]!r}")
    return float(value)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``, through dicts, lists and
    tuples: JSON has neither, and a strict parser refuses Python's ``NaN`` token. Read back, ``None``
    where a number belongs means "undefined" (NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def _held_out(info: dict[str, Any], stored: dict[str, np.ndarray]) -> tuple:
    """(labels, logits, source, guard target) of the held-out images as saved (none in a run that
    had none): every array named in ``run.json`` must be there, of the labels' length."""
    held = info.get("held_out") or {"source": "", "configs": []}
    labels = stored.get("held_out_labels", np.zeros(0, np.int64))
    if not isinstance(held, dict) or not isinstance(held.get("source"), str) or \
            not isinstance(held.get("configs"), list):
        raise ValueError("held_out is not {source, configs}")
    if not set(map(str, held["configs"])) <= set(map(str, info.get("configs", []))):
        raise ValueError("held-out logits of a configuration the run does not have")
    logits = {str(name): stored[HELD_OUT + str(name)] for name in held["configs"]}
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or any(v.ndim != 2 or len(v) != len(labels)
                                                                    for v in logits.values()):
        raise ValueError("held-out logits do not match their labels")
    target = info.get("guard_target")
    if target is not None:
        if not isinstance(target, dict) or any(type(v) not in (int, float) for v in target.values()):
            raise ValueError("guard_target is not a mapping of numbers")
        GuardTarget(**target)  # a ValueError (or TypeError for an unknown field) if it is no target
    return labels, logits, held["source"], target


def _shifted(info: dict[str, Any], stored: dict[str, np.ndarray], labels: np.ndarray,
             logits: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The logits under each corruption as saved: named cells, configurations of the run, and arrays
    like the clean ones (the same images, classes, finite)."""
    shift = info.get("shift") or {"cells": [], "configs": []}
    if not isinstance(shift, dict) or not isinstance(shift.get("cells"), list) or \
            not isinstance(shift.get("configs"), list):
        raise ValueError("shift is not {cells, configs}")
    if not all(isinstance(c, str) and CELL.fullmatch(c) for c in shift["cells"]) or len(set(shift["cells"])) != \
            len(shift["cells"]) or not set(map(str, shift["configs"])) <= set(logits):
        raise ValueError("shift names unknown corruptions or configurations")
    shifted = {cell: {str(name): stored[f"{SHIFT}{cell}:{name}"] for name in shift["configs"]}
               for cell in shift["cells"]}
    for cell_logits in shifted.values():
        _check_arrays(labels, {**cell_logits, "": next(iter(logits.values()))})  # "" names no configuration
    return shifted


def _read_info(folder: Path) -> dict[str, Any]:
    """``run.json`` of a record this version reads: one line for a damaged, a newer or an older one."""
    try:
        info = json.loads((folder / RECORD_FILE).read_text())
        version = info.get("format", 1) if isinstance(info, dict) else None
        if type(version) is not int or version > FORMAT_VERSION:
            raise ValueError("unknown record format")
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested past Python's stack
        raise RunRecordError(f"{folder} holds a damaged ptqcal run ({type(exc).__name__})") from None
    if version < DESCRIBED_SINCE:
        raise RunRecordError(f"{folder} was made by an older ptqcal (run record format {version}, which does not "
                             f"say what each configuration is): re-run it with ptqcal {__version__}")
    return info


def _read_descriptors(folder: Path, value: Any) -> dict[str, ConfigInfo]:
    """The saved descriptors, each checked strictly: a tampered one is one line naming it."""
    if not isinstance(value, dict):
        raise RunRecordError(f"{folder} holds a damaged ptqcal run (no configuration descriptors)")
    descriptors = {}
    for name, info in value.items():
        try:
            descriptors[name] = ConfigInfo.from_json(name, info)
        except ValueError as exc:
            raise RunRecordError(f"{folder} holds a damaged ptqcal run (descriptor of {name[:40]!r}: "
                                 f"{' '.join(str(exc).split())})") from None
    return descriptors
