"""What an output holds, in one streaming pass: images, errors, labels, probabilities, co-occurrence.

The pass reads `labels`, `probs`, `error`, `model` (and `uri` when a consumer
asks for it) as Arrow batches of the table's version (`OutputTable.batches`), so
memory is about one Parquet row group of those columns, whatever the
dataset's size. Each batch is decoded once
into numpy (`RowBatch`: label codes, a dense probability matrix) and handed to
the accumulators: `Totals` here for `mlcls stats`, and the report's
histograms and thumbnail pickers (`mlcls.output.report_data`) in the same pass.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlcls.output.reader import OutputTable

DENSE_VALUES_PER_BATCH = 4_000_000  # batch rows x classes: ~16 MB of float32 probabilities per batch


class RowBatch:
    """One record batch decoded for numpy: tagged and failed rows, label codes, probabilities by class."""

    def __init__(self, batch: pa.RecordBatch, classes: Sequence[str], bounded: bool) -> None:
        self.arrow = batch
        self.n = batch.num_rows
        self.classes = classes
        self.bounded = bounded
        self._class_index = pa.array(list(classes), pa.string())

    @cached_property
    def ok(self) -> np.ndarray:
        """True where the row was tagged (no error)."""
        return self.arrow.column("error").is_null().to_numpy(zero_copy_only=False)

    @cached_property
    def failed(self) -> np.ndarray:
        """True where the row has an error."""
        return ~self.ok

    @cached_property
    def label_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, class code) of every label, rows ascending: the list column flattened."""
        labels = self.arrow.column("labels")
        rows = pc.list_parent_indices(labels).to_numpy().astype(np.int64)
        codes = pc.index_in(pc.list_flatten(labels), value_set=self._class_index).to_numpy(zero_copy_only=False)
        return rows, codes.astype(np.int64)

    @cached_property
    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bounded mode: (row, class code, probability) of every kept probability of a tagged row."""
        column = self.arrow.column("probs")  # a MapArray: its keys/items are the whole child, offsets are ours
        offsets = column.offsets.to_numpy()
        rows = np.repeat(np.arange(self.n), np.diff(offsets))
        span = slice(int(offsets[0]), int(offsets[-1]))
        codes = pc.index_in(column.keys[span], value_set=self._class_index).to_numpy(zero_copy_only=False)
        codes = codes.astype(np.int64)
        values = column.items[span].to_numpy(zero_copy_only=False)
        keep = self.ok[rows]
        return rows[keep], codes[keep], values[keep]

    @cached_property
    def by_class(self) -> np.ndarray:
        """(classes x rows) float32 probabilities, 0 in rows that are not `ok`; in bounded mode NaN
        where a row did not keep a class."""
        out = np.empty((len(self.classes), self.n), dtype=np.float32)
        if self.bounded:
            out.fill(np.nan)
            rows, codes, values = self.entries
            out[codes, rows] = values
            return out
        column = self.arrow.column("probs")
        for j in range(len(self.classes)):
            out[j] = _float_values(column.field(j))
        if not self.ok.all():
            out[:, ~self.ok] = 0.0
        return out


def _float_values(array: pa.Array) -> np.ndarray:
    """The values buffer of a float32 array without copying; slots that are null hold whatever is there."""
    if array.null_count == 0:
        return array.to_numpy()
    return np.frombuffer(array.buffers()[1], dtype=np.float32, count=array.offset + len(array))[array.offset:]


class Consumer(Protocol):
    """Something that folds batches into a result; `columns` names extra columns it reads."""

    columns: tuple[str, ...]

    def add(self, batch: RowBatch) -> None: ...


@dataclass
class LabelStat:
    label: str
    images: int
    mean_prob: float | None
    threshold: float


@dataclass
class Stats:
    """`mlcls stats`'s answer; `to_dict()` is its JSON."""

    out: str
    version: int
    parts: int
    images: int
    tagged: int
    errors: dict[str, int]
    unlabelled: int
    models: dict[str, int]
    labels: list[LabelStat]
    pairs: list[tuple[str, str, int]]
    probs: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"error_count": sum(self.errors.values())}


