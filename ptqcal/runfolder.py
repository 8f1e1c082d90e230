"""Folders ptqcal writes: recognised only by its own marker, built beside their target and swapped
in with renames, locked while written, and never touching what ptqcal did not create.

A folder is ptqcal's when it holds the marker file :data:`MARKER` (JSON: what it is, the format
version, and ``files``: the names ptqcal wrote into it). Nothing is deleted or replaced on the
strength of a folder's name or contents:

- a run folder is replaced by a new run, but only the files its marker lists go: everything else
  in it (a user's notes, a sub-folder) is carried over into the new run folder, and a run that would
  write a file of the same name as one of the user's refuses instead;
- every working folder beside a target (``.<name>.partial-*``: the run being built, the previous run
  while the new one is swapped in, a report being built) is marked, naming its target and its role,
  before anything can be left in it; the next ``ptqcal run`` or ``ptqcal report`` of that target
  (under its lock) finishes or undoes what a killed one left: a previous run caught between the two
  renames of a swap is put back (or, when the new one is in, its cache and the user's files are
  carried over), and the rest is removed.
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
from typing import IO, Iterator

from .atomic import atomic_path
from .cache import MARKER
from .errors import InputError, UserError
from .evaluate.record import FORMAT_VERSION

RUN, COMPARISON, REPORT = "run", "comparison", "report"  # what a marked folder holds
PARTIAL = ".partial-"  # work folders beside their target: .<name>.partial-XXXX
PARTIAL_KIND = "partial"
WORK, OLD, STAGING = "work", "old", "report"  # the roles of the folders beside a target
PREVIOUS = "run"  # inside an OLD folder: the previous run folder, while the new one is swapped in
CACHE = "cache"
# the file system's answers that are the user's to fix: read-only, full, no permission, over quota
DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR}


# --- the marker -------------------------------------------------------------------------------------

def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` as written, or ``None`` when it holds none (or an unreadable one)."""
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def marker_kind(folder: Path) -> str | None:
    """What ptqcal wrote in ``folder`` (``run``, ``comparison``, ``report``), or ``None``."""
    info = read_marker(folder)
    return info["kind"] if info is not None and info.get("kind") in (RUN, COMPARISON, REPORT) else None


