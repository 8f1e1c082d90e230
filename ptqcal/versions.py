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
# Builds of one package published under other distribution names: each installs the same module
BUILDS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                          "onnxruntime-qnn", "ort-nightly"),
          "torch": ("torch", "torch-cpu"),
          "opencv": ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                     "opencv-contrib-python-headless")}


def package_version(name: str) -> str | None:
    """The installed version of package ``name`` (under any of its :data:`BUILDS`' distribution
    names), or ``None`` when it is not installed."""
    for distribution in BUILDS.get(name, (name,)):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions(packages: Iterable[str] = DECIDING) -> dict[str, str | None]:
    """ptqcal's version, then each of ``packages``' (``None``: not installed), in that order."""
    return {"ptqcal": __version__, **{name: package_version(name) for name in packages}}
