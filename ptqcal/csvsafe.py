"""CSV writers whose cells a spreadsheet never runs (a shared leaf: it imports only the standard library).

Text in ptqcal's CSV files comes from data: a model's file name, an ONNX node's name, a dataset's
name. A spreadsheet reads a cell that starts with ``=``, ``+``, ``-`` or ``@`` (or a tab or carriage
return before one) as a formula, and a formula can run commands (``=cmd|' /C calc'!A0``). As OWASP
recommends, such a cell is written with a single quote in front, which spreadsheets show as text.
Numbers stay numbers: a ``float``/``int`` (``-0.5``) and a string that is a plain decimal number
(``"-0.5"``, ``"-1e-3"``) are written as they are.

:class:`DictWriter` and :func:`writer` are drop-ins for :class:`csv.DictWriter` and
:func:`csv.writer`.
"""

from __future__ import annotations

import csv
import re
from numbers import Number
from typing import Any, Iterable, Mapping

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# a plain decimal number as csv writes Python numbers, and as spreadsheets read them: never a formula
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


def is_number_text(text: str) -> bool:
    """Whether ``text`` is a plain decimal number (``-0.5``, ``1e-3``, ``-inf``)."""
    return _NUMBER.fullmatch(text) is not None


def safe_cell(value: Any) -> Any:
    """``value`` as a cell no spreadsheet evaluates: numbers as they are, text that could start a
    formula with a single quote in front."""
    if value is None or isinstance(value, (bool, Number)):
        return value
    text = value if isinstance(value, str) else str(value)
    if text.startswith(FORMULA_STARTS) and not is_number_text(text):
        return "'" + text
    return text


class DictWriter(csv.DictWriter):
    """:class:`csv.DictWriter` whose cells (header included) pass through :func:`safe_cell`."""

    def writeheader(self):
        return self.writer.writerow([safe_cell(name) for name in self.fieldnames])

    def writerow(self, rowdict: Mapping[str, Any]):
        return super().writerow({key: safe_cell(value) for key, value in rowdict.items()})

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]):
        for row in rowdicts:
            self.writerow(row)


class _Writer:
    def __init__(self, handle, *args, **kwargs):
        self._writer = csv.writer(handle, *args, **kwargs)

    def writerow(self, row: Iterable[Any]):
        return self._writer.writerow([safe_cell(value) for value in row])

    def writerows(self, rows: Iterable[Iterable[Any]]):
        for row in rows:
            self.writerow(row)

    @property
    def dialect(self):
        return self._writer.dialect


def writer(handle, *args, **kwargs) -> _Writer:
    """:func:`csv.writer` whose cells pass through :func:`safe_cell`."""
    return _Writer(handle, *args, **kwargs)
