"""Tiny HTML helpers for self-contained report pages: inline CSS, PNGs as data URIs, no external assets.

Reports are opened from disk or mailed between hospitals, often offline, so nothing may be fetched.
Every piece of text goes through ``esc`` because site names and notes come from configuration.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:52rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.headline{font-size:1.4rem;font-weight:600}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3}img{max-width:100%}.note{color:#6a4a00}
figure{margin:1rem 0}figcaption{font-size:.9rem;color:#444;margin-top:.3rem}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | None, digits: int = 2) -> str:
    """Number for display; None (not computable) shows as an em dash rather than 'None' or 'nan'."""
    return "\u2014" if value is None else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """p-values below 0.001 are shown as '< 0.001': more digits imply false precision."""
    if p is None:
        return "\u2014"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(p: float | None) -> str:
    """'p = 0.012' / 'p < 0.001' for running text, where a bare '< 0.001' after 'p =' reads badly."""
    shown = fmt_p(p)
    return "p not computable" if p is None else f"p {shown}" if shown.startswith("<") else f"p = {shown}"


def img_png(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def figure(png: bytes | None, alt: str, caption: str, missing: str) -> str:
    """A figure with alt text (for screen readers and broken images) and a plain-language caption.

    When ``png`` is None the figure is replaced by ``missing``, a sentence saying why it is not shown, so a
    reader never wonders whether something failed silently.
    """
    if png is None:
        return f'<p class="note">{esc(missing)}</p>'
    return f"<figure>{img_png(png, alt)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Table with escaped cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def kv_table(d: dict[str, Any]) -> str:
    """Two-column table for metadata; nested values are shown as compact JSON."""
    if not d:
        return "<p>\u2014</p>"
    rows = [(k, json.dumps(v) if isinstance(v, dict | list) else v) for k, v in d.items()]
    return table(("Item", "Value"), rows)


def notes_list(notes: Sequence[str]) -> str:
    if not notes:
        return "<p>None: every statistic could be computed.</p>"
    return "<ul>" + "".join(f'<li class="note">{esc(n)}</li>' for n in notes) + "</ul>"


def page(title: str, body: str) -> str:
    """Complete HTML document; ``body`` must already be escaped HTML."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
