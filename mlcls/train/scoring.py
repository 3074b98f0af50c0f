"""Measure a bundle on labelled images: what `mlcls eval` and `mlcls calibrate` run.

Images go through the tagging path exactly (the same decode, preprocessing
and `Engine` as `mlcls tag`), so the numbers here are the numbers of the
labels a tagging run writes. Metrics come from `mlcls.train.metrics`, the one
implementation training also uses.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlcls.bundle import Bundle
from mlcls.errors import LabelsError
from mlcls.storage import StorageOptions
from mlcls.tag.engine import get_engine
from mlcls.train import metrics
from mlcls.train.image_cache import load_pixels
from mlcls.train.labels import LabelsSpec, LabelTable, multi_hot, read_labels
from mlcls.train.thresholds import LabelRule

TOP_K = 3


@dataclass
class Scored:
    """Labelled images and the bundle's probabilities for them."""

    uris: list[str]
    scores: np.ndarray
    targets: np.ndarray
    seconds: float = 0.0


def read_eval_labels(spec: LabelsSpec, classes: Sequence[str], *, only_valid: bool = False,
                     storage_options: StorageOptions = None) -> LabelTable:
    """The rows to measure on; every label must be one of the bundle's classes."""
    table = read_labels(spec, storage_options)
    if only_valid:
        if table.is_valid is None or not table.is_valid.any():
            raise LabelsError(f"--only-valid: labels file {spec.path} has no rows with is_valid set")
        table = table.subset(np.flatnonzero(table.is_valid))
    unknown = sorted(set(table.classes) - set(classes))
    if unknown:
        raise LabelsError(f"labels file {spec.path} uses {len(unknown)} classes the bundle does not have: "
                          f"{', '.join(unknown[:10])} (the bundle has: {', '.join(list(classes)[:10])}"
                          f"{', ...' if len(classes) > 10 else ''})")
    return table


def score_table(bundle: Bundle, table: LabelTable, *, device: str = "auto", batch_size: int = 64,
                workers: int = 8, storage_options: StorageOptions = None) -> Scored:
    """Decode every listed image once and run the bundle's engine over it."""
    started = time.perf_counter()
    pixels, keep = load_pixels(table.uris, bundle.preprocess, storage_options=storage_options, workers=workers,
                               source=table.source)
    engine = get_engine(bundle, device)
    scores = np.zeros((len(pixels), len(bundle.classes)), dtype=np.float32)
    for i in range(0, len(pixels), batch_size):
        scores[i:i + batch_size] = engine.probs(torch.from_numpy(pixels[i:i + batch_size]))
    targets = multi_hot([table.labels[i] for i in keep], bundle.classes)
    return Scored(uris=[table.uris[i] for i in keep], scores=scores, targets=targets,
                  seconds=time.perf_counter() - started)


def report_metrics(bundle: Bundle, scored: Scored, *, rule: LabelRule | None = None,
                   labels: str = "") -> dict[str, Any]:
    """Every metric of the issue, at the bundle's thresholds, at 0.5, at top-3, and under `rule` if given."""
    classes = list(bundle.classes)
    thresholds = np.asarray(bundle.thresholds)
    out = metrics.evaluate(scored.scores, scored.targets, thresholds, classes, top_k=TOP_K)
    out["at_0.5"] = metrics.classification_metrics(scored.scores >= 0.5, scored.targets)
    if rule is not None:
        out["override"] = {"rule": rule.name,
                           **metrics.classification_metrics(rule.predict(scored.scores), scored.targets)}
    per = metrics.per_class_metrics(scored.scores >= thresholds, scored.targets)
    out["per_class"] = [
        {"class": c, "ap": out["per_class_ap"][c], "positives": int(per["support"][j]),
         "threshold": float(thresholds[j]), "precision": float(per["precision"][j]),
         "recall": float(per["recall"][j]), "f1": float(per["f1"][j])}
        for j, c in enumerate(classes)]
    out["model"] = bundle.model_id
    out["threshold_method"] = bundle.threshold_method
    out["labels"] = labels
    out["seconds"] = round(scored.seconds, 2)
    return out


def missing_positive_classes(scored: Scored, classes: Sequence[str]) -> list[str]:
    """Classes with no positive image here: they have no AP and are left out of mAP."""
    return [c for c, n in zip(classes, scored.targets.sum(0), strict=True) if n == 0]
