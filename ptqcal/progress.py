"""Progress bars, alike in every stage (a shared leaf: stages may import it; it imports only tqdm).

A bar shows only on a terminal, never when the run asks for none or ``TQDM_DISABLE`` is set, and
is cleared when done (``leave=False``), so logs and reports stay free of bar residue.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when asked or when ``TQDM_DISABLE`` is set (an explicit argument
    would override tqdm's own reading of it), else ``None``, which shows a bar only on a terminal."""
    wanted_off = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return True if not progress or wanted_off else None


def progress_bar(total: int | None, desc: str, unit: str, progress: bool = True) -> tqdm:
    """A bar of ``total`` ``unit``s (``None``: a count without a total), shown as :func:`bar_disabled` says."""
    return tqdm(total=total, desc=desc, unit=unit, disable=bar_disabled(progress), leave=False)