def manifest(folder: Path) -> set[str] | None:
    """The names ptqcal wrote in ``folder`` (its marker's ``files``), or ``None`` for a folder marked
    by a ptqcal that kept no list."""
    info = read_marker(folder)
    files = None if info is None else info.get("files")
    if not isinstance(files, list):
        return None
    return {name for name in files if isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")}


def _write_info(folder: Path, info: dict) -> None:
    with atomic_path(Path(folder) / MARKER) as tmp:  # never a half-written marker
        tmp.write_text(json.dumps(info) + "\n")


def write_marker(folder: Path, kind: str, parts: list[str] | None = None, files: list[str] | None = None) -> None:
    """Mark ``folder`` as ptqcal's ``kind``; ``files``: the names ptqcal wrote in it. A folder being
    built beside its target stays recognisable as that (its target and role are kept)."""
    old = read_marker(folder) or {}
    info = {"kind": kind, "format": FORMAT_VERSION, "written_by": "ptqcal", **({"parts": parts} if parts else {})}
    if files is not None:
        info["files"] = sorted(files)
    info.update({key: old[key] for key in ("for", "role") if key in old})
    _write_info(folder, info)


def _update_marker(folder: Path, drop: tuple[str, ...] = (), **changes) -> None:
    info = read_marker(folder) or {}
    info = {key: value for key, value in info.items() if key not in drop}
    info.update(changes)
    _write_info(folder, info)


def comparison_parts(folder: Path) -> list[Path]:
    """The run folders a comparison folder combines (names inside it only, never a path from data)."""
    info = read_marker(folder) or {}
    parts = [Path(folder) / name for name in info.get("parts", []) if isinstance(name, str)
             and name == Path(name).name and name not in ("", ".", "..")]
    return [p for p in parts if marker_kind(p) == RUN]


# --- claiming a target ------------------------------------------------------------------------------

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
    if out.is_symlink():  # replacing it would replace the link, and carry the files of the folder it names
        raise UserError(f"{out} is a symbolic link; give the folder itself to --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; choose a folder for --out")
    if out.is_dir() and any(out.iterdir()) and marker_kind(out) not in kinds:
        raise UserError(f"{out} exists and ptqcal did not make it (no {MARKER} marker); choose another --out")


@contextmanager
def writing(out: Path, kind: str, parts: list[str] | None = None) -> Iterator[Path]:
    """Claim ``out`` for writing a folder of ``kind``: check that ptqcal may write it, hold its lock
    (a second process refuses with one line), finish or undo what a killed ptqcal left beside it,
    then create and mark it if needed. On an input error, everything this claim created is removed
    again (folders only while empty: another process may be using them), so a refusal leaves
    nothing behind."""
    check_target(out, (kind,))
    made: list[Path] = []  # the ancestors this claim created, outermost first
    lock: tuple[Path, IO] | None = None
    created = marked = failed = False
    try:
        try:
            made = _make_parents(out)
            lock = _lock(out)
            recover(out)
            check_target(out, (kind,))  # again, under the lock
            if not out.exists():
                out.mkdir()
                created = True
            if marker_kind(out) is None:
                write_marker(out, kind, parts, files=[])
                marked = True
        except BlockingIOError:
            raise UserError(f"another ptqcal is writing {out}; wait for it to finish or choose another "
                            "--out") from None
        yield out
    except (InputError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in DISK_ERRNOS:
            raise  # not the disk's answer: an internal error keeps its traceback
        failed = True
        if created:
            shutil.rmtree(out, ignore_errors=True)
        elif marked:
            (out / MARKER).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {exc.filename or out}: {exc.strerror}") from None
        raise
    finally:
        if lock is not None:
            _unlock(*lock)
        if failed:
            for folder in reversed(made):  # innermost first; a folder someone else uses is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _make_parents(out: Path) -> list[Path]:
    """Create ``out``'s missing ancestors; the ones this call created, outermost first."""
    made = []
    for folder in [*reversed(out.parent.parents), out.parent]:
        if not folder.exists():
            try:
                folder.mkdir()
                made.append(folder)
            except FileExistsError:  # another process made it at the same moment: its, not ours
                pass
    return made


def _lock(out: Path) -> tuple[Path, IO]:
    """Hold ``out``'s lock (``.<name>.ptqcal-lock`` beside it); ``BlockingIOError`` when another
    process holds it. A lock file its previous holder removed while this one opened it is not a lock:
    the lock is taken again on the file that is there."""
    path = out.parent / f".{out.name}.ptqcal-lock"
    for _ in range(100):
        try:
            handle = open(path, "a")
        except FileNotFoundError:  # a failing process removed the (empty) parent it had made
            _make_parents(out)
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(handle, path):
                return path, handle
        except BaseException:
            handle.close()
            raise
        handle.close()
    raise UserError(f"cannot lock {out}: its lock file keeps changing; is another ptqcal writing it?")


def _same_file(handle: IO, path: Path) -> bool:
    try:
        mine, there = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _unlock(path: Path, handle: IO) -> None:
    try:
        if _same_file(handle, path):
            path.unlink()
    finally:
        handle.close()


# --- what a killed run leaves -------------------------------------------------------------------------

def _partial(out: Path, role: str) -> Path:
    """A new folder beside ``out`` for ``role``, marked (with its target and role) at once."""
    infix = "" if role == WORK else f"{role}-"
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{infix}", dir=out.parent))
    _write_info(folder, {"kind": PARTIAL_KIND, "format": FORMAT_VERSION, "written_by": "ptqcal", "for": out.name,
                         "role": role})
    folder.chmod(0o755)  # mkdtemp's 0700 would carry over to the finished folder
    return folder


def new_work_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` to build in (marked: a kill leaves nothing the next run keeps)."""
    return _partial(out, WORK)


def _leftovers(out: Path) -> Iterator[tuple[Path, dict | None]]:
    """The folders beside ``out`` named as its partial folders, with their markers."""
    prefix = f".{out.name}{PARTIAL}"
    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.iterdir()):  # literal names: no glob, so no '*' in a name can match siblings
        if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
            yield entry, read_marker(entry)


def recover(out: Path) -> None:
    """Finish or undo what a killed ptqcal left beside ``out``, by marker only (the caller holds
    ``out``'s lock). A previous run caught in a swap is put back where ``out`` is missing, or has its
    cache and the user's files carried into the new run; the work and report folders are removed.
    A folder named like a leftover without ptqcal's marker naming ``out`` is left as it is (only an
    empty one, killed before it could be marked, is removed)."""
    later = []
    for folder, info in _leftovers(out):
        if info is None:
            _recover_unmarked(folder, out)
            continue
        if info.get("for") != out.name or info.get("kind") not in (PARTIAL_KIND, RUN):
            continue  # another target's, or a finished run (kept, even under a leftover's name): not ours to remove
        if info.get("role") == OLD:
            previous = folder / PREVIOUS
            if previous.is_dir() and not previous.is_symlink() and marker_kind(previous) is not None:
                if not out.exists() and not out.is_symlink():
                    os.replace(previous, out)  # killed between the swap's two renames: the previous run is back
                elif marker_kind(out) is not None:
                    _carry_over(previous, out)  # killed while carrying over: finish it
            _remove_old(folder)
        else:
            later.append(folder)  # a run or report being built for ``out``
    for folder in later:
        shutil.rmtree(folder, ignore_errors=True)


def _recover_unmarked(folder: Path, out: Path) -> None:
    """An unmarked folder named like a leftover: removed only when empty (killed between its creation
    and its marker). ptqcal 0.2 left the previous run, marked, inside an unmarked
    ``.<name>.partial-old-*`` when killed mid-swap: it is put back where ``out`` is missing."""
    entries = list(folder.iterdir())
    if not entries:
        folder.rmdir()
    elif [e.name for e in entries] == [out.name] and marker_kind(entries[0]) is not None \
            and not entries[0].is_symlink() and not out.exists() and not out.is_symlink():
        os.replace(entries[0], out)
        folder.rmdir()


def _is_ptqcals(folder: Path, name: str) -> bool:
    """Whether entry ``name`` of marked folder ``folder`` is ptqcal's: its marker, its cache, or a file
    its marker lists (a folder marked without a list: all of it, as ptqcal 0.2 treated it)."""
    listed = manifest(folder)
    return name in (MARKER, CACHE) or listed is None or name in listed


def _users_entries(folder: Path) -> list[str]:
    """The entries of marked folder ``folder`` that ptqcal did not write (its marker does not list)."""
    listed = manifest(folder)
    if listed is None:
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, CACHE) and p.name not in listed)


def _carry_over(previous: Path, new: Path) -> None:
    """Move the cache and every entry ptqcal did not write from the previous run folder into the new
    one (a name the new run holds stays where it is: the previous folder is then kept)."""
    listed = manifest(previous)
    for entry in sorted(previous.iterdir()):
        name = entry.name
        if name == MARKER or (listed is not None and name in listed and name != CACHE):
            continue  # ptqcal's, replaced by the new run
        if not os.path.lexists(new / name):  # (in a folder marked without a list, the new run's file replaces)
            os.replace(entry, new / name)


def _remove_old(folder: Path) -> None:
    """Remove an OLD folder once what is left in its previous run is all ptqcal's; a user's entry that
    could not be carried over keeps it (it is never deleted)."""
    previous = folder / PREVIOUS
    if previous.is_dir() and not previous.is_symlink():
        if any(not _is_ptqcals(previous, entry.name) for entry in previous.iterdir()):
            return
        shutil.rmtree(previous)
    (folder / MARKER).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def restore(folder: Path) -> None:
    """Put right what a killed ptqcal left beside ``folder`` before reading it (``ptqcal report``),
    under its lock; a folder another ptqcal is writing is left to that one."""
    folder = Path(folder)
    if folder.name in ("", ".", ".."):
        folder = folder.resolve()
    if not folder.name or not folder.parent.is_dir():
        return
    try:
        lock = _lock(folder)
    except (BlockingIOError, OSError):
        return
    try:
        recover(folder)
    finally:
        _unlock(*lock)


# --- swapping a finished run in ---------------------------------------------------------------------

def swap_in(work: Path, out: Path) -> None:
    """Replace ``out`` (a folder ptqcal marked, or none) by ``work``: ``out``'s cache and every entry
    ptqcal did not write in it are carried over; refused, with ``out`` as it was, when this run writes
    a file of the name of one of them."""
    if out.exists() and marker_kind(out) is None and any(out.iterdir()):
        raise UserError(f"{out} changed while ptqcal wrote it and is no longer ptqcal's; left as it is")
    ours = sorted(p.name for p in work.iterdir() if p.name not in (MARKER, CACHE))
    if out.is_dir():
        clash = sorted(set(_users_entries(out)) & set(ours))
        if clash:
            raise UserError(f"{out / clash[0]} is not one of the files ptqcal wrote there, and this run writes a file "
                            "of that name: move it, or choose another --out")
    _update_marker(work, files=ours)
    if out.exists():
        old = _partial(out, OLD)
        os.replace(out, old / PREVIOUS)
        os.replace(work, out)  # a kill between the two renames: the next run puts the previous one back
        _carry_over(old / PREVIOUS, out)
        _remove_old(old)
    else:
        os.replace(work, out)
    _update_marker(out, drop=("for", "role"))