@dataclass
class Totals:
    """Counts, error kinds, per-class label counts and probability sums, co-occurring pairs."""

    classes: Sequence[str]
    columns: tuple[str, ...] = ()
    images: int = 0
    tagged: int = 0
    unlabelled: int = 0
    errors: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    label_counts: np.ndarray | None = None
    prob_sums: np.ndarray | None = None
    prob_counts: np.ndarray | None = None
    pair_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    pair_counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def __post_init__(self) -> None:
        c = len(self.classes)
        self.label_counts = np.zeros(c, np.int64)
        self.prob_sums = np.zeros(c, np.float64)
        self.prob_counts = np.zeros(c, np.int64)

    def add(self, batch: RowBatch) -> None:
        ok, error = batch.ok, batch.arrow.column("error")
        self.images += batch.n
        self.tagged += int(ok.sum())
        self.errors.update(e.split(":", 1)[0].strip() for e in error.filter(pa.array(batch.failed)).to_pylist())
        for item in pc.value_counts(batch.arrow.column("model")).to_pylist():
            self.models[item["values"]] += item["counts"]
        rows, codes = batch.label_codes
        per_row = np.bincount(rows, minlength=batch.n)
        self.label_counts += np.bincount(codes, minlength=len(self.classes))
        self.unlabelled += int(ok.sum()) - int(np.count_nonzero(per_row))
        if batch.bounded:
            _, entry_codes, values = batch.entries
            self.prob_sums += np.bincount(entry_codes, weights=values, minlength=len(self.classes))
            self.prob_counts += np.bincount(entry_codes, minlength=len(self.classes))
        else:
            self.prob_sums += batch.by_class.sum(axis=1, dtype=np.float64)  # 0 where not ok
            self.prob_counts += int(ok.sum())
        self._add_pairs(rows, codes, per_row)

    def _add_pairs(self, rows: np.ndarray, codes: np.ndarray, per_row: np.ndarray) -> None:
        """Count every pair of labels that share an image (a < b), as keys a * C + b."""
        if len(codes) < 2:
            return
        k = per_row[rows]  # labels in this occurrence's image
        first = (np.cumsum(per_row) - per_row)[rows]  # index of the image's first label (rows ascend)
        a = np.repeat(codes, k)
        b = codes[np.repeat(first, k) + _ranges(k)]
        keep = a < b
        if not keep.any():
            return
        c = len(self.classes)
        keys = a[keep] * c + b[keep]
        if c <= 2048:  # a dense C x C table: one bincount per batch
            if self.pair_counts.size == 0:
                self.pair_keys, self.pair_counts = np.arange(c * c), np.zeros(c * c, np.int64)
            self.pair_counts += np.bincount(keys, minlength=c * c)
            return
        merged = np.concatenate([self.pair_keys, keys])
        weights = np.concatenate([self.pair_counts, np.ones(len(keys), np.int64)])
        self.pair_keys, inverse = np.unique(merged, return_inverse=True)
        self.pair_counts = np.bincount(inverse, weights=weights).astype(np.int64)

    def top_pairs(self, n: int) -> list[tuple[str, str, int]]:
        order = np.argsort(-self.pair_counts, kind="stable")[:n]
        c = len(self.classes)
        return [(self.classes[int(k) // c], self.classes[int(k) % c], int(v))
                for k, v in zip(self.pair_keys[order], self.pair_counts[order], strict=True) if v > 0]


def _ranges(k: np.ndarray) -> np.ndarray:
    """Concatenated arange(k[i]) for every i, without a Python loop."""
    ends = np.cumsum(k)
    return np.arange(ends[-1]) - np.repeat(ends - k, k)


def run_pass(dataset: OutputTable, consumers: Sequence[Consumer]) -> None:
    """Feed every batch of the dataset to `consumers` (one read of the columns they need)."""
    classes = dataset.classes
    columns = ["labels", "probs", "error", "model"]
    for c in consumers:
        columns += [x for x in c.columns if x not in columns]
    batch_rows = max(1024, DENSE_VALUES_PER_BATCH // max(1, len(classes)))
    for arrow in dataset.batches(columns, batch_rows=batch_rows):
        batch = RowBatch(arrow, classes, dataset.bounded)
        for c in consumers:
            c.add(batch)


def compute_stats(dataset: OutputTable, *, pairs: int = 10, extra: Sequence[Consumer] = ()) -> Stats:
    """Stats of `dataset` (and feed `extra` consumers in the same pass)."""
    started = time.perf_counter()
    totals = Totals(dataset.classes)
    run_pass(dataset, [totals, *extra])
    return Stats(out=dataset.out, version=dataset.version, parts=len(dataset.parts), images=totals.images,
                 tagged=totals.tagged,
                 errors=dict(totals.errors.most_common()), unlabelled=totals.unlabelled,
                 models=dict(totals.models.most_common()), labels=_label_stats(dataset, totals),
                 pairs=totals.top_pairs(pairs), probs=dataset.meta.get("probs", "all"),
                 seconds=time.perf_counter() - started)


def _label_stats(dataset: OutputTable, totals: Totals) -> list[LabelStat]:
    thresholds = dataset.thresholds
    out = []
    for j, label in enumerate(dataset.classes):
        n = int(totals.prob_counts[j])
        mean = float(totals.prob_sums[j] / n) if n else None
        out.append(LabelStat(label, int(totals.label_counts[j]), mean, float(thresholds[label])))
    return sorted(out, key=lambda s: (-s.images, s.label))
