"""The evaluation report: `metrics.json`, three SVG charts, and `report.html` that shows them all.

Charts (inline SVG from `mlcls.charts`, no plotting library):

- `ap.svg`: per-class AP, worst first, with each class's positive count and
  the mAP as a dashed line;
- `pr.svg`: precision-recall curves of the worst classes by AP, with the
  point the bundle's threshold picks;
- `f1.svg`: macro and micro F1 as one global threshold sweeps 0..1, with
  the macro F1 of the bundle's per-class thresholds for comparison.

The HTML (built with `mlcls.pages`) holds the same SVG inline, so the report
is one file to mail or open from a bucket. Everything is written through
fsspec, so `--report` may be an `s3://` prefix.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from mlcls.charts import Rule, Series, bar_chart, line_chart
from mlcls.errors import OptionError
from mlcls.pages import Markup, html, page
from mlcls.pages import join as join_html
from mlcls.storage import StorageOptions, describe_os_error, join, url_to_fs, write_atomic
from mlcls.train import metrics
from mlcls.train.scoring import Scored

WORST_CLASSES = 6
FILES = ("metrics.json", "report.html", "ap.svg", "pr.svg", "f1.svg")
CHARTS = {  # file -> heading and caption in report.html
    "ap.svg": ("Per-class AP", "Average precision, worst first (positives in brackets); dashed: the mAP."),
    "pr.svg": ("PR curves of the worst classes",
               f"The (at most) {WORST_CLASSES} classes with the lowest AP; dots: at the bundle's thresholds."),
    "f1.svg": ("F1 against a global threshold", "Dashed: the macro F1 at the bundle's per-class thresholds."),
}
CSS = Markup("td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")


def write_eval_report(folder: str, result: dict[str, Any], scored: Scored, classes: list[str], thresholds: np.ndarray,
                 storage_options: StorageOptions = None) -> list[str]:
    """Write the report files into `folder`; return their paths.

    `thresholds` are the bundle's; the metrics at them (and the dots of `pr.svg`) come with `result`.
    """
    charts = {"ap.svg": ap_chart(result), "pr.svg": pr_chart(scored, classes, result),
              "f1.svg": f1_chart(scored, result)}
    files = {"metrics.json": (json.dumps(json_safe(result), indent=2) + "\n").encode(),
             **{name: (svg + "\n").encode() for name, svg in charts.items()},
             "report.html": render_html(result, charts).encode()}
    try:
        fs, base = url_to_fs(folder, storage_options)
        for name, data in files.items():
            write_atomic(fs, join(base, name), data)
    except OSError as err:
        raise OptionError(f"cannot write the report to {folder}: {describe_os_error(err)}") from err
    return [join(folder.rstrip("/"), name) for name in files]


def json_safe(value: Any) -> Any:
    """JSON without NaN (not valid JSON): an undefined metric is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _by_ap(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-class rows that have an AP, worst first."""
    return sorted((r for r in result["per_class"] if r["ap"] is not None), key=lambda r: r["ap"])


def ap_chart(result: dict[str, Any]) -> Markup:
    rows = _by_ap(result)
    rule = Rule(f"mAP {result['mAP']:.3f}", result["mAP"]) if rows else None  # no class with positives: no mAP
    return bar_chart([(r["class"], r["ap"]) for r in rows], fmt=".3f", top=1.0, label_width=200, rule=rule,
                     notes=[f"({r['positives']})" for r in rows], title="per-class AP, positives in brackets")


def pr_chart(scored: Scored, classes: list[str], result: dict[str, Any]) -> Markup:
    series = []
    for r in _by_ap(result)[:WORST_CLASSES]:
        j = classes.index(r["class"])
        precision, recall, _ = metrics.precision_recall_curve(scored.scores[:, j], scored.targets[:, j])
        series.append(Series(f"{r['class']} (AP {r['ap']:.3f})", list(zip(recall, precision, strict=True)),
                             marks=[(r["recall"], r["precision"])], step=True))
    return line_chart(series, x_label="recall", y_label="precision",
                      title=f"worst {len(series)} classes; dots: at the bundle's thresholds")


def f1_chart(scored: Scored, result: dict[str, Any]) -> Markup:
    curve = metrics.f1_by_global_threshold(scored.scores, scored.targets)
    series = [Series(label, list(zip(curve["threshold"], curve[key], strict=True))) for key, label in
              [("macro_f1", "macro F1, one global threshold"), ("micro_f1", "micro F1 (OF1), one global threshold")]]
    f1 = result["at_thresholds"]["macro_f1"]
    return line_chart(series, rules=[Rule(f"macro F1 at the bundle's thresholds ({f1:.3f})", f1)],
                      x_label="threshold", y_label="F1", height=300, title="F1 against one global threshold")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _cells(values: list[Any]) -> Markup:
    return join_html(html("<td>{}</td>", _fmt(v)) for v in values)


def render_html(result: dict[str, Any], charts: dict[str, Markup]) -> str:
    """One self-contained page: summary table, charts, per-class table."""
    settings = [("bundle's thresholds", result["at_thresholds"]), ("0.5", result["at_0.5"]),
                ("top-3", result["at_top3"])]
    if "override" in result:
        settings.append((result["override"]["rule"], result["override"]))
    keys = ["CP", "CR", "CF1", "OP", "OR", "OF1", "macro_f1", "hamming_loss", "subset_accuracy", "empty_fpr"]
    rows = join_html(html("<tr>{}</tr>", _cells([name, *(m[k] for k in keys)])) for name, m in settings)
    per = join_html(html("<tr>{}</tr>", _cells([r[k] for k in ("class", "ap", "positives", "threshold", "precision",
                                                           "recall", "f1")])) for r in result["per_class"])
    images = join_html(html('<h2>{}</h2><p class="meta">{}</p>{}', title, caption, charts[name])
                       for name, (title, caption) in CHARTS.items())
    body = html("<h1>{model}</h1>\n<p>{images} images from <code>{labels}</code>; macro mAP <b>{map}</b>; thresholds "
                "by {method};\n{empty} images with no labels.</p>\n<table><tr><th>labels by</th>{head}</tr>{rows}"
                "</table>\n{charts}\n<h2>Per class (at the bundle's thresholds)</h2>\n<table><tr><th>class</th>"
                "<th>AP</th><th>positives</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th></tr>"
                "{per}</table>\n", model=result["model"], images=result["images"], labels=result["labels"],
                map=_fmt(result["mAP"]), method=result["threshold_method"],
                empty=result["at_thresholds"]["empty_images"], head=join_html(html("<th>{}</th>", k) for k in keys),
                rows=rows, charts=images, per=per)
    return page(f"mlcls eval: {result['model']}", body, css=CSS)
