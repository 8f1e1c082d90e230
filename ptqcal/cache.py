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

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .atomic import atomic_path

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
        for stale in self.root.glob(".*.tmp") if self.root.is_dir() else ():  # a killed run's partial write
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)

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
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the entry
        try:
            create(tmp)
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


def link_or_copy(source: Path, target: Path) -> None:
    """Place a cache entry in the run folder without copying its bytes where the disk allows."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
