"""The report's pages as strings: `index.html`, `labels-NNN.html`, `failed.html`.

Plain HTML with one inline style sheet and inline SVG charts; thumbnails are
relative links into `thumbs/`, so the folder opens from disk or any static
host. A few lines of script set `data-images`/`data-broken` on <body> once
the page has loaded (and show a warning if a thumbnail did not load), which
lets a headless browser check the page.
"""

from __future__ import annotations

import math
import os
from html import escape

from mlcls.charts import bar_chart, histogram
from mlcls.output.report_data import PAGE_LABELS, ReportData

BAR_LABELS = 50
INDEX_FAILURES = 50

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} h3{font-size:14px;margin:12px 0 6px}
.meta{color:#666;margin-bottom:16px} .cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px} table{border-collapse:collapse} td,th{padding:2px 10px;text-align:left}
td.n,th.n{text-align:right} tr:nth-child(even){background:#f6f6f6} nav{margin:10px 0}
nav a{margin-right:10px} section.label{border-top:1px solid #ddd;padding-top:6px}
.grid{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;width:124px;font-size:11px;color:#555}
figure img{width:120px;height:120px;object-fit:cover;border:1px solid #ccc;display:block}
figure .missing{width:120px;height:120px;border:1px dashed #c66;display:flex;align-items:center;
justify-content:center;color:#c66} figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start} .warn{color:#b00}
"""

CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  document.body.dataset.images = imgs.length;
  document.body.dataset.broken = broken.length;
  document.body.dataset.charts = document.querySelectorAll("svg.chart").length;
  if (broken.length) {
    var p = document.createElement("p"); p.className = "warn";
    p.textContent = broken.length + " thumbnails did not load (moved or deleted?)";
    document.body.insertBefore(p, document.body.firstChild);
  }
});
</script>"""


def render_pages(data: ReportData) -> dict[str, str]:
    """Page name -> HTML, `index.html` first."""
    pages = {"index.html": _page("mlcls report", _index_body(data))}
    chunks = [data.detailed[i:i + PAGE_LABELS] for i in range(0, len(data.detailed), PAGE_LABELS)]
    for n, chunk in enumerate(chunks, 1):
        nav = _nav(n, len(chunks))
        body = nav + "".join(_label_section(data, label) for label in chunk) + nav
        pages[_label_page(n)] = _page(f"mlcls report: labels page {n}", body)
    pages["failed.html"] = _page("mlcls report: failed files", _failed_body(data))
    return pages


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}{CHECK}</body></html>\n")


def _label_page(n: int) -> str:
    return f"labels-{n:03d}.html"


def _anchor(data: ReportData, label: str) -> str:
    """Link to a label's section, or '' if it has none."""
    if label not in data.detailed:
        return ""
    i = data.detailed.index(label)
    return f"{_label_page(i // PAGE_LABELS + 1)}#label-{i}"


def _index_body(data: ReportData) -> str:
    s = data.stats
    cards = [("images", s.images), ("tagged", s.tagged), ("errors", sum(s.errors.values())),
             ("labels in use", sum(1 for x in s.labels if x.images)), ("no label", s.unlabelled),
             ("superseded rows", s.superseded)]
    models = ", ".join(f"{escape(m)} ({n:,})" for m, n in s.models.items())
    bars = [(x.label, x.images) for x in s.labels[:BAR_LABELS]]
    more = len(s.labels) - len(bars)
    return "".join([
        "<h1>mlcls report</h1>",
        f'<div class="meta">{escape(s.out)}: {s.parts} part files; model {models}; probabilities '
        f"{escape(s.probs)}; generated {escape(data.generated)}</div>",
        '<div class="cards">', *(f'<div class="card"><b>{v:,}</b>{k}</div>' for k, v in cards), "</div>",
        _links(data),
        "<h2>Images per label</h2>", bar_chart(bars, title="images per label"),
        f"<p>{more} more labels in the table below.</p>" if more > 0 else "",
        "<h2>Labels</h2>", _label_table(data),
        "<h2>Labels that occur together</h2>", _pairs_table(data),
        "<h2>Errors</h2>", _errors(data, INDEX_FAILURES),
    ])


def _links(data: ReportData) -> str:
    pages = -(-len(data.detailed) // PAGE_LABELS)
    links = " ".join(f'<a href="{_label_page(n)}">labels page {n}</a>' for n in range(1, pages + 1))
    return f'<nav>{links} <a href="failed.html">failed files</a></nav>'


def _label_table(data: ReportData) -> str:
    s = data.stats
    rows = []
    for x in s.labels:
        href = _anchor(data, x.label)
        name = f'<a href="{href}">{escape(x.label)}</a>' if href else escape(x.label)
        mean = f"{x.mean_prob:.3f}" if x.mean_prob is not None else "-"
        share = f"{x.images / s.tagged:.1%}" if s.tagged else "-"
        rows.append(f'<tr><td>{name}</td><td class="n">{x.images:,}</td><td class="n">{share}</td>'
                    f'<td class="n">{mean}</td><td class="n">{x.threshold:.3f}</td></tr>')
    return ('<table class="labels"><tr><th>label</th><th class="n">images</th><th class="n">share of tagged</th>'
            '<th class="n">mean probability</th><th class="n">threshold</th></tr>' + "".join(rows) + "</table>")


def _pairs_table(data: ReportData) -> str:
    if not data.stats.pairs:
        return "<p>No image holds two labels.</p>"
    rows = "".join(f'<tr><td>{escape(a)} + {escape(b)}</td><td class="n">{n:,}</td></tr>'
                   for a, b, n in data.stats.pairs)
    return f'<table><tr><th>pair</th><th class="n">images</th></tr>{rows}</table>'


def _errors(data: ReportData, limit: int) -> str:
    s, f = data.stats, data.failures
    if not f.total:
        return "<p>No file failed.</p>"
    kinds = "".join(f'<tr><td>{escape(k)}</td><td class="n">{n:,}</td></tr>' for k, n in s.errors.items())
    shown = f.items[:limit]
    rows = "".join(f"<tr><td>{escape(u)}</td><td>{escape(e)}</td></tr>" for u, e in shown)
    more = f'<p><a href="failed.html">all {f.total:,} failed files</a></p>' if f.total > len(shown) else ""
    return (f'<table><tr><th>kind</th><th class="n">files</th></tr>{kinds}</table>'
            f'<h3>Failed files</h3><table class="failed"><tr><th>file</th><th>error</th></tr>{rows}</table>{more}')


def _failed_body(data: ReportData) -> str:
    f = data.failures
    note = f" (the first {len(f.items):,})" if f.total > len(f.items) else ""
    return (f'<h1>Failed files</h1><nav><a href="index.html">report</a></nav><p>{f.total:,} files failed{note}.</p>'
            + _errors(data, len(f.items)))


def _nav(n: int, pages: int) -> str:
    prev = f'<a href="{_label_page(n - 1)}">previous</a>' if n > 1 else ""
    nxt = f'<a href="{_label_page(n + 1)}">next</a>' if n < pages else ""
    return f'<nav><a href="index.html">report</a> {prev} labels page {n} of {pages} {nxt}</nav>'


def _label_section(data: ReportData, label: str) -> str:
    j = data.dataset.classes.index(label)
    stat = next(x for x in data.stats.labels if x.label == label)
    threshold = stat.threshold
    mean = f", mean probability {stat.mean_prob:.3f}" if stat.mean_prob is not None else ""
    chart = histogram(data.histograms.counts[j].tolist(), threshold, title=f"{label} probabilities")
    top = _grid(data, data.tops.images("top", j), f"Highest scoring: {label}")
    near = _grid(data, data.tops.images("near", j), f"Just under the threshold ({threshold:.2f}): {label}",
                 empty="none between half the threshold and the threshold")
    return (f'<section class="label" id="label-{data.detailed.index(label)}"><h2>{escape(label)}</h2>'
            f"<p>{stat.images:,} images, threshold {threshold:.3f}{mean}</p>"
            f'<div class="row"><div><h3>Probability over all tagged images (log scale)</h3>{chart}</div>'
            f"<div>{top}{near}</div></div></section>")


def _grid(data: ReportData, images: list[tuple[str, float]], title: str, empty: str = "none") -> str:
    if not images:
        return f"<h3>{escape(title)}</h3><p>{escape(empty)}</p>"
    figures = []
    for uri, p in images:
        name = escape(os.path.basename(uri.rstrip("/")) or uri)
        thumb = data.thumbs.get(uri)
        pic = (f'<img src="{escape(thumb)}" alt="{name}">' if thumb
               else '<div class="missing">unreadable</div>')
        shown = math.floor(p * 1000) / 1000  # truncated: a near miss at 0.4999 must not read as 0.500
        figures.append(f'<figure title="{escape(uri)}">{pic}<figcaption>{shown:.3f} {name}</figcaption></figure>')
    return f'<h3>{escape(title)}</h3><div class="grid">{"".join(figures)}</div>'
