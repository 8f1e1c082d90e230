"""A run folder's cache: every expensive intermediate stored under a hash of what produced it.

Entries are files named ``<kind>-<key>.<suffix>`` in ``<run>/cache/``. A key hashes the inputs
(file digests, array bytes, settings) and the versions of the tools that computed it, so a
changed input misses and everything downstream of it misses with it. Entries are written to a
temporary name and renamed: a killed run leaves whole entries or none. Each entry's sha256 is
stored beside it (``.sha256``) and checked when the entry is read: a damaged, truncated or
foreign entry is recomputed, never trusted. Results can be validated before they are stored, so
a bad input never leaves an entry behind that would fail the same command forever.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .atomic import atomic_path

MARKER = ".ptqcal"  # ptqcal's marker file: only folders holding it are ever deleted or replaced
SCRATCH = "scratch"  # the marker's kind in a working folder that is removed when its work ends
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    stat = Path(path).stat()
    memo = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def array_digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def make_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (paths and arrays should be digested first)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class Cache:
    """Content-addressed entries in one folder; ``hits``/``misses`` count lookups."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        remove_scratch(self.root)  # a killed run's working folders (marked) and partial writes

    def path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / f"{kind}-{key}.{suffix}"

    def has(self, kind: str, key: str, suffix: str) -> bool:
        """Whether the entry is there and whole (nothing is counted)."""
        return _intact(self.path(kind, key, suffix))

    def file(self, kind: str, key: str, suffix: str, create: Callable[[Path], Any]) -> Path:
        """The entry's path, calling ``create(tmp_path)`` to write it first if it is missing or
        does not match its stored digest."""
        target = self.path(kind, key, suffix)
        if _intact(target):
            self.hits += 1
            return target
        self.misses += 1
        with atomic_path(target) as tmp:
            create(tmp)
        _seal(target)
        return target

    def folder(self, kind: str, key: str, create: Callable[[Path], Any]) -> Path:
        """An entry of several files that belong together (written whole or not at all): the
        folder's path, calling ``create(tmp_folder)`` to fill it first if it is missing."""
        target = self.root / f"{kind}-{key}"
        if target.is_dir() and all(_intact(p) for p in target.iterdir() if p.suffix != ".sha256"):
            self.hits += 1
            return target
        shutil.rmtree(target, ignore_errors=True)
        self.misses += 1
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}.", suffix=".tmp", dir=self.root))
        try:
            mark_scratch(tmp)  # a kill from here on leaves a folder the next run removes
            tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the entry
            create(tmp)
            (tmp / MARKER).unlink()
            for part in [p for p in tmp.iterdir() if p.suffix != ".sha256"]:
                _seal(part)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def array(self, kind: str, key: str, compute: Callable[[], np.ndarray],
              validate: Callable[[np.ndarray], Any] | None = None) -> np.ndarray:
        """The cached array, or ``compute()``'s, checked by ``validate`` (which raises) before it
        is stored."""
        def write(tmp: Path) -> None:
            array = compute()
            if validate is not None:
                validate(array)
            with open(tmp, "wb") as handle:
                np.save(handle, array)

        return np.load(self.file(kind, key, "npy", write), allow_pickle=False)


def _seal(path: Path) -> None:
    """Store ``path``'s digest beside it: the entry counts as whole only with a matching seal."""
    with atomic_path(path.with_name(path.name + ".sha256")) as tmp:
        tmp.write_text(file_digest(path))


def _intact(path: Path) -> bool:
    seal = path.with_name(path.name + ".sha256")
    try:
        return path.is_file() and seal.read_text().strip() == file_digest(path)
    except OSError:
        return False


def mark_scratch(folder: Path) -> None:
    """Mark ``folder`` as ptqcal's working folder: a run that finds it left behind removes it."""
    (Path(folder) / MARKER).write_text(json.dumps({"kind": SCRATCH, "written_by": "ptqcal"}) + "\n")


def is_scratch(folder: Path) -> bool:
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("kind") == SCRATCH


@contextmanager
def scratch_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new working folder in ``parent`` (named ``prefix`` + random), marked before anything else is
    written into it, and removed when the block ends. A kill leaves it marked: :class:`Cache` (for a
    folder inside a cache) removes it when the cache is next opened."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        mark_scratch(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_scratch(root: Path) -> None:
    """Remove what killed work left in ``root`` (a cache folder, ptqcal's): working folders that hold
    the scratch marker, and the temporary files of :func:`~ptqcal.atomic.atomic_path` (a file holds no
    marker: these are named ``.<name>.<8 hex>.tmp``). Nothing else is touched."""
    if not Path(root).is_dir():
        return
    for entry in Path(root).iterdir():
        if not entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if is_scratch(entry):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)


_NO_RANGE_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF, errno.ETXTBSY}


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source``'s bytes to a new file ``target``: shared on disk (a reflink) where the file
    system can (``copy_file_range`` on Btrfs, XFS, NFS 4.2), copied otherwise. Never a link: the
    copy is the run's, and changing either file never changes the other."""
    with atomic_path(target) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
        size, copied = os.fstat(src.fileno()).st_size, 0
        try:
            while copied < size:
                step = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
                if step == 0:
                    break
                copied += step
        except (OSError, AttributeError) as exc:  # no copy_file_range here, or not between these files
            if isinstance(exc, OSError) and exc.errno not in _NO_RANGE_COPY:
                raise
        src.seek(copied)
        dst.seek(copied)
        shutil.copyfileobj(src, dst, 1 << 20)  # the rest, in plain reads and writes


def link_or_copy(source: Path, target: Path, within: Path | None = None) -> None:
    """Place ``source`` in a run folder as ``target``. A hard link (no bytes copied) only for a file
    inside ``within`` (a cache ptqcal owns); anything else, a user's model above all, is copied: a
    run folder never shares a file with its user."""
    if within is not None and Path(source).resolve().is_relative_to(Path(within).resolve()):
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    copy_file(source, target)
