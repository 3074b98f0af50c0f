"""The report's pages as strings: `index.html`, `labels-NNN.html`, `failed.html`.

Built with `mlcls.pages` (every value escaped unless it is markup) on its
shared page skeleton, with inline SVG charts from `mlcls.charts`; thumbnails are
relative links into `thumbs/`, so the folder opens from disk or any static
host. A few lines of script set `data-images`/`data-broken` on <body> once
the page has loaded (and show a warning if a thumbnail did not load), which
lets a headless browser check the page.
"""

from __future__ import annotations

import math
import os

from mlcls.charts import bar_chart, histogram
from mlcls.output.report_data import PAGE_LABELS, ReportData
from mlcls.pages import Markup, html, join, page

BAR_LABELS = 50
INDEX_FAILURES = 50

CSS = Markup("""
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;
min-width:110px} .card b{display:block;font-size:20px} section.label{border-top:1px solid #ddd;padding-top:6px}
.grid{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;width:124px;font-size:11px;color:#555}
figure img{width:120px;height:120px;object-fit:cover;border:1px solid #ccc;display:block}
figure .missing{width:120px;height:120px;border:1px dashed #c66;display:flex;align-items:center;
justify-content:center;color:#c66} figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
""")

CHECK = Markup("""<script>
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
</script>""")


def render_pages(data: ReportData) -> dict[str, str]:
    """Page name -> HTML, `index.html` first."""
    pages = {"index.html": _page("mlcls report", _index_body(data))}
    chunks = [data.detailed[i:i + PAGE_LABELS] for i in range(0, len(data.detailed), PAGE_LABELS)]
    for n, chunk in enumerate(chunks, 1):
        nav = _nav(n, len(chunks))
        body = join([nav, *(_label_section(data, label) for label in chunk), nav])
        pages[_label_page(n)] = _page(f"mlcls report: labels page {n}", body)
    pages["failed.html"] = _page("mlcls report: failed files", _failed_body(data))
    return pages


def _page(title: str, body: Markup) -> str:
    return page(title, body, css=CSS, script=CHECK)


def _label_page(n: int) -> str:
    return f"labels-{n:03d}.html"


def _anchor(data: ReportData, label: str) -> str:
    """Link to a label's section, or '' if it has none."""
    if label not in data.detailed:
        return ""
    i = data.detailed.index(label)
    return f"{_label_page(i // PAGE_LABELS + 1)}#label-{i}"


def _index_body(data: ReportData) -> Markup:
    s = data.stats
    cards = [("images", s.images), ("tagged", s.tagged), ("errors", sum(s.errors.values())),
             ("labels in use", sum(1 for x in s.labels if x.images)), ("no label", s.unlabelled),
             ("table version", s.version)]
    models = ", ".join(f"{m} ({n:,})" for m, n in s.models.items())
    bars = [(x.label, x.images) for x in s.labels[:BAR_LABELS]]
    more = len(s.labels) - len(bars)
    return join([
        Markup("<h1>mlcls report</h1>"),
        html('<div class="meta">{}: {} part files; model {}; probabilities {}; generated {}</div>',
             s.out, s.parts, models, s.probs, data.generated),
        html('<div class="cards">{}</div>', join(html('<div class="card"><b>{:,}</b>{}</div>', v, k)
                                                 for k, v in cards)),
        _links(data),
        Markup("<h2>Images per label</h2>"), bar_chart(bars, title="images per label"),
        html("<p>{} more labels in the table below.</p>", more) if more > 0 else "",
        Markup("<h2>Labels</h2>"), _label_table(data),
        Markup("<h2>Labels that occur together</h2>"), _pairs_table(data),
        Markup("<h2>Errors</h2>"), _errors(data, INDEX_FAILURES),
    ])


