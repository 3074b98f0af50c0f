"""The reports' charts as small inline SVG: horizontal bars, a probability histogram, line charts.

Hand-written SVG rather than a plotting library: a chart is a few hundred
bytes of text inside the page (no image files, no extra dependency, sharp at
any zoom), and a page with hundreds of them still opens instantly. Every
chart is `Markup` built with `mlcls.pages.html`, so labels are escaped once
and the chart goes into a page as it is; it is also a well-formed
standalone SVG file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mlcls.pages import Markup, html, join

BAR = "#4c78a8"
MARK = "#e45756"
TEXT = "#333"
GRID = "#e4e4e4"
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac")
DASH = "5 3"


@dataclass(frozen=True)
class Series:
    """One line of a line chart: (x, y) points in [0, 1]; `marks` are drawn as dots; `step` holds each y
    until the next x (a precision-recall curve)."""

    label: str
    points: Sequence[tuple[float, float]]
    marks: Sequence[tuple[float, float]] = ()
    step: bool = False


@dataclass(frozen=True)
class Rule:
    """A dashed reference line at `value`: vertical in a bar chart, horizontal in a line chart."""

    label: str
    value: float


def bar_chart(items: Sequence[tuple[str, float]], *, width: int = 720, row: int = 16, label_width: int = 160,
              title: str = "", fmt: str = ",", top: float | None = None, notes: Sequence[str] = (),
              rule: Rule | None = None) -> Markup:
    """Horizontal bars, one per (label, value), top to bottom as given; each value written with the format
    spec `fmt` and its note, if any; bars scaled to `top` (default: the largest value)."""
    head = row if rule else 0
    height = head + row * len(items) + 8
    top = top or max((v for _, v in items), default=0) or 1
    plot = width - label_width - 70 - 7 * max(map(len, notes), default=0)
    bars = [_bar(label, value, 4 + head + i * row, row, label_width, plot * value / top, fmt,
                 notes[i] if i < len(notes) else "") for i, (label, value) in enumerate(items)]
    marked = _bar_rule(rule, label_width + plot * rule.value / top, row, height) if rule else ""
    return _svg(width, height, title or "bar chart", "bars", [*bars, marked])


def _bar(label: str, value: float, y: float, row: int, x: int, w: float, fmt: str, note: str) -> Markup:
    w = max(1.0, w) if value else 0.0
    shown = format(value, fmt) + (f" {note}" if note else "")
    return html('<text x="{}" y="{:.1f}" text-anchor="end" font-size="11" fill="{text}">{}</text>'
                '<rect x="{}" y="{}" width="{:.1f}" height="{}" fill="{bar}"><title>{}: {}</title></rect>'
                '<text x="{:.1f}" y="{:.1f}" font-size="11" fill="{text}">{}</text>',
                x - 6, y + row * 0.72, _short(label, 26), x, y + 2, w, row - 4, label, shown, x + w + 4,
                y + row * 0.72, shown, text=TEXT, bar=BAR)


def _bar_rule(rule: Rule, x: float, row: int, height: int) -> Markup:
    if not math.isfinite(rule.value):
        return Markup()
    return html('<line class="rule" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="{mark}" '
                'stroke-width="1.5" stroke-dasharray="{dash}"><title>{label}</title></line>'
                '<text x="{tx:.1f}" y="{ty:.1f}" font-size="11" fill="{mark}">{label}</text>',
                x=x, top=row - 2, bottom=height - 4, tx=x + 4, ty=row * 0.72, mark=MARK, dash=DASH,
                label=rule.label)


def histogram(counts: Sequence[int], threshold: float | None, *, width: int = 340, height: int = 120,
              title: str = "") -> Markup:
    """Counts of probabilities in equal bins over [0, 1], log-scaled, with the threshold as a red line."""
    bins = len(counts)
    left, bottom, plot_w, plot_h = 52, 18, width - 62, height - 30
    top = math.log1p(max(counts, default=0)) or 1.0
    base = height - bottom
    parts = [html('<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999"/>', left, base, left + plot_w, base)]
    bw = plot_w / bins
    for i, c in enumerate(counts):
        h = plot_h * math.log1p(c) / top
        parts.append(html('<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="{}">'
                          "<title>{:.2f}-{:.2f}: {:,}</title></rect>",
                          left + i * bw + 0.5, base - h, bw - 1, h, BAR, i / bins, (i + 1) / bins, c))
    parts += [html('<text x="{:.1f}" y="{}" font-size="10" text-anchor="middle" fill="{}">{:g}</text>',
                   left + x * plot_w, height - 4, TEXT, x) for x in (0.0, 0.5, 1.0)]
    parts.append(html('<text x="{}" y="{:.1f}" font-size="10" text-anchor="end" fill="{}">{:,}</text>',
                      left - 4, base - plot_h + 8, TEXT, max(counts, default=0)))
    if threshold is not None:
        parts.append(_threshold(left + threshold * plot_w, base - plot_h - 4, base, threshold))
    return _svg(width, height, title or "probability histogram", "histogram", parts)


def _threshold(x: float, y1: float, y2: float, threshold: float) -> Markup:
    return html('<line class="threshold" x1="{x:.1f}" y1="{y1:.1f}" x2="{x:.1f}" y2="{y2}" stroke="{mark}" '
                'stroke-width="2"><title>threshold {t:.3f}</title></line>'
                '<text x="{tx:.1f}" y="10" font-size="10" fill="{mark}">threshold {t:.2f}</text>',
                x=x, y1=y1, y2=y2, mark=MARK, t=threshold, tx=x + 3)


@dataclass(frozen=True)
class _Frame:
    """Where [0, 1] x [0, 1] lies in a line chart."""

    left: float
    top: float
    width: float
    height: float

    def x(self, v: float) -> float:
        return self.left + v * self.width

    def y(self, v: float) -> float:
        return self.top + (1 - v) * self.height


def line_chart(series: Sequence[Series], *, rules: Sequence[Rule] = (), x_label: str = "", y_label: str = "",
               width: int = 640, height: int = 360, title: str = "") -> Markup:
    """Lines over [0, 1] x [0, 1], a colour each, with dots at their marks, dashed horizontal `rules`,
    axes with ticks every 0.2, and a legend below the plot (one row per line and rule)."""
    frame = _Frame(left=52, top=10, width=width - 68, height=height - 56)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    rules = [r for r in rules if math.isfinite(r.value)]
    legend = [(s.label, c, "") for s, c in zip(series, colours, strict=True)] + [(r.label, MARK, DASH) for r in rules]
    parts = [_axes(frame, x_label, y_label),
             *(_line(s, c, frame) for s, c in zip(series, colours, strict=True)),
             *(_hline(r, frame) for r in rules),
             *(_legend_row(label, c, dash, frame.left, height + 14 * i) for i, (label, c, dash) in enumerate(legend))]
    return _svg(width, height + 14 * len(legend) + 4, title or "line chart", "lines", parts)


def _axes(f: _Frame, x_label: str, y_label: str) -> Markup:
    ticks = [i / 5 for i in range(6)]
    grid = [html('<line x1="{x:.1f}" y1="{t:.1f}" x2="{x:.1f}" y2="{b:.1f}" stroke="{g}"/>'
                 '<line x1="{l:.1f}" y1="{y:.1f}" x2="{r:.1f}" y2="{y:.1f}" stroke="{g}"/>'
                 '<text x="{x:.1f}" y="{tb:.1f}" font-size="10" text-anchor="middle" fill="{c}">{v:g}</text>'
                 '<text x="{tl:.1f}" y="{ty:.1f}" font-size="10" text-anchor="end" fill="{c}">{v:g}</text>',
                 x=f.x(v), y=f.y(v), t=f.top, b=f.y(0), l=f.left, r=f.x(1), tb=f.y(0) + 13, tl=f.left - 5,
                 ty=f.y(v) + 3.5, v=v, g=GRID, c=TEXT) for v in ticks]
    labels = html('<text x="{:.1f}" y="{:.1f}" font-size="11" text-anchor="middle" fill="{c}">{}</text>'
                  '<text transform="translate(14 {:.1f}) rotate(-90)" font-size="11" text-anchor="middle" '
                  'fill="{c}">{}</text>', f.x(0.5), f.y(0) + 28, x_label, f.y(0.5), y_label, c=TEXT)
    frame = html('<path d="M{:.1f} {:.1f}V{:.1f}H{:.1f}" fill="none" stroke="#999"/>', f.left, f.top, f.y(0), f.x(1))
    return join([*grid, frame, labels])


def _line(s: Series, colour: str, f: _Frame) -> Markup:
    points = _path_points([(f.x(x), f.y(y)) for x, y in _steps(s.points, s.step)])
    d = "M" + "L".join(f"{x:g} {y:g}" for x, y in points) if points else ""
    dots = [html('<circle cx="{:.1f}" cy="{:.1f}" r="3.5" fill="{}"><title>{}: ({:.3f}, {:.3f})</title></circle>',
                 f.x(x), f.y(y), colour, s.label, x, y) for x, y in s.marks if math.isfinite(x) and math.isfinite(y)]
    line = html('<path d="{}" fill="none" stroke="{}" stroke-width="1.5"><title>{}</title></path>', d, colour,
                s.label) if d else Markup()
    return join([line, *dots])


def _steps(points: Sequence[tuple[float, float]], step: bool) -> list[tuple[float, float]]:
    """The finite points; with `step`, a corner before each new x so each y holds until the next x."""
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not step:
        return finite
    out = finite[:1]
    for x, y in finite[1:]:
        out += [(x, out[-1][1]), (x, y)]
    return out


def _path_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points rounded to half a pixel, without repeats or the inner points of horizontal and vertical runs:
    a PR curve over any number of images stays a few thousand points at most."""
    rounded = [(round(x * 2) / 2, round(y * 2) / 2) for x, y in points]
    out: list[tuple[float, float]] = []
    for p in rounded:
        if out and p == out[-1]:
            continue
        if len(out) >= 2 and (out[-2][0] == out[-1][0] == p[0] or out[-2][1] == out[-1][1] == p[1]):
            out[-1] = p
        else:
            out.append(p)
    return out


