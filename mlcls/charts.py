"""Two small inline SVG charts for the report: horizontal bars and a probability histogram.

Hand-written SVG rather than a plotting library: a chart is a few hundred
bytes of text inside the page (no image files, no extra dependency, sharp at
any zoom), and a page with hundreds of them still opens instantly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

BAR = "#4c78a8"
MARK = "#e45756"
TEXT = "#333"


def bar_chart(items: Sequence[tuple[str, int]], *, width: int = 720, row: int = 16, label_width: int = 160,
              title: str = "") -> str:
    """Horizontal bars, one per (label, value), longest first as given."""
    height = row * len(items) + 8
    top = max((v for _, v in items), default=0) or 1
    plot = width - label_width - 70
    parts = [_open(width, height, title or "bar chart", "bars")]
    for i, (label, value) in enumerate(items):
        y = 4 + i * row
        w = max(1.0, plot * value / top) if value else 0.0
        parts.append(f'<text x="{label_width - 6}" y="{y + row * 0.72:.1f}" text-anchor="end" font-size="11" '
                     f'fill="{TEXT}">{escape(_short(label, 26))}</text>'
                     f'<rect x="{label_width}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{BAR}">'
                     f'<title>{escape(label)}: {value:,}</title></rect>'
                     f'<text x="{label_width + w + 4:.1f}" y="{y + row * 0.72:.1f}" font-size="11" '
                     f'fill="{TEXT}">{value:,}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(counts: Sequence[int], threshold: float | None, *, width: int = 340, height: int = 120,
              title: str = "") -> str:
    """Counts of probabilities in equal bins over [0, 1], log-scaled, with the threshold as a red line."""
    bins = len(counts)
    left, bottom, plot_w, plot_h = 52, 18, width - 62, height - 30
    top = math.log1p(max(counts, default=0)) or 1.0
    parts = [_open(width, height, title or "probability histogram", "histogram"),
             f'<line x1="{left}" y1="{height - bottom}" x2="{left + plot_w}" y2="{height - bottom}" stroke="#999"/>']
    bw = plot_w / bins
    for i, c in enumerate(counts):
        h = plot_h * math.log1p(c) / top
        parts.append(f'<rect x="{left + i * bw + 0.5:.1f}" y="{height - bottom - h:.1f}" width="{bw - 1:.1f}" '
                     f'height="{h:.1f}" fill="{BAR}"><title>{i / bins:.2f}-{(i + 1) / bins:.2f}: {c:,}</title>'
                     "</rect>")
    for x in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left + x * plot_w:.1f}" y="{height - 4}" font-size="10" text-anchor="middle" '
                     f'fill="{TEXT}">{x:g}</text>')
    parts.append(f'<text x="{left - 4}" y="{height - bottom - plot_h + 8:.1f}" font-size="10" text-anchor="end" '
                 f'fill="{TEXT}">{max(counts, default=0):,}</text>')
    if threshold is not None:
        x = left + threshold * plot_w
        parts.append(f'<line class="threshold" x1="{x:.1f}" y1="{height - bottom - plot_h - 4:.1f}" x2="{x:.1f}" '
                     f'y2="{height - bottom}" stroke="{MARK}" stroke-width="2"><title>threshold {threshold:.3f}'
                     f'</title></line><text x="{x + 3:.1f}" y="10" font-size="10" fill="{MARK}">'
                     f'threshold {threshold:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _open(width: int, height: int, title: str, kind: str) -> str:
    return (f'<svg class="chart {kind}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">')


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
