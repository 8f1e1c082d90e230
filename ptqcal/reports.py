"""A run folder's report: built beside its target and moved in file by file, reused when a stamp in the
cache says it was built from the same run records and every file it wrote is still there, and never
replacing a file ptqcal did not write (:mod:`.runfolder`'s markers say which)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .cache import link_or_copy
from .errors import UserError
from .evaluate.record import RunRecord
from .runfolder import (CACHE, PARTIAL_KIND, REPORT, STAGING, _partial, _update_marker, manifest, marker_kind,
                        read_marker, write_marker)

REPORT_FILES = ("report.md", "report.html", "metrics.csv", "metrics.json", "layers.csv", "guard.json", "recommendation.json")
FIGURE_SUFFIXES = (".png", ".svg")


def _report_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name in REPORT_FILES
            or (p.name.startswith("fig") and p.suffix in FIGURE_SUFFIXES)]


def report_once(folders: list[Path], target: Path, previous: Path) -> Path:
    """Build the report of ``folders`` into ``target``, or reuse ``previous``'s when it was built
    from the same logits and settings (drawing the figures is the slow part of a cached re-run)."""
    from . import __version__
    from .cache import array_digest, make_key

    parts = []
    for folder in folders:
        record = RunRecord.load(folder)
        parts.append([record.model, record.summary, record.notes, record.settings,
                      {k: array_digest(v) for k, v in record.logits.items()}, array_digest(record.labels),
                      array_digest(record.calib_float), array_digest(record.calib_labels),
                      {k: array_digest(v) for k, v in record.held_out_logits.items()},
                      array_digest(record.held_out_labels), record.guard_target,
                      {k: vars(v) for k, v in record.deployment.items()},
                      {cell: {k: array_digest(v) for k, v in logits.items()} for cell, logits in record.shifted.items()}])
    stamp = previous / CACHE / f"report-{make_key(parts, __version__)}.done"
    if stamp.exists() and marker_kind(previous) is not None and _still_there(stamp, previous):
        if previous.resolve() != target.resolve():
            listed = manifest(previous)  # only the report ptqcal wrote, never a user's file of such a name
            for file in _report_files(previous):
                if listed is None or file.name in listed:
                    link_or_copy(file, target / file.name)
        return target / "report.md"
    report = write_report(folders, target)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    for old in stamp.parent.glob("report-*.done"):
        old.unlink()
    stamp.write_text(json.dumps(sorted(p.name for p in _report_files(target))))
    return report


def _still_there(stamp: Path, folder: Path) -> bool:
    """Every file the stamped report wrote is still in ``folder`` (a user may have deleted a figure)."""
    try:
        names = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(names, list) and "report.md" in names and all((folder / str(n)).is_file() for n in names)


def write_report(folders: list[Path], target: Path) -> Path:
    """Build the report in a folder beside ``target``, then move each file in: failing or killed
    half way, the previous report stays whole. A file of a report's name that ptqcal did not write
    there is the user's: refused, before any file moves."""
    from .analysis import build_report

    for folder in folders:  # a wrong folder fails before anything is written
        RunRecord.load(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    owner = (read_marker(target) or {}).get("for") or target.name  # a run being built: its target's leftovers
    staging = _partial(target.parent / owner, STAGING)
    try:
        build_report(folders, staging)
        target.mkdir(exist_ok=True)
        if marker_kind(target) is None and (read_marker(target) or {}).get("kind") != PARTIAL_KIND:
            write_marker(target, REPORT, files=[])
        files = _report_files(staging)
        listed = manifest(target)
        if listed is not None:
            clash = sorted(f.name for f in files if os.path.lexists(target / f.name) and f.name not in listed)
            if clash:
                raise UserError(f"{target / clash[0]} is not one of the files ptqcal wrote there, and the report "
                                "writes a file of that name: move it, or choose another --out")
        for file in files:
            os.replace(file, target / file.name)
        if listed is not None:
            built = {f.name for f in files}  # an earlier report's others (ptqcal's, listed) describe other runs
            stale = {p.name for p in _report_files(target) if p.name in listed and p.name not in built}
            any((target / name).unlink() for name in stale)
            _update_marker(target, files=sorted((listed - stale) | built))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "report.md"
