"""The saved run: what ``ptqcal run`` writes and ``ptqcal report`` reads (numpy and json only).

A run folder holds ``logits.npz`` (labels, the float model's logits on the evaluation and the
calibration images, and one array per configuration and calibration draw, e.g. ``a8w4`` and
``a8w4#r1``) and ``run.json`` (format version, model, settings, header lines, notes). One type
writes and reads both, so no key is spelled twice.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptqcal.atomic import atomic_path
from ptqcal.errors import InputError

from .attribution import Attribution
from .deploy import Deployment
from .mixed import MixedChoice

FORMAT_VERSION = 2  # 1: the unversioned records of ptqcal 0.2 (read the same way)
RECORD_FILE = "run.json"
LOGITS_FILE = "logits.npz"
_SPECIAL = ("labels", "calib_labels", "calib_float")


class RunRecordError(InputError):
    """A folder that holds no readable ptqcal run."""


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

    @property
    def configs(self) -> list[str]:
        return list(self.logits)

    def save(self, folder: str | Path) -> Path:
        """Write ``logits.npz`` and ``run.json`` into ``folder`` (each whole or not at all)."""
        folder = Path(folder)
        # not compressed: float32 logits shrink by a tenth, and compressing them took a second of a
        # 10,000-image sweep
        with atomic_path(folder / LOGITS_FILE) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, labels=self.labels, calib_labels=self.calib_labels,
                     calib_float=self.calib_float, **self.logits)
        info = {"format": FORMAT_VERSION, "model": self.model, "configs": self.configs, "notes": self.notes,
                "run": self.summary, "seconds": self.seconds, "config": self.settings,
                "deployment": {name: asdict(numbers) for name, numbers in self.deployment.items()},
                "attribution": None if self.attribution is None else self.attribution.to_json(),
                "mixed": None if self.mixed is None else self.mixed.to_json()}
        with atomic_path(folder / RECORD_FILE) as tmp:
            tmp.write_text(json.dumps(info, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "RunRecord":
        """Read a run folder; :class:`RunRecordError` (one line) for anything that is not one."""
        folder = Path(folder)
        if not (folder / RECORD_FILE).is_file() or not (folder / LOGITS_FILE).is_file():
            raise RunRecordError(f"{folder} is not a ptqcal run folder (no {RECORD_FILE} and {LOGITS_FILE})")
        try:
            info = json.loads((folder / RECORD_FILE).read_text())
            if not isinstance(info, dict) or int(info.get("format", 1)) > FORMAT_VERSION:
                raise ValueError("unknown record format")
            with np.load(folder / LOGITS_FILE, allow_pickle=False) as arrays:
                stored = {key: arrays[key] for key in arrays.files}
            logits = {str(name): stored[name] for name in info["configs"]}
            deployment = {str(k): Deployment(**v) for k, v in info.get("deployment", {}).items()}
            attribution = Attribution.from_json(info["attribution"]) if info.get("attribution") else None
            mixed = MixedChoice.from_json(info["mixed"]) if info.get("mixed") else None
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as exc:
            raise RunRecordError(f"{folder} holds a damaged ptqcal run ({type(exc).__name__})") from exc
        return cls(str(info.get("model", folder.name)), stored["labels"], logits,
                   stored.get("calib_labels", np.zeros(0, np.int64)),
                   stored.get("calib_float", np.zeros((0, 0), np.float32)), dict(info.get("run", {})),
                   [str(n) for n in info.get("notes", [])], dict(info.get("config", {})),
                   float(info.get("seconds", 0.0)), deployment, attribution, mixed)
