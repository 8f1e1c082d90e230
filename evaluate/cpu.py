"""What the CPU's instruction set means for ORT's integer kernels (read from /proc/cpuinfo)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "avx10_1"}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The x86 feature flags of this CPU, or ``None`` where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("flags")), None)
    return frozenset(line.split(":", 1)[1].split()) if line else None


def has_vnni() -> bool | None:
    """Whether ORT's uint8 x int8 kernels can sum in int32 (VNNI) rather than through VPMADDUBSW's
    saturating int16 pairs; ``None`` when unknown (not x86, or no /proc/cpuinfo)."""
    flags = cpu_flags()
    if flags is None:
        return None
    return bool(flags & VNNI_FLAGS) if "avx2" in flags else None
