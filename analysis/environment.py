"""The machine and the versions a report was written with (its last section)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from ptqcal.versions import versions


def cpu_name() -> str:
    """The CPU's model name (Linux), or what :func:`platform.processor` says elsewhere."""
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        return cpu.group(1) if cpu else platform.processor()
    except OSError:
        return platform.processor()


def environment() -> dict[str, str]:
    """Versions and machine the report was written with."""
    import matplotlib
    import numpy

    found = versions()  # onnxruntime, onnx and torch decide the numbers: read, not imported
    info = {"ptqcal": found.pop("ptqcal"), "python": platform.python_version(), "numpy": numpy.__version__,
            "matplotlib": matplotlib.__version__}
    info.update({name: version or "not installed" for name, version in found.items()})
    info.update({"platform": platform.platform(), "cpus": str(os.cpu_count()), "cpu": cpu_name()})
    return info
