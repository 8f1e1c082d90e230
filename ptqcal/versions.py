"""Which versions of ptqcal and its dependencies are installed (a shared leaf: it imports none of them).

Versions are read from the packages' metadata, never by importing them: the report must say which
onnxruntime and torch decide a run's numbers without importing either, and a version check must
not cost a framework's import time.
"""

from __future__ import annotations

from importlib import metadata
from typing import Iterable

from . import __version__

DECIDING = ("onnxruntime", "onnx", "torch")  # the packages whose versions decide the numbers


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or ``None`` when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(packages: Iterable[str] = DECIDING) -> dict[str, str | None]:
    """ptqcal's version, then each of ``packages``' (``None``: not installed), in that order."""
    return {"ptqcal": __version__, **{name: package_version(name) for name in packages}}