def _hline(rule: Rule, f: _Frame) -> Markup:
    return html('<line class="rule" x1="{:.1f}" y1="{y:.1f}" x2="{:.1f}" y2="{y:.1f}" stroke="{}" '
                'stroke-width="1.5" stroke-dasharray="{}"><title>{}</title></line>',
                f.x(0), f.x(1), MARK, DASH, rule.label, y=f.y(rule.value))


def _legend_row(label: str, colour: str, dash: str, x: float, y: float) -> Markup:
    return html('<line x1="{:.1f}" y1="{y:.1f}" x2="{:.1f}" y2="{y:.1f}" stroke="{c}" stroke-width="2"{dash}/>'
                '<text x="{:.1f}" y="{:.1f}" font-size="11" fill="{t}">{}</text>',
                x, x + 22, x + 28, y + 3.5, label, y=y, c=colour, t=TEXT,
                dash=html(' stroke-dasharray="{}"', dash) if dash else "")


def _svg(width: int, height: int, title: str, kind: str, parts: Sequence[Markup | str]) -> Markup:
    return html('<svg class="chart {}" xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" '
                'viewBox="0 0 {} {}" font-family="system-ui,sans-serif" role="img" aria-label="{}">{}</svg>',
                kind, width, height, width, height, title, join(parts))


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
