"""How one value of a ``ptqcal run`` setting is read from the command line or a config file (a leaf:
:mod:`ptqcal.config` names these as its fields' parsers)."""

from __future__ import annotations

from typing import Any


def parse_bytes(text: Any) -> int:
    """``2G``, ``512M``, ``1.5GB`` or a number of bytes."""
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    number = float(value[:-1] if scale > 1 else value)
    if not (number > 0 and number * scale < 1 << 50):
        raise ValueError(f"not a memory size: {text!r}")
    return int(number * scale)


def percent(text: Any) -> float:
    """A percentage as given (``0.5`` = 0.5%) as a fraction."""
    value = float(text)
    if not 0 <= value <= 100:
        raise ValueError(f"not a percentage: {text!r}")
    return value / 100


GUARD_KINDS = {"differ": "max_differing", "route": "max_routed"}


def parse_guard_target(text: Any) -> tuple[str, float]:
    """``differ=P`` or ``route=P`` (P in percent) as (GuardTarget field, fraction)."""
    kind, _, value = str(text).partition("=")
    if kind.strip() not in GUARD_KINDS:
        raise ValueError(f"not a guard target: {text!r} (give differ=P or route=P, P in percent)")
    return GUARD_KINDS[kind.strip()], percent(value)
