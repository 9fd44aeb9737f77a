"""HTML pieces of the report: escaping, number formatting, tables, sections and the page's inline CSS."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d2430;background:#fff}
main{max-width:1120px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:24px;margin:4px 0 2px}h2{font-size:19px;margin:30px 0 8px;padding-bottom:4px;border-bottom:2px solid #dfe5ee}
h3{font-size:16px;margin:18px 0 4px}h4{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #dde2ea;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f4f8;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#5b6678;font-size:12.5px;margin:2px 0}.none{color:#5b6678;font-style:italic}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #dde2ea;border-radius:6px;padding:8px 14px;min-width:120px;background:#f8fafc}
.card b{display:block;font-size:20px}.card span{color:#5b6678;font-size:12px}
.pass{color:#2d7a47;font-weight:600}.fail{color:#b03a22;font-weight:600}
tr.chosen td{background:#eef7f0}img{max-width:100%;margin:6px 0}
.suite{margin-bottom:18px}details{margin:6px 0}summary{cursor:pointer;color:#3b6fb6}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px}
"""


class Markup(str):
    """HTML that `table` puts in a cell as it is (already escaped by whoever built it)."""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers as people read them: ints with thousands separators, floats to 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def cell(value: Any, numeric: bool = False) -> str:
    if isinstance(value, Markup):
        return f"<td>{value}</td>"
    text = value if isinstance(value, str) else fmt(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class=num>{esc(text)}</td>" if numeric or number else f"<td>{esc(text)}</td>"


def table(headers: list[str], rows: Iterable[list[Any]], numeric: tuple[int, ...] = (),
          row_class: list[str] | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers) if any(headers) else ""  # key/value tables: no header
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(row_class[i])}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>" + "".join(cell(v, j in numeric) for j, v in enumerate(row)) + "</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def note(text: str) -> str:
    """The one line a section without data shows instead of vanishing."""
    return f"<p class=none>{esc(text)}</p>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def cards(items: list[tuple[str, str]]) -> str:
    return "<div class=cards>" + "".join(f"<div class=card><b>{esc(v)}</b><span>{esc(k)}</span></div>"
                                         for k, v in items) + "</div>"


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body><main>\n{body}\n</main></body></html>\n")
