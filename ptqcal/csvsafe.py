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


class _Rows:
    """The file a writer writes to, its rows ended by ``terminator``. The writer itself ends rows with
    ``\\r\\n``, so that a cell holding either character is quoted (with ``\\n`` alone as its row end,
    Python's writer leaves a ``\\r`` unquoted, and a reader splits the row there)."""

    def __init__(self, handle, terminator: str):
        self._handle, self._terminator = handle, terminator

    def write(self, text: str):
        if self._terminator != "\r\n" and text.endswith("\r\n"):  # a row's end: the quoted cells hold the others
            text = text[:-2] + self._terminator
        return self._handle.write(text)


class DictWriter(csv.DictWriter):
    """:class:`csv.DictWriter` whose cells (header included) pass through :func:`safe_cell`, and
    whose cells holding a line break are quoted whatever the row end."""

    def __init__(self, f, fieldnames, restval="", extrasaction="raise", dialect="excel", *args, **kwds):
        terminator = kwds.pop("lineterminator", csv.get_dialect(dialect).lineterminator if isinstance(dialect, str)
                              else dialect.lineterminator)
        super().__init__(_Rows(f, terminator), fieldnames, restval, extrasaction, dialect, *args,
                         lineterminator="\r\n", **kwds)

    def writeheader(self):
        return self.writer.writerow([safe_cell(name) for name in self.fieldnames])

    def writerow(self, rowdict: Mapping[str, Any]):
        return super().writerow({key: safe_cell(value) for key, value in rowdict.items()})

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]):
        for row in rowdicts:
            self.writerow(row)


class _Writer:
    def __init__(self, handle, dialect="excel", **kwargs):
        terminator = kwargs.pop("lineterminator", csv.get_dialect(dialect).lineterminator if isinstance(dialect, str)
                                else dialect.lineterminator)
        self._writer = csv.writer(_Rows(handle, terminator), dialect, lineterminator="\r\n", **kwargs)

    def writerow(self, row: Iterable[Any]):
        return self._writer.writerow([safe_cell(value) for value in row])

    def writerows(self, rows: Iterable[Iterable[Any]]):
        for row in rows:
            self.writerow(row)

    @property
    def dialect(self):
        return self._writer.dialect


def writer(handle, dialect="excel", **kwargs) -> _Writer:
    """:func:`csv.writer` whose cells pass through :func:`safe_cell` (and are quoted when they hold a
    line break)."""
    return _Writer(handle, dialect, **kwargs)
