"""What `mlcls report` shows, gathered in one streaming pass over the output.

One pass (`mlcls.output.stats.run_pass`) collects the stats, per-class probability histograms,
per class the highest-scoring images and the near misses just under the threshold, and the failed
files. With many classes the report stays fast: the `labels` most frequent classes get histograms
and thumbnails, on pages of `PAGE_LABELS`; the rest appear in the index table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from mlcls.errors import OptionError
from mlcls.output.reader import OutputTable
from mlcls.output.stats import RowBatch, Stats, compute_stats

BINS = 20


PAGE_LABELS = 20


class Histograms:
    """Per class, counts of tagged images' probabilities in `bins` equal bins over [0, 1]."""

    columns: tuple[str, ...] = ()

    def __init__(self, n_classes: int, bins: int = BINS) -> None:
        self.bins = bins
        self.counts = np.zeros((n_classes, bins), np.int64)

    def add(self, batch: RowBatch) -> None:
        c, b = self.counts.shape
        if batch.bounded:
            _, codes, values = batch.entries
            keys = codes * b + _bin(values, b)
        else:
            keys = (_bin(batch.by_class[:, batch.ok], b) + (np.arange(c) * b)[:, None]).ravel()
        self.counts += np.bincount(keys, minlength=c * b).reshape(c, b)


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    return np.clip((np.nan_to_num(values) * bins).astype(np.int64), 0, bins - 1)


class TopImages:
    """Per class, the `k` highest-scoring images at or above its threshold (tagged with it), and the `k`
    highest under it, down to half the threshold: the near misses a person should look at."""

    columns: tuple[str, ...] = ("uri",)

    def __init__(self, thresholds: np.ndarray, k: int) -> None:
        self.thresholds = thresholds.astype(np.float32)[:, None]
        self.k = k
        c = len(thresholds)
        self.top = (np.empty((c, 0), np.float32), np.empty((c, 0), object))
        self.near = (np.empty((c, 0), np.float32), np.empty((c, 0), object))

    def add(self, batch: RowBatch) -> None:
        if self.k == 0 or not batch.ok.any():
            return
        probs = batch.by_class
        score = np.where(batch.ok[None, :] & ~np.isnan(probs), probs, -np.inf)
        above = score >= self.thresholds
        self.top = self._merge(self.top, np.where(above, score, -np.inf), batch)
        near = ~above & (score >= self.thresholds / 2)
        self.near = self._merge(self.near, np.where(near, score, -np.inf), batch)

    def _merge(self, best: tuple[np.ndarray, np.ndarray], score: np.ndarray, batch: RowBatch):
        """The k best of (the k best so far) and (this batch), per class; uris taken only for contenders."""
        k = min(self.k, score.shape[1])
        idx = np.argpartition(-score, k - 1, axis=1)[:, :k] if score.shape[1] > k else \
            np.broadcast_to(np.arange(score.shape[1]), score.shape).copy()
        values = np.take_along_axis(score, idx, axis=1)
        kth = best[0].min(axis=1, initial=np.inf)[:, None] if best[0].shape[1] >= self.k else -np.inf
        contender = (values > kth) & np.isfinite(values)
        rows = np.unique(idx[contender])
        uris = np.empty(idx.shape, object)
        if len(rows):
            taken = dict(zip(rows.tolist(), batch.arrow.column("uri").take(pa.array(rows)).to_pylist(), strict=True))
            uris[contender] = [taken[r] for r in idx[contender].tolist()]
        values = np.where(contender, values, -np.inf)
        all_values = np.concatenate([best[0], values], axis=1)
        all_uris = np.concatenate([best[1], uris], axis=1)
        order = np.argsort(-all_values, axis=1, kind="stable")[:, : self.k]
        return np.take_along_axis(all_values, order, axis=1), np.take_along_axis(all_uris, order, axis=1)

    def images(self, which: str, j: int) -> list[tuple[str, float]]:
        values, uris = self.top if which == "top" else self.near
        return [(u, float(v)) for v, u in zip(values[j], uris[j], strict=True) if np.isfinite(v)]


class Failures:
    """The first `limit` failed files (uri, error), and how many failed in all."""

    columns: tuple[str, ...] = ("uri",)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[tuple[str, str]] = []
        self.total = 0

    def add(self, batch: RowBatch) -> None:
        rows = np.flatnonzero(batch.failed)
        self.total += len(rows)
        room = self.limit - len(self.items)
        if room > 0 and len(rows):
            take = pa.array(rows[:room])
            uris = batch.arrow.column("uri").take(take).to_pylist()
            errors = batch.arrow.column("error").take(take).to_pylist()
            self.items += list(zip(uris, errors, strict=True))


@dataclass
class ReportData:
    """Everything the pages show."""

    dataset: OutputTable
    stats: Stats
    histograms: Histograms
    tops: TopImages
    failures: Failures
    detailed: list[str]
    thumbs: dict[str, str | None] = field(default_factory=dict)
    generated: str = ""


def gather(dataset: OutputTable, *, labels: int = 100, thumbs: int = 8, failures: int = 1000) -> ReportData:
    """The report's numbers and image choices, in one pass over the dataset."""
    if labels < 0 or thumbs < 0:
        raise OptionError("--labels and --thumbs must be zero or more")
    thresholds = np.array([dataset.thresholds[c] for c in dataset.classes])
    hist, tops, failed = Histograms(len(dataset.classes)), TopImages(thresholds, thumbs), Failures(failures)
    stats = compute_stats(dataset, pairs=20, extra=[hist, tops, failed])
    detailed = [s.label for s in stats.labels[:labels]]
    return ReportData(dataset=dataset, stats=stats, histograms=hist, tops=tops, failures=failed,
                      detailed=detailed, generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
