"""`mlcls.pages` and `mlcls.charts`: values are escaped once, markup stays markup, charts are well-formed SVG."""

from __future__ import annotations

import math
import re
import types
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from mlcls.charts import Rule, Series, bar_chart, histogram, line_chart
from mlcls.output.report import write_output_report
from mlcls.pages import Markup, html, join, page
from mlcls.train.eval_report import write_eval_report
from mlcls.train.scoring import Scored, report_metrics
from tests.helpers.outputs import write_synthetic

SCRIPT = "<script>alert(1)</script>"
AMP = 'a&b "q"'
CLASSES = ["cat", AMP, SCRIPT, "sky blue"]
SVG = "{http://www.w3.org/2000/svg}"


def test_html_escapes_values_but_not_markup_or_the_template():
    assert html("<b>{}</b>", SCRIPT) == "<b>&lt;script&gt;alert(1)&lt;/script&gt;</b>"
    assert html('<a title="{t}">{n:,}</a>', t=AMP, n=1234) == '<a title="a&amp;b &#34;q&#34;">1,234</a>'
    inner = html("<i>{}</i>", AMP)
    assert html("<p>{}</p>", inner) == "<p><i>a&amp;b &#34;q&#34;</i></p>"  # not escaped twice
    assert isinstance(inner, Markup) and html("{:.2f}", 0.5) == "0.50"
    assert join([inner, "<b>"], "<br>") == "<i>a&amp;b &#34;q&#34;</i><br>&lt;b&gt;"


def test_page_escapes_the_title_and_keeps_css_body_and_script():
    doc = page(SCRIPT, html("<p>{}</p>", AMP), css=Markup("p>b{color:red}"), script=Markup("<script>x()</script>"))
    assert doc.startswith('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>&lt;script&gt;')
    assert "p>b{color:red}</style>" in doc and "<p>a&amp;b &#34;q&#34;</p><script>x()</script></body>" in doc
    assert "body{font:" in doc and type(doc) is str


def _texts(svg: str) -> list[str]:
    root = ElementTree.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return ["".join(e.itertext()) for e in root.iter() if e.tag in (f"{SVG}text", f"{SVG}title")]


def test_every_chart_is_well_formed_svg_with_its_labels_escaped():
    bars = bar_chart([(SCRIPT, 3), (AMP, 1)], title=AMP)
    assert isinstance(bars, Markup) and SCRIPT not in bars
    assert f"{SCRIPT}: 3" in _texts(bars) and f"{AMP}: 1" in _texts(bars)
    assert ElementTree.fromstring(bars).get("aria-label") == AMP
    ap = bar_chart([(AMP, 0.25)], fmt=".3f", top=1.0, notes=["(7)"], rule=Rule(f"mAP {SCRIPT}", 0.25))
    assert "0.250 (7)" in _texts(ap) and f"mAP {SCRIPT}" in _texts(ap)
    hist = histogram([0, 5, 100, 0], 0.5, title=SCRIPT)
    assert "threshold 0.500" in _texts(hist) and "0.25-0.50: 5" in _texts(hist)
    lines = line_chart([Series(SCRIPT, [(0, 1), (0.5, 0.5), (1, math.nan)], marks=[(0.5, 0.5), (math.nan, 1)],
                               step=True), Series(AMP, [(0, 0), (1, 1)])],
                       rules=[Rule(AMP, 0.5), Rule("undefined", math.nan)], x_label="x <", y_label="y &")
    texts = _texts(lines)
    assert texts.count(SCRIPT) == 2 and texts.count(AMP) == 4 and "x <" in texts and "y &" in texts
    assert "undefined" not in texts and "nan" not in lines  # undefined points, marks and rules are left out
    assert lines.count("<circle") == 1 and lines.count('class="rule"') == 1


def test_a_long_step_curve_stays_small():
    rng = np.random.default_rng(0)
    recall = np.sort(rng.random(20_000))[::-1]
    precision = np.clip(1 - recall + rng.normal(0, 0.01, recall.size), 0, 1)
    svg = line_chart([Series("pr", list(zip(recall, precision, strict=True)), step=True)])
    assert len(svg) < 60_000 and ElementTree.fromstring(svg) is not None


def _assert_escaped(page_html: str, name: str) -> None:
    assert SCRIPT not in page_html, name
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page_html, name
    assert re.search(r"&amp;(amp|lt|gt|#34|#39);", page_html) is None, name  # nothing escaped twice


def test_output_report_escapes_class_names_and_uris(tmp_path: Path):
    out = str(tmp_path / "tags")
    write_synthetic(out, images=60, parts=2, retag=5, classes=CLASSES, uri_prefix=f"/data/{AMP}/{SCRIPT}",
                    thresholds=np.array([0.5, 0.4, 0.6, 0.5], np.float32))
    _, pages = write_output_report(out, str(tmp_path / "report"), thumbs=2)
    for name in pages:
        text = (tmp_path / "report" / name).read_text()
        _assert_escaped(text, name)
        assert "a&amp;b &#34;q&#34;" in text, name
        for svg in re.findall(r"<svg.*?</svg>", text, re.S):
            ElementTree.fromstring(svg)
    labels = (tmp_path / "report" / "labels-001.html").read_text()
    assert '<h2>a&amp;b &#34;q&#34;</h2>' in labels and "document.body.dataset.charts" in labels


def test_eval_report_escapes_class_names_model_and_labels_path(tmp_path: Path):
    rng = np.random.default_rng(1)
    targets = (rng.random((60, len(CLASSES))) < 0.4).astype(np.float32)
    scores = np.clip(targets * 0.4 + rng.random(targets.shape) * 0.6, 0, 1).astype(np.float32)
    scored = Scored(uris=[], scores=scores, targets=targets)
    bundle = types.SimpleNamespace(classes=CLASSES, thresholds=[0.5] * len(CLASSES), model_id=f"{SCRIPT}@1",
                                   threshold_method="f1-per-class")
    result = report_metrics(bundle, scored, labels=f"/labels/{AMP}.csv")
    files = write_eval_report(str(tmp_path / "r"), result, scored, CLASSES, np.array(bundle.thresholds))
    assert sorted(Path(f).name for f in files) == ["ap.svg", "f1.svg", "metrics.json", "pr.svg", "report.html"]
    text = (tmp_path / "r" / "report.html").read_text()
    _assert_escaped(text, "report.html")
    assert "<title>mlcls eval: &lt;script&gt;" in text and "<code>/labels/a&amp;b &#34;q&#34;.csv</code>" in text
    assert text.count('<svg class="chart') == 3 and "<td>a&amp;b &#34;q&#34;</td>" in text
    for name in ("ap.svg", "pr.svg"):
        svg = (tmp_path / "r" / name).read_text()
        assert svg.strip() in text  # the page holds the same SVG as the file
        texts = _texts(svg)
        assert any(t.startswith(AMP) for t in texts) and any(t.startswith(SCRIPT) for t in texts), name


@pytest.mark.parametrize("values", [[], [0]])
def test_empty_bar_charts_are_still_svg(values):
    assert ElementTree.fromstring(bar_chart([(f"c{i}", v) for i, v in enumerate(values)])).tag == f"{SVG}svg"
