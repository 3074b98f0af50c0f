"""`mlcls report`: a static HTML report of an output, to open from disk.

One streaming pass (`mlcls.stats.run_pass`) gathers everything: the stats,
per-class probability histograms, per class the highest-scoring images and
the highest-scoring ones still under the threshold (the images a person
should look at: the model's near misses), and the failed files. Only the
chosen images are then read again, from their source URIs through fsspec,
to make small JPEG thumbnails next to the pages. With many classes the
report stays fast: the `labels` most frequent classes get histograms and
thumbnails, on pages of `PAGE_LABELS`; the rest appear in the index table.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from .dataset import Dataset
from .errors import OptionError, OutputError
from .stats import Batch, Stats, compute_stats
from .storage import StorageOptions, describe_os_error, join, url_to_fs, write_atomic

BINS = 20
PAGE_LABELS = 20
THUMB_PX = 160


class Histograms:
    """Per class, counts of tagged images' probabilities in `bins` equal bins over [0, 1]."""

    columns: tuple[str, ...] = ()

    def __init__(self, n_classes: int, bins: int = BINS) -> None:
        self.bins = bins
        self.counts = np.zeros((n_classes, bins), np.int64)

    def add(self, batch: Batch) -> None:
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

    def add(self, batch: Batch) -> None:
        if self.k == 0 or not batch.ok.any():
            return
        probs = batch.by_class
        score = np.where(batch.ok[None, :] & ~np.isnan(probs), probs, -np.inf)
        above = score >= self.thresholds
        self.top = self._merge(self.top, np.where(above, score, -np.inf), batch)
        near = ~above & (score >= self.thresholds / 2)
        self.near = self._merge(self.near, np.where(near, score, -np.inf), batch)

    def _merge(self, best: tuple[np.ndarray, np.ndarray], score: np.ndarray, batch: Batch):
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

    def add(self, batch: Batch) -> None:
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

    dataset: Dataset
    stats: Stats
    histograms: Histograms
    tops: TopImages
    failures: Failures
    detailed: list[str]
    thumbs: dict[str, str | None] = field(default_factory=dict)
    generated: str = ""


def gather(dataset: Dataset, *, labels: int = 100, thumbs: int = 8, failures: int = 1000) -> ReportData:
    """The report's numbers and image choices, in one pass over the dataset."""
    if labels < 0 or thumbs < 0:
        raise OptionError("--labels and --thumbs must be zero or more")
    thresholds = np.array([dataset.thresholds[c] for c in dataset.classes])
    hist, tops, failed = Histograms(len(dataset.classes)), TopImages(thresholds, thumbs), Failures(failures)
    stats = compute_stats(dataset, pairs=20, extra=[hist, tops, failed])
    detailed = [s.label for s in stats.labels[:labels]]
    return ReportData(dataset=dataset, stats=stats, histograms=hist, tops=tops, failures=failed,
                      detailed=detailed, generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))


def thumbnail_uris(data: ReportData) -> list[str]:
    """Every image a detailed label shows, once."""
    index = {c: j for j, c in enumerate(data.dataset.classes)}
    seen: dict[str, None] = {}
    for label in data.detailed:
        for which in ("top", "near"):
            for uri, _ in data.tops.images(which, index[label]):
                seen.setdefault(uri, None)
    return list(seen)


def make_thumbnails(uris: Iterable[str], out_dir: str, storage_options: StorageOptions = None,
                    workers: int = 8, probe: int = 16) -> dict[str, str | None]:
    """Small JPEGs under `out_dir/thumbs/`; maps each uri to its relative path, or None if unreadable.

    If the first `probe` sources all fail (moved, deleted, or a store this
    machine cannot reach), the rest are not tried: each try could wait on a
    network timeout, and the report is still useful without pictures.
    """
    fs, base = url_to_fs(out_dir, storage_options)
    uris = list(uris)

    def one(uri: str) -> tuple[str, str | None]:
        name = f"thumbs/{hashlib.sha1(uri.encode()).hexdigest()[:16]}.jpg"
        try:
            src_fs, path = url_to_fs(uri, storage_options)
            data = src_fs.cat_file(path)
            write_atomic(fs, join(base, name), _thumbnail(data))
        except Exception:  # noqa: BLE001 - any failure (I/O, decode, a store's client) only loses this picture
            return uri, None
        return uri, name

    with ThreadPoolExecutor(max_workers=workers) as pool:
        made = dict(pool.map(one, uris[:probe]))
        if uris[:probe] and not any(made.values()):
            return made | dict.fromkeys(uris[probe:])
        return made | dict(pool.map(one, uris[probe:]))


def _thumbnail(data: bytes) -> bytes:
    """A JPEG at most THUMB_PX on its long side, oriented as the camera meant (EXIF)."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (THUMB_PX, THUMB_PX))
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return buf.getvalue()


def write_report(out: str, report_dir: str, storage_options: StorageOptions = None, *, labels: int = 100,
                 thumbs: int = 8) -> tuple[ReportData, list[str]]:
    """Gather, make thumbnails, write the pages; return the data and the pages written (index first)."""
    from .report_html import render_pages

    dataset = Dataset.open(out, storage_options)
    data = gather(dataset, labels=labels, thumbs=thumbs)
    data.thumbs = make_thumbnails(thumbnail_uris(data), report_dir, storage_options)
    try:
        fs, base = url_to_fs(report_dir, storage_options)
        pages = render_pages(data)
        for name, html in pages.items():
            write_atomic(fs, join(base, name), html.encode())
    except OSError as err:
        raise OutputError(f"cannot write the report to {report_dir}: {describe_os_error(err)}") from err
    return data, list(pages)
