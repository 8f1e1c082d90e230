"""The report's Markdown: text from data made safe inside it, and its small subset rendered as
self-contained HTML (no other module knows Markdown's syntax)."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;font-size:12px;margin:1em 0;display:block;overflow-x:auto}"
              "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
              "td:first-child{text-align:left}img{max-width:100%;height:auto}ul{padding-left:1.2em}"
              "li{margin:.1em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}")

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()!|#<>~])")


def md(text: Any) -> str:
    """Text from data, model files or a run record, safe inside the report's Markdown: one line,
    every Markdown character escaped (so no name or path can become a link, an image or a table)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _inline(s: str) -> str:
    s = re.sub(r"\*\*(.+?)\*\*", lambda m: f"\x00b{m.group(1)}\x00/b", s)  # bold, before unescaping
    s = html.escape(re.sub(r"\\(.)", r"\1", s))
    return s.replace("\x00b", "<b>").replace("\x00/b", "</b>")


def _flush(out: list[str], table: list[list[str]], items: list[str]) -> None:
    """Close the table and the bullet list being collected, if any."""
    if table:
        head, *body = table
        out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                   + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
                   + "</tbody></table>")
        table.clear()
    if items:
        out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
        items.clear()


def markdown_to_html(text: str, figures: dict[str, bytes]) -> str:
    """The report's small Markdown subset (headings, bullets, tables, images) as HTML. Only the
    figures the report drew (``figures``: file name -> PNG bytes) are embedded, as data URIs, so the
    page needs nothing else and no text can make it read a file."""
    out, table, items = [], [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        _flush(out, table, items)
        image = re.fullmatch(r"!\[(.*)\]\(([^()\\]*)\)", line)
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif image and image.group(2) in figures:
            data = base64.b64encode(figures[image.group(2)]).decode()
            out.append(f'<figure><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">'
                       "</figure>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    _flush(out, table, items)
    return f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' " \
           f"content='width=device-width, initial-scale=1'><title>ptqcal report</title><style>{HTML_STYLE}</style>" \
           f"</head><body>{''.join(out)}</body></html>\n"