def _links(data: ReportData) -> Markup:
    pages = -(-len(data.detailed) // PAGE_LABELS)
    links = join((html('<a href="{0}">labels page {1}</a>', _label_page(n), n) for n in range(1, pages + 1)), " ")
    return html('<nav>{} <a href="failed.html">failed files</a></nav>', links)


def _label_table(data: ReportData) -> Markup:
    s = data.stats
    rows = []
    for x in s.labels:
        href = _anchor(data, x.label)
        name = html('<a href="{}">{}</a>', href, x.label) if href else x.label
        mean = f"{x.mean_prob:.3f}" if x.mean_prob is not None else "-"
        share = f"{x.images / s.tagged:.1%}" if s.tagged else "-"
        rows.append(html('<tr><td>{}</td><td class="n">{:,}</td><td class="n">{}</td><td class="n">{}</td>'
                         '<td class="n">{:.3f}</td></tr>', name, x.images, share, mean, x.threshold))
    return html('<table class="labels"><tr><th>label</th><th class="n">images</th><th class="n">share of tagged'
                '</th><th class="n">mean probability</th><th class="n">threshold</th></tr>{}</table>', join(rows))


def _pairs_table(data: ReportData) -> Markup:
    if not data.stats.pairs:
        return Markup("<p>No image holds two labels.</p>")
    rows = join(html('<tr><td>{} + {}</td><td class="n">{:,}</td></tr>', a, b, n) for a, b, n in data.stats.pairs)
    return html('<table><tr><th>pair</th><th class="n">images</th></tr>{}</table>', rows)


def _errors(data: ReportData, limit: int) -> Markup:
    s, f = data.stats, data.failures
    if not f.total:
        return Markup("<p>No file failed.</p>")
    kinds = join(html('<tr><td>{}</td><td class="n">{:,}</td></tr>', k, n) for k, n in s.errors.items())
    shown = f.items[:limit]
    rows = join(html("<tr><td>{}</td><td>{}</td></tr>", u, e) for u, e in shown)
    more = html('<p><a href="failed.html">all {:,} failed files</a></p>', f.total) if f.total > len(shown) else ""
    return html('<table><tr><th>kind</th><th class="n">files</th></tr>{}</table><h3>Failed files</h3>'
                '<table class="failed"><tr><th>file</th><th>error</th></tr>{}</table>{}', kinds, rows, more)


def _failed_body(data: ReportData) -> Markup:
    f = data.failures
    note = f" (the first {len(f.items):,})" if f.total > len(f.items) else ""
    return html('<h1>Failed files</h1><nav><a href="index.html">report</a></nav><p>{:,} files failed{}.</p>{}',
                f.total, note, _errors(data, len(f.items)))


def _nav(n: int, pages: int) -> Markup:
    prev = html('<a href="{}">previous</a>', _label_page(n - 1)) if n > 1 else ""
    nxt = html('<a href="{}">next</a>', _label_page(n + 1)) if n < pages else ""
    return html('<nav><a href="index.html">report</a> {} labels page {} of {} {}</nav>', prev, n, pages, nxt)


def _label_section(data: ReportData, label: str) -> Markup:
    j = data.dataset.classes.index(label)
    stat = next(x for x in data.stats.labels if x.label == label)
    threshold = stat.threshold
    mean = f", mean probability {stat.mean_prob:.3f}" if stat.mean_prob is not None else ""
    chart = histogram(data.histograms.counts[j].tolist(), threshold, title=f"{label} probabilities")
    top = _grid(data, data.tops.images("top", j), f"Highest scoring: {label}")
    near = _grid(data, data.tops.images("near", j), f"Just under the threshold ({threshold:.2f}): {label}",
                 empty="none between half the threshold and the threshold")
    return html('<section class="label" id="label-{}"><h2>{}</h2><p>{:,} images, threshold {:.3f}{}</p>'
                '<div class="row"><div><h3>Probability over all tagged images (log scale)</h3>{}</div>'
                "<div>{}{}</div></div></section>",
                data.detailed.index(label), label, stat.images, threshold, mean, chart, top, near)


def _grid(data: ReportData, images: list[tuple[str, float]], title: str, empty: str = "none") -> Markup:
    if not images:
        return html("<h3>{}</h3><p>{}</p>", title, empty)
    figures = []
    for uri, p in images:
        name = os.path.basename(uri.rstrip("/")) or uri
        thumb = data.thumbs.get(uri)
        pic = html('<img src="{}" alt="{}">', thumb, name) if thumb else Markup('<div class="missing">unreadable</div>')
        shown = math.floor(p * 1000) / 1000  # truncated: a near miss at 0.4999 must not read as 0.500
        figures.append(html('<figure title="{}">{}<figcaption>{:.3f} {}</figcaption></figure>', uri, pic, shown, name))
    return html('<h3>{}</h3><div class="grid">{}</div>', title, join(figures))
