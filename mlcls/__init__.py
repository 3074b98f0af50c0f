"""mlcls: batch multi-label image tagging for large image collections.

The library (this package) runs without Prefect; `flows/` wraps the same
steps as Prefect flows. The public API is re-exported here:

    import mlcls
    summary = mlcls.tag_images("photos/", "tags/", options=mlcls.TagOptions(batch_size=128))
    frame = mlcls.OutputTable.open("tags/").scan()

Names resolve on first use (PEP 562), so `import mlcls` and the CLI start
without importing torch, and this module imports nothing of the package but
`mlcls.allocator` (no torch, no package imports): no import circle runs
through it. It asks torch for huge pages before any tensor exists
(`mlcls.allocator.prefer_huge_pages`).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mlcls.allocator import prefer_huge_pages

prefer_huge_pages()

try:
    __version__ = version("mlcls")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+local"

_EXPORTS = {
    # tagging
    "tag_images": "mlcls.tag.job", "TagOptions": "mlcls.tag.job", "RunSummary": "mlcls.tag.job",
    # models
    "Bundle": "mlcls.bundle", "load_bundle": "mlcls.bundle", "create_bundle": "mlcls.bundle",
    "Preprocess": "mlcls.images.preprocess",
    # the output
    "OutputTable": "mlcls.output.reader", "LabelQuery": "mlcls.output.query", "label_query": "mlcls.output.query",
    "compute_stats": "mlcls.output.stats", "compact": "mlcls.output.compact",
    "write_output_report": "mlcls.output.report",
    # training and evaluation
    "train_from_labels": "mlcls.train.train_job", "TrainConfig": "mlcls.train.trainer",
    "LabelsSpec": "mlcls.train.labels", "eval_bundle": "mlcls.train.eval_job", "ScoreOptions": "mlcls.train.eval_job",
    "calibrate_bundle": "mlcls.train.eval_job",
    # errors a caller can act on
    "MlclsError": "mlcls.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlcls' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
