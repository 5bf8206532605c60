"""The few HTML pieces a report is made of: escaped text, tables, embedded pictures, one stylesheet.

No JavaScript and nothing fetched: a page is one file (pictures as data: URIs) that opens anywhere, offline,
and can be mailed or attached to an issue as it is.
"""
from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import quote

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; background: #fff;
       margin: 0 auto; padding: 16px 28px 48px; max-width: 1240px; }
h1 { font-size: 24px; margin: 4px 0 2px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e3e7ef; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.sub { color: #5b6475; margin: 0 0 10px; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border: 1px solid #d6dbe5; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f9; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.state { font-weight: 600; padding: 1px 7px; border-radius: 9px; white-space: nowrap; }
.fresh { background: #dff3e4; color: #17642e; }
.stale { background: #fff0cc; color: #7a5300; }
.missing { background: #fbe0e0; color: #8f1d1d; }
.in_progress { background: #dcebfb; color: #17457a; }
.damaged { background: #f4dcf4; color: #6e1a6e; }
.yes { color: #17642e; font-weight: 600; }
.no { color: #8f1d1d; font-weight: 600; }
.note { background: #f7f8fb; border-left: 4px solid #c5ccd9; padding: 6px 10px; margin: 8px 0; }
.warn { border-left-color: #d9a400; }
figure { display: inline-block; margin: 6px 14px 12px 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #d6dbe5; }
figure.plot img { border: none; }
.pics { display: flex; flex-wrap: wrap; column-gap: 14px; }
.pics figure { width: 600px; margin-right: 0; }
.pics figure img { width: 100%; }
figcaption { color: #5b6475; font-size: 12.5px; margin-top: 3px; max-width: 1180px; }
details { margin: 6px 0; }
summary { cursor: pointer; color: #2d5fa8; }
pre { background: #f7f8fb; padding: 8px 10px; overflow-x: auto; font-size: 12.5px; }
a { color: #2d5fa8; }
nav a { margin-right: 12px; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, spec: str = ".3f", none: str = "—") -> str:
    """A number for a table cell (``none`` for missing or non-finite ones)."""
    if value is None or isinstance(value, bool):
        return none if value is None else ("yes" if value else "no")
    try:
        v = float(value)
    except (TypeError, ValueError):
        return esc(value)
    return format(v, spec) if math.isfinite(v) else none


def state_badge(state: str) -> str:
    return f'<span class="state {esc(state)}">{esc(state.replace("_", " "))}</span>'


def table(head: Iterable[str], rows: Iterable[Iterable[str]], *, num_cols: Iterable[int] = (),
          attrs: str = "") -> str:
    """A table; ``head`` is text (escaped here), cells are HTML already; ``num_cols`` align right."""
    nums = set(num_cols)
    out = [f"<table{' ' + attrs if attrs else ''}><thead><tr>"
           + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i in nums else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(data: Optional[bytes], caption: str, *, alt: str = "", plot: bool = False) -> str:
    """An embedded PNG with its caption (HTML); a note instead when there is no picture."""
    if data is None:
        return f'<p class="note">{caption} (no picture)</p>'
    cls = ' class="plot"' if plot else ""
    text = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure{cls}><img src="{png_uri(data)}" alt="{esc(alt or caption)}">{text}</figure>'


def gallery(figures: Iterable[str]) -> str:
    """Figures side by side (two to a row on a laptop screen), wrapping."""
    return '<div class="pics">' + "".join(figures) + "</div>"


def read_png(path: Path) -> Optional[bytes]:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def link(target: Path, text: str, base: Path) -> str:
    """A link to a file or folder, relative to the directory ``base`` of the page (so a store copied together
    with its reports keeps working)."""
    rel = os.path.relpath(Path(target).resolve(), Path(base).resolve())
    return f'<a href="{esc(quote(rel.replace(os.sep, "/")))}">{esc(text)}</a>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: a title, a navigation line and ``(anchor, title, body HTML)`` sections."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "\n".join(section(a, t, b) for a, t, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            f'<h1>{esc(title)}</h1><p class="sub">{subtitle}</p><nav>{nav}</nav>\n{body}\n</body></html>\n')
