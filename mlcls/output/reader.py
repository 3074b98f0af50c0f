"""The output table as its readers see it: the current version's files, its classes, lazy scans.

The output is a Delta Lake table (`mlcls.output.table`) whose current
version holds exactly one row per image: a re-tagged image's older row left
it in the commit that added the newer one. So mlcls reads the version's file
list and nothing else: no rule of its own, and the same rows that
`pl.scan_delta`, `deltalake`, DuckDB and Spark read. An earlier version (the
tags of an earlier model) is `OutputTable.open(out, version=N)`.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Full, Queue
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from mlcls.errors import OptionError, OutputError
from mlcls.output.parts import BAD_READ, open_part, read_part
from mlcls.output.table import legacy_parts, open_table, table_meta, table_paths
from mlcls.storage import (
    StorageOptions,
    describe_os_error,
    full_uri,
    probe,
    retry_stream,
    stat,
    url_to_fs,
)


@dataclass
class OutputTable:
    """An mlcls output: where it is, its part files in reading order, and its footer metadata."""

    out: str
    fs: AbstractFileSystem
    parts: list[str]
    meta: dict[str, Any]
    storage_options: StorageOptions = None
    version: int = 0
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]))  # the table's: every class any version had
    _row_counts: list[int] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, out: str, storage_options: StorageOptions = None, version: int | None = None) -> OutputTable:
        """Open `out`'s current version (or `version`), or raise `OutputError` naming what is missing."""
        try:
            probe(out, storage_options)
            fs, base = url_to_fs(out, storage_options)
            info = stat(fs, base)
            if info is None:
                raise OutputError(f"output not found: {out}")
            if info.get("type") == "file":
                raise OutputError(f"output {out} is a file; give the folder or prefix that mlcls tag wrote")
            table = open_table(out, storage_options, version)
            if table is None and legacy_parts(out, storage_options):
                raise OutputError(f"output {out} was written before mlcls kept a Delta table: run mlcls compact "
                                  f"{out} once to make it one (its files are committed as they are)")
            parts = [] if table is None else table_paths(table, out, storage_options)
        except (OSError, ValueError, ImportError) as err:
            raise OutputError(f"cannot read output {out}: {describe_os_error(err)}") from err
        if not parts:
            raise OutputError(f"output {out} holds no tags; run mlcls tag SOURCE --out {out} first")
        return cls(out=out, fs=fs, parts=parts, meta=table_meta(table, out, storage_options),
                   storage_options=storage_options, version=table.version(),
                   schema=pa.schema(table.schema().to_arrow()))

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

    def row_counts(self) -> list[int]:
        """Rows per part, from the footers (read concurrently: one small request each on an object store)."""
        if self._row_counts is None:
            def count(path: str) -> int:
                return self.read_part(path, lambda pf: pf.metadata.num_rows)

            with ThreadPoolExecutor(max_workers=16) as pool:
                self._row_counts = list(pool.map(count, self.parts))
        return self._row_counts

    def scan(self) -> pl.LazyFrame:
        """A lazy polars scan of the version's rows, with each class's probability as a column `p_<class>`.

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
            return self._frames(list(with_columns or schema), predicate, n_rows, batch_size)

        return register_io_source(source, schema=schema, is_pure=True, explain_name="mlcls",
                                  explain_detail=f"{len(self.parts)} parts of {self.out}")

    def polars_schema(self) -> dict[str, pl.DataType]:
        """The columns of `scan()`: the files' columns, then `p_<class>` for every class."""
        schema = dict(pl.from_arrow(self.schema.empty_table()).schema)
        return schema | {prob_name(c): pl.Float32() for c in self.classes}

    def _frames(self, columns: list[str], predicate: pl.Expr | None, n_rows: int | None,
                batch_size: int | None) -> Iterator[pl.DataFrame]:
        needed = list(dict.fromkeys([*columns, *(predicate.meta.root_names() if predicate is not None else [])]))
        probs = [c[2:] for c in needed if c.startswith("p_") and c[2:] in self.thresholds]
        read = [c for c in needed if not c.startswith("p_")]
        if probs and "probs" not in read:
            read += ["probs"] if self.bounded else [f"probs.{c}" for c in probs]
        left = n_rows
        for batch in self.batches(read or ["uri"], batch_rows=batch_size or 65_536):
            keep = np.ones(batch.num_rows, dtype=bool)
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

    def batches(self, columns: Sequence[str], *, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Arrow record batches of `columns`, part by part.

        Memory stays about one row group being decoded plus two batches (the
        next is read while the caller works on this one).
        """
        return _prefetch(self._batches(list(columns), batch_rows))

    def _batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        for path in self.parts:
            try:
                # a fault mid-part: open the part again and skip the batches already handed on
                yield from retry_stream(lambda p=path: self._part_batches(p, columns, batch_rows),
                                        f"read {full_uri(self.fs, path)}", also=BAD_READ)
            except (OSError, pa.ArrowException) as err:
                raise OutputError(f"cannot read {full_uri(self.fs, path)}: {describe_os_error(err)}") from err

    def _part_batches(self, path: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with open_part(self.fs, path) as f:
            pf = pq.ParquetFile(f)
            have = pf.schema_arrow
            present = [c for c in columns if _column_in(have, c)]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
                yield batch if len(present) == len(columns) else _conform(batch, columns, self.schema)

    def read_part(self, path: str, read: Any) -> Any:
        """`read(ParquetFile)` of one part (its footer, mostly), done again after a transient error or bad read."""
        return read_part(self.fs, path, lambda source: read(pq.ParquetFile(source)))


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


def _column_in(schema: pa.Schema, column: str) -> bool:
    """Whether a file has `column` (`probs.dog`: a field of the struct): older files lack a newer model's classes."""
    name, _, child = column.partition(".")
    if name not in schema.names:
        return False
    kind = schema.field(name).type
    return not child or not pa.types.is_struct(kind) or kind.get_field_index(child) >= 0


def _conform(batch: pa.RecordBatch, columns: list[str], schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with the `columns` its file lacks added as nulls (the table's schema evolved after it was written)."""
    out: dict[str, pa.Array] = {}
    for column in columns:
        name, _, child = column.partition(".")
        kind = schema.field(name).type
        if not child:
            out[name] = batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows, kind)
            continue
        children = out.get(name) or (batch.column(name) if name in batch.schema.names else None)
        fields = {f.name: children.field(f.name) for f in children.type} if children is not None else {}
        fields.setdefault(child, pa.nulls(batch.num_rows, kind.field(child).type))
        mask = children.is_null() if children is not None else None
        out[name] = pa.StructArray.from_arrays(list(fields.values()), names=list(fields), mask=mask)
    return pa.RecordBatch.from_pydict(out)


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
