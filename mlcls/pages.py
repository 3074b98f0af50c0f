"""HTML that escapes by default, and the one page skeleton of mlcls's reports.

Pages are built with markupsafe: `html(template, ...)` formats a trusted
template and escapes every value put into it unless the value is already
`Markup` (a piece built here, or an SVG chart from `mlcls.charts`), so a
class name, URI or error message shows as text and can never become markup,
and nothing is escaped twice. `join` does the same for a list of pieces.
`page` wraps a body in the skeleton both reports share: doctype, charset,
title, the base style sheet plus a report's own rules, and an optional
script at the end of the body.
"""

from __future__ import annotations

from collections.abc import Iterable

from markupsafe import Markup, escape

__all__ = ["BASE_CSS", "Markup", "escape", "html", "join", "page"]

BASE_CSS = Markup("""
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} h3{font-size:14px;margin:12px 0 6px}
.meta{color:#666;margin-bottom:16px} table{border-collapse:collapse} td,th{padding:2px 10px;text-align:left}
td.n,th.n{text-align:right} tr:nth-child(even){background:#f6f6f6} nav{margin:10px 0} nav a{margin-right:10px}
.warn{color:#b00}
""")
NOTHING = Markup()


def html(template: str, /, *args: object, **kwargs: object) -> Markup:
    """`template` (trusted markup) formatted with `str.format` rules, each value escaped unless it is Markup."""
    return Markup(template).format(*args, **kwargs)


def join(parts: Iterable[object], sep: str = "") -> Markup:
    """The parts joined by `sep` (trusted markup), each escaped unless it is Markup."""
    return Markup(sep).join(parts)


def page(title: str, body: Markup, *, css: Markup = NOTHING, script: Markup = NOTHING) -> str:
    """A whole HTML document: `title` escaped, `body`, `css` and `script` as given (they are Markup)."""
    head = html('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{}</title><style>{}{}</style>'
                "</head>", title, BASE_CSS, css)
    return str(head + html("<body>{}{}</body></html>\n", body, script))
