"""Folders ptqcal writes: recognised only by its own marker, built beside their target and swapped
in with renames, locked while written, and never touching what ptqcal did not create.

A folder is ptqcal's when it holds the marker file :data:`MARKER` (JSON: what it is and the format
version). Nothing is deleted or replaced on the strength of a folder's name or contents.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .cache import link_or_copy
from .errors import InputError, UserError
from .evaluate.record import FORMAT_VERSION, RunRecord

MARKER = ".ptqcal"
RUN, COMPARISON, REPORT = "run", "comparison", "report"  # what a marked folder holds
PARTIAL = ".partial-"
# the file system's answers that are the user's to fix: read-only, full, no permission, over quota
DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR}  # work folders beside their target: .<name>.partial-XXXX


def marker_kind(folder: Path) -> str | None:
    """What ptqcal wrote in ``folder`` (``run``, ``comparison``, ``report``), or ``None``."""
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
        return info["kind"] if isinstance(info, dict) and info.get("kind") in (RUN, COMPARISON, REPORT) else None
    except (OSError, ValueError, KeyError):
        return None


def write_marker(folder: Path, kind: str, parts: list[str] | None = None) -> None:
    info = {"kind": kind, "format": FORMAT_VERSION, "written_by": "ptqcal", **({"parts": parts} if parts else {})}
    (Path(folder) / MARKER).write_text(json.dumps(info) + "\n")


def comparison_parts(folder: Path) -> list[Path]:
    """The run folders a comparison folder combines (names inside it only, never a path from data)."""
    info = json.loads((Path(folder) / MARKER).read_text())
    parts = [Path(folder) / name for name in info.get("parts", []) if isinstance(name, str)
             and name == Path(name).name and name not in ("", ".", "..")]
    return [p for p in parts if marker_kind(p) == RUN]


def check_target(out: Path, kinds: tuple[str, ...]) -> None:
    """Raise :class:`UserError` unless ptqcal may write ``out``: a new or empty folder, or one it
    marked as one of ``kinds``. The working directory and its parents are never a target."""
    here = Path.cwd().resolve()
    if str(out).strip() in ("", ".") or out.resolve() == here or out.resolve() in here.parents:
        raise UserError(f"{str(out) or repr('')} is the working directory or one of its parents; choose a new "
                        "folder for --out")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{out}: {parent} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; choose a folder for --out")
    if out.is_dir() and any(out.iterdir()) and marker_kind(out) not in kinds:
        raise UserError(f"{out} exists and ptqcal did not make it (no {MARKER} marker); choose another --out")


@contextmanager
def writing(out: Path, kind: str, parts: list[str] | None = None) -> Iterator[Path]:
    """Claim ``out`` for writing a folder of ``kind``: check that ptqcal may write it, create and
    mark it if needed, and hold its lock (a second process refuses with one line). On an input
    error, everything this claim created is removed again, so a refusal leaves nothing behind."""
    check_target(out, (kind,))
    created = _missing_ancestors(out) + ([] if out.exists() else [out])
    marked, lock, handle = False, None, None
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            marked = marker_kind(out) is None
            if marked:
                write_marker(out, kind, parts)
            lock = out.parent / f".{out.name}.ptqcal-lock"
            handle = open(lock, "a")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock = None  # the other process's
            raise UserError(f"another ptqcal is writing {out}; wait for it to finish or choose another "
                            "--out") from None
        yield out
    except (InputError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in DISK_ERRNOS:
            raise  # not the disk's answer: an internal error keeps its traceback
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        elif marked:
            (out / MARKER).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {exc.filename or out}: {exc.strerror}") from None
        raise
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
        if handle is not None:
            handle.close()


def _missing_ancestors(out: Path) -> list[Path]:
    """``out.parent`` and its ancestors that do not exist yet, outermost first."""
    missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    return missing[::-1]


def new_work_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` to build in (a killed run's marked leftovers are removed)."""
    prefix = f".{out.name}{PARTIAL}"
    for stale in out.parent.iterdir():  # literal names: no glob, so no '*' in a name can match siblings
        if stale.name.startswith(prefix) and stale.is_dir() and (stale / MARKER).exists():
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would carry over to the finished folder
    write_marker(work, "partial")
    return work


def swap_in(work: Path, out: Path) -> None:
    """Replace ``out`` (a folder ptqcal marked, or none) by ``work``, keeping ``out``'s cache."""
    if out.exists() and marker_kind(out) is None and any(out.iterdir()):
        raise UserError(f"{out} changed while ptqcal wrote it and is no longer ptqcal's; left as it is")
    if (out / "cache").is_dir() and marker_kind(out) is not None:
        os.replace(out / "cache", work / "cache")
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(work, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, out)


REPORT_FILES = ("report.md", "report.html", "metrics.csv", "metrics.json", "layers.csv")
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
                      array_digest(record.calib_float), array_digest(record.calib_labels)])
    stamp = previous / "cache" / f"report-{make_key(parts, __version__)}.done"
    if stamp.exists() and marker_kind(previous) is not None:
        if previous.resolve() != target.resolve():
            for file in _report_files(previous):
                link_or_copy(file, target / file.name)
        return target / "report.md"
    report = write_report(folders, target)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    for old in stamp.parent.glob("report-*.done"):
        old.unlink()
    stamp.touch()
    return report


def write_report(folders: list[Path], target: Path) -> Path:
    """Build the report in a folder beside ``target``, then move each file in: failing or killed
    half way, the previous report stays whole."""
    from .analysis import build_report

    for folder in folders:  # a wrong folder fails before anything is written
        RunRecord.load(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}report-", dir=target.parent))
    write_marker(staging, "partial")  # ptqcal's: the next run removes it if this one is killed
    try:
        build_report(folders, staging)
        target.mkdir(exist_ok=True)
        if marker_kind(target) is None:
            write_marker(target, REPORT)
        for file in _report_files(staging):
            os.replace(file, target / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "report.md"
