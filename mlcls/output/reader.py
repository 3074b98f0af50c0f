"""The output dataset as its readers see it: part files, classes, and one reading rule.

Rows for the same uri pile up when an image is tagged again (an incremental
run after the file changed, a newer model into the same output, the moment
between a `compact` writing merged parts and deleting the ones it merged).
Every reader in mlcls (query, `--sql`'s `tags` view, stats, report, compact)
applies one rule, so they all answer alike before and after `compact`:

    an image's row is its newest: the latest `tagged_at`, then the greatest
    `run_id`, then `model`, then the last in part order (part files sorted
    by path, rows in file order).

The other rows are *superseded*: stored until `mlcls compact` drops them,
never counted. `--all-rows` (and the `tags_all` view) read every stored row.

Finding superseded rows costs two passes over the `uri` column: the first
keeps a 64-bit hash per row (8 bytes a row, whatever the class count: 80 MB
for 10 million rows) to find the hashes that repeat; the second keeps only
the rows with those hashes. The result is a sorted array of global row
numbers (parts in order, rows in file order) that the polars scan, the
Arrow batches, DuckDB and compact all skip.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Full, Queue
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from mlcls.errors import OptionError, OutputError
from mlcls.output.parts import BAD_READ, list_parts, read_footer_meta
from mlcls.storage import (
    StorageOptions,
    describe_os_error,
    full_uri,
    is_local,
    probe,
    retry_stream,
    retrying,
    stat,
    url_to_fs,
)

NEWEST_FIRST = ("tagged_at", "run_id", "model", "_row")


@dataclass
class OutputTable:
    """An mlcls output: where it is, its part files in reading order, and its footer metadata."""

    out: str
    fs: AbstractFileSystem
    parts: list[str]
    meta: dict[str, Any]
    storage_options: StorageOptions = None
    _superseded: np.ndarray | None = field(default=None, repr=False)
    _row_counts: list[int] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, out: str, storage_options: StorageOptions = None) -> OutputTable:
        """Open `out`, or raise `OutputError` naming what is missing."""
        try:
            probe(out, storage_options)
            fs, base = url_to_fs(out, storage_options)
            info = stat(fs, base)
            if info is None:
                raise OutputError(f"output not found: {out}")
            if info.get("type") == "file":
                raise OutputError(f"output {out} is a file; give the folder or prefix that mlcls tag wrote")
            parts = list_parts(out, storage_options)
        except (OSError, ValueError, ImportError) as err:
            raise OutputError(f"cannot read output {out}: {describe_os_error(err)}") from err
        if not parts:
            raise OutputError(f"output {out} holds no tags (no part files); run mlcls tag SOURCE --out {out} first")
        return cls(out=out, fs=fs, parts=parts, meta=_read_meta(fs, parts[0], out), storage_options=storage_options)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(zip(self.meta["classes"], self.meta["thresholds"], strict=True))

    @property
    def bounded(self) -> bool:
        """True when `probs` is a map holding only some classes (`--probs top-k:N` or `min:P`)."""
        return self.meta.get("probs", "all") != "all"

    @property
    def part_uris(self) -> list[str]:
        return [full_uri(self.fs, p) for p in self.parts]

    def check_labels(self, labels: Sequence[str]) -> None:
        """Raise `OptionError` for a label no class has, suggesting the nearest class names."""
        known = set(self.meta["classes"])
        for label in labels:
            if label not in known:
                close = difflib.get_close_matches(label, self.meta["classes"], n=3)
                hint = f"did you mean {', '.join(close)}?" if close else \
                    f"classes are e.g. {', '.join(self.meta['classes'][:5])}"
                raise OptionError(f"unknown label {label!r}: no class of {self.out} has that name ({hint})")

    def superseded(self) -> np.ndarray:
        """Sorted global row numbers of the rows the reading rule hides (computed once)."""
        if self._superseded is None:
            self._superseded = _find_superseded(self)
        return self._superseded

    def row_counts(self) -> list[int]:
        """Rows per part, from the footers (read concurrently: one small request each on an object store)."""
        if self._row_counts is None:
            def count(path: str) -> int:
                return self.read_part(path, lambda pf: pf.metadata.num_rows)

            with ThreadPoolExecutor(max_workers=16) as pool:
                self._row_counts = list(pool.map(count, self.parts))
        return self._row_counts

    def superseded_by_part(self) -> dict[int, np.ndarray]:
        """The superseded rows as {part index: sorted row numbers within that part}."""
        rows = self.superseded()
        if not len(rows):
            return {}
        starts = np.concatenate([[0], np.cumsum(self.row_counts())[:-1]])
        part = np.searchsorted(starts, rows, side="right") - 1
        return {int(i): rows[part == i] - starts[i] for i in np.unique(part)}

    def scan(self, *, all_rows: bool = False) -> pl.LazyFrame:
        """A lazy polars scan under the reading rule, with each class's probability as a column `p_<class>`.

        A polars IO source over the part files: polars hands it the columns a
        plan needs and its filter, and it reads only those Parquet columns,
        down to single probability fields (`probs.dog`). polars' own Parquet
        scan reads a struct column whole, all classes of it, even for one
        field: 10x slower for a one-label query over 100 classes. The plain
        `probs` column stays available too.
        """
        from polars.io.plugins import register_io_source

        schema = self.polars_schema()

        def source(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                   batch_size: int | None) -> Iterator[pl.DataFrame]:
            return self._frames(list(with_columns or schema), predicate, n_rows, batch_size, all_rows)

        return register_io_source(source, schema=schema, is_pure=True, explain_name="mlcls",
                                  explain_detail=f"{len(self.parts)} parts of {self.out}")

    def polars_schema(self) -> dict[str, pl.DataType]:
        """The columns of `scan()`: the files' columns, then `p_<class>` for every class."""
        arrow = self.read_part(self.parts[0], lambda pf: pf.schema_arrow)
        schema = dict(pl.from_arrow(arrow.empty_table()).schema)
        return schema | {prob_name(c): pl.Float32() for c in self.classes}

    def _frames(self, columns: list[str], predicate: pl.Expr | None, n_rows: int | None,
                batch_size: int | None, all_rows: bool) -> Iterator[pl.DataFrame]:
        needed = list(dict.fromkeys([*columns, *(predicate.meta.root_names() if predicate is not None else [])]))
        probs = [c[2:] for c in needed if c.startswith("p_") and c[2:] in self.thresholds]
        read = [c for c in needed if not c.startswith("p_")]
        if probs and "probs" not in read:
            read += ["probs"] if self.bounded else [f"probs.{c}" for c in probs]
        left = n_rows
        for batch, live in self.batches(read or ["uri"], all_rows=all_rows, batch_rows=batch_size or 65_536):
            keep = np.ones(batch.num_rows, dtype=bool) if live is None else live
            if predicate is not None:
                matched = self._frame(batch, probs).select(predicate.fill_null(False)).to_series().to_numpy()
                keep &= matched.astype(bool)
            if left is not None:
                keep &= np.cumsum(keep) <= left
                left -= int(keep.sum())
            # filter in Arrow, then convert: a polars filter keeps every string of the batch alive (string
            # views into its buffers), which over 10 million rows holds all of them in memory
            yield self._frame(batch.filter(pa.array(keep)), probs).select(columns)
            if left == 0:
                return

    def _frame(self, batch: pa.RecordBatch, probs: list[str]) -> pl.DataFrame:
        df = pl.from_arrow(batch)
        assert isinstance(df, pl.DataFrame)
        return df.with_columns(prob_expr(self, c, raw=True).alias(prob_name(c)) for c in probs)

    def batches(self, columns: Sequence[str], *, all_rows: bool = False,
                batch_rows: int = 65_536) -> Iterator[tuple[pa.RecordBatch, np.ndarray | None]]:
        """Arrow record batches of `columns`, part by part, each with its live-row mask (None: all live).

        Superseded rows are masked rather than filtered out, so a batch is never
        copied; memory stays about one row group being decoded plus two
        batches (the next is read while the caller works on this one).
        """
        return _prefetch(self._batches(list(columns), all_rows, batch_rows))

    def _batches(self, columns: list[str], all_rows: bool, batch_rows: int):
        drop = np.empty(0, np.int64) if all_rows else self.superseded()
        offset = 0
        for path, n in zip(self.parts, self.row_counts(), strict=True):
            lo, hi = np.searchsorted(drop, [offset, offset + n])
            local = drop[lo:hi] - offset
            start = 0
            try:
                # a fault mid-part: open the part again and skip the batches already handed on
                for batch in retry_stream(lambda p=path: self._part_batches(p, columns, batch_rows),
                                          f"read {full_uri(self.fs, path)}", also=BAD_READ):
                    yield batch, _live_mask(batch.num_rows, local, start)
                    start += batch.num_rows
            except (OSError, pa.ArrowException) as err:
                raise OutputError(f"cannot read {full_uri(self.fs, path)}: {describe_os_error(err)}") from err
            offset += n

    def _part_batches(self, path: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self.open_part(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)

    def read_part(self, path: str, read: Any) -> Any:
        """`read(ParquetFile)` of one part (its footer, mostly), done again after a transient error or bad read."""
        def attempt() -> Any:
            with self.open_part(path) as f:
                return read(pq.ParquetFile(f))

        try:
            return retrying(attempt, f"read {full_uri(self.fs, path)}", also=BAD_READ)
        except (OSError, pa.ArrowException) as err:
            raise OutputError(f"cannot read {full_uri(self.fs, path)}: {describe_os_error(err)}") from err

    @contextmanager
    def open_part(self, path: str) -> Iterator[str | IO[bytes]]:
        """A part for pyarrow: a plain path on local disk, an fsspec file elsewhere."""
        if is_local(self.fs):
            yield path
            return
        with self.fs.open(path, "rb") as f:
            yield f


def _live_mask(n: int, local_rows: np.ndarray, start: int) -> np.ndarray | None:
    """False for the rows of `local_rows` (row numbers in the part) that fall in rows `start`..`start+n`."""
    lo, hi = np.searchsorted(local_rows, [start, start + n])
    if lo == hi:
        return None
    live = np.ones(n, dtype=bool)
    live[local_rows[lo:hi] - start] = False
    return live


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a thread, `depth` ahead: Parquet decoding (no GIL) overlaps the caller's numpy work."""
    done = object()
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # noqa: BLE001 - handed over, raised in the consumer
            put(err)

    thread = threading.Thread(target=produce, name="mlcls-prefetch", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()  # the producer has ended: release its open file now, not at garbage collection


def _find_superseded(dataset: OutputTable) -> np.ndarray:
    """Global row numbers of every row that is not its uri's newest (see the module docstring)."""
    hashes = np.empty(sum(dataset.row_counts()), np.uint64)
    offset = 0
    for batch, _ in dataset.batches(["uri"], all_rows=True):
        hashes[offset:offset + batch.num_rows] = _uri_hashes(batch)
        offset += batch.num_rows
    hashes.sort()  # in place: 8 bytes a row is all this pass holds
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if not len(repeated):
        return np.empty(0, np.int64)
    rows = _rows_with_hashes(dataset, repeated, ["uri", "tagged_at", "run_id", "model"])
    rows = rows.filter(pl.col("uri").is_duplicated())  # a hash that repeats for different uris is no duplicate
    newest = rows.sort(list(NEWEST_FIRST), descending=True, nulls_last=True).unique("uri", keep="first")
    hidden = rows.filter(~pl.col("_row").is_in(newest["_row"].implode()))["_row"]
    return np.sort(hidden.to_numpy())


def _uri_hashes(batch: pa.RecordBatch) -> np.ndarray:
    return pl.Series(batch.column("uri")).hash().to_numpy()


def _rows_with_hashes(dataset: OutputTable, hashes: np.ndarray, columns: list[str]) -> pl.DataFrame:
    """`columns` of every row whose uri hash is in the sorted `hashes`, with its global row number as `_row`."""
    frames = []
    offset = 0
    for batch, _ in dataset.batches(columns, all_rows=True):
        local = _positions_in(_uri_hashes(batch), hashes)
        if len(local):
            picked = pl.from_arrow(batch.take(pa.array(local)))
            assert isinstance(picked, pl.DataFrame)
            frames.append(picked.with_columns(_row=pl.Series(local + offset, dtype=pl.Int64)))
        offset += batch.num_rows
    return pl.concat(frames)


def _positions_in(values: np.ndarray, sorted_set: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Positions of `values` that occur in `sorted_set`, in chunks (np.isin would sort a copy of all of it)."""
    found = []
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk]
        at = np.minimum(np.searchsorted(sorted_set, part), len(sorted_set) - 1)
        found.append(np.flatnonzero(sorted_set[at] == part) + start)
    return np.concatenate(found) if found else np.empty(0, np.int64)


def _read_meta(fs: AbstractFileSystem, part: str, out: str) -> dict[str, Any]:
    meta = read_footer_meta(fs, part)
    if not meta:
        raise OutputError(f"{full_uri(fs, part)} in {out} was not written by mlcls (no mlcls metadata)")
    return meta


def prob_name(label: str) -> str:
    """The column of `scan()` (and of query results) holding `label`'s probability."""
    return f"p_{label}"


def prob_expr(dataset: OutputTable, label: str, *, raw: bool = False) -> pl.Expr:
    """`label`'s probability: the `p_<label>` column of `scan()`, or (`raw`) read from the `probs` column
    (null where a bounded row did not keep it)."""
    if not raw:
        return pl.col(prob_name(label))
    if dataset.bounded:
        return pl.col("probs").map.get(label)
    return pl.col("probs").struct.field(label)
