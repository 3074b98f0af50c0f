"""The evaluation report: `metrics.json`, three PNG charts, and `report.html` that shows them all.

Charts (matplotlib, Agg backend, so no display is needed):

- `ap.png`: per-class AP, worst first, with each class's positive count;
- `pr.png`: precision-recall curves of the worst classes by AP, with the
  point the bundle's threshold picks;
- `f1.png`: macro and micro F1 as one global threshold sweeps 0..1, with
  the macro F1 of the bundle's per-class thresholds for comparison.

The HTML embeds the PNGs (data URIs), so the report is one file to mail or
open from a bucket. Everything is written through fsspec, so `--report`
may be an `s3://` prefix.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

import numpy as np

from mlcls.errors import OptionError
from mlcls.storage import StorageOptions, describe_os_error, join, url_to_fs, write_atomic
from mlcls.train import metrics
from mlcls.train.scoring import Scored

WORST_CLASSES = 6
FILES = ("metrics.json", "report.html", "ap.png", "pr.png", "f1.png")


def write_eval_report(folder: str, result: dict[str, Any], scored: Scored, classes: list[str], thresholds: np.ndarray,
                 storage_options: StorageOptions = None) -> list[str]:
    """Write the report files into `folder`; return their paths."""
    charts = {"ap.png": ap_chart(result), "pr.png": pr_chart(scored, classes, thresholds, result),
              "f1.png": f1_chart(scored, result)}
    files = {"metrics.json": (json.dumps(json_safe(result), indent=2) + "\n").encode(),
             **charts, "report.html": render_html(result, charts).encode()}
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


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def ap_chart(result: dict[str, Any]) -> bytes:
    rows = sorted((r for r in result["per_class"] if r["ap"] is not None), key=lambda r: r["ap"])
    plt, fig, ax = _figure(8, max(2.5, 0.28 * len(rows) + 1))
    ax.barh([f"{r['class']} ({r['positives']})" for r in rows], [r["ap"] for r in rows], color="#4c72b0")
    if rows:  # no class with a positive image: no AP, no mAP line
        ax.axvline(result["mAP"], color="#c44e52", linestyle="--", label=f"mAP {result['mAP']:.3f}")
        ax.legend(loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision (positives in brackets)")
    return _png(plt, fig)


def pr_chart(scored: Scored, classes: list[str], thresholds: np.ndarray, result: dict[str, Any]) -> bytes:
    worst = sorted((r for r in result["per_class"] if r["ap"] is not None), key=lambda r: r["ap"])[:WORST_CLASSES]
    plt, fig, ax = _figure(7, 5)
    for r in worst:
        j = classes.index(r["class"])
        precision, recall, _ = metrics.precision_recall_curve(scored.scores[:, j], scored.targets[:, j])
        line = ax.step(recall, precision, where="post", label=f"{r['class']} (AP {r['ap']:.3f})")[0]
        ax.plot([r["recall"]], [r["precision"]], "o", color=line.get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"worst {len(worst)} classes; dots: at the bundle's thresholds")
    if worst:
        ax.legend(loc="lower left", fontsize="small")
    return _png(plt, fig)


def f1_chart(scored: Scored, result: dict[str, Any]) -> bytes:
    curve = metrics.f1_by_global_threshold(scored.scores, scored.targets)
    plt, fig, ax = _figure(7, 4)
    ax.plot(curve["threshold"], curve["macro_f1"], label="macro F1, one global threshold")
    ax.plot(curve["threshold"], curve["micro_f1"], label="micro F1 (OF1), one global threshold")
    ax.axhline(result["at_thresholds"]["macro_f1"], color="#c44e52", linestyle="--",
               label=f"macro F1 at the bundle's thresholds ({result['at_thresholds']['macro_f1']:.3f})")
    ax.set_xlabel("threshold")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower center", fontsize="small")
    return _png(plt, fig)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def render_html(result: dict[str, Any], charts: dict[str, bytes]) -> str:
    """One self-contained page: summary table, charts, per-class table."""
    settings = [("bundle's thresholds", result["at_thresholds"]), ("0.5", result["at_0.5"]),
                ("top-3", result["at_top3"])]
    if "override" in result:
        settings.append((result["override"]["rule"], result["override"]))
    keys = ["CP", "CR", "CF1", "OP", "OR", "OF1", "macro_f1", "hamming_loss", "subset_accuracy", "empty_fpr"]
    head = "".join(f"<th>{k}</th>" for k in keys)
    rows = "".join(f"<tr><td>{html.escape(name)}</td>{''.join(f'<td>{_fmt(m[k])}</td>' for k in keys)}</tr>"
                   for name, m in settings)
    per = "".join(f"<tr><td>{html.escape(r['class'])}</td><td>{_fmt(r['ap'])}</td><td>{r['positives']}</td>"
                  f"<td>{_fmt(r['threshold'])}</td><td>{_fmt(r['precision'])}</td><td>{_fmt(r['recall'])}</td>"
                  f"<td>{_fmt(r['f1'])}</td></tr>" for r in result["per_class"])
    images = "".join(f'<h2>{title}</h2><img alt="{name}" src="data:image/png;base64,'
                     f'{base64.b64encode(charts[name]).decode()}">'
                     for name, title in [("ap.png", "Per-class AP"), ("pr.png", "PR curves of the worst classes"),
                                         ("f1.png", "F1 against a global threshold")])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mlcls eval: {html.escape(result['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>{html.escape(result['model'])}</h1>
<p>{result['images']} images from <code>{html.escape(result['labels'])}</code>; macro mAP
<b>{_fmt(result['mAP'])}</b>; thresholds by {html.escape(result['threshold_method'])};
{result['at_thresholds']['empty_images']} images with no labels.</p>
<table><tr><th>labels by</th>{head}</tr>{rows}</table>
{images}
<h2>Per class (at the bundle's thresholds)</h2>
<table><tr><th>class</th><th>AP</th><th>positives</th><th>threshold</th><th>precision</th><th>recall</th>
<th>F1</th></tr>{per}</table>
</body></html>
"""
