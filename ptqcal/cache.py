"""A run folder's cache: every expensive intermediate stored under a hash of what produced it.

Entries are files named ``<kind>-<key>.<suffix>`` in ``<run>/cache/``. A key hashes the inputs
(file digests, array bytes, settings) and the versions of the tools that computed it, so a
changed input misses and everything downstream of it misses with it. Entries are written to a
temporary name and renamed: a killed run leaves whole entries or none.
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

    def file(self, kind: str, key: str, suffix: str, create: Callable[[Path], Any]) -> Path:
        """The entry's path, calling ``create(tmp_path)`` to write it first if it is missing."""
        target = self.path(kind, key, suffix)
        if target.exists():
            self.hits += 1
            return target
        self.misses += 1
        with atomic_path(target) as tmp:
            create(tmp)
        return target

    def folder(self, kind: str, key: str, create: Callable[[Path], Any]) -> Path:
        """An entry of several files that belong together (written whole or not at all): the
        folder's path, calling ``create(tmp_folder)`` to fill it first if it is missing."""
        target = self.root / f"{kind}-{key}"
        if target.is_dir():
            self.hits += 1
            return target
        self.misses += 1
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}.", suffix=".tmp", dir=self.root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the entry
        try:
            create(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def array(self, kind: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, compute())

        return np.load(self.file(kind, key, "npy", write))

    def json(self, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        path = self.file(kind, key, "json", lambda tmp: tmp.write_text(json.dumps(compute())))
        return json.loads(path.read_text())


def link_or_copy(source: Path, target: Path) -> None:
    """Place a cache entry in the run folder without copying its bytes where the disk allows."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
