"""The common questions as one call: filter by labels and probability, or SQL over the dataset.

`label_query` builds a lazy polars plan over `OutputTable.scan()`: only the
columns it names are read, and the label and probability filters push down
into the Parquet reader. `sql` runs DuckDB over the same parts, with the
dataset as the view `tags` (the reading rule of `mlcls.output.reader`: one row per
image, its newest) and `tags_all` (every stored row).

Semantics of the label filters: `labels` are the classes an image holds (at
or above their threshold), so `--label dog` means "tagged dog"; `--min-prob P`
adds "and each --label's probability is at least P" (without --label: "some
class at least P"). Rows with an error hold no labels and never match a label
filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from mlcls.errors import OptionError, OutputError
from mlcls.output.reader import OutputTable, prob_expr, prob_name
from mlcls.storage import is_local, retrying


@dataclass(frozen=True)
class LabelQuery:
    """What `mlcls query --label/--not-label/--min-prob/--limit` asks."""

    labels: tuple[str, ...] = ()
    not_labels: tuple[str, ...] = ()
    min_prob: float | None = None
    limit: int | None = None

    def validate(self) -> LabelQuery:
        if self.min_prob is not None and not 0.0 <= self.min_prob <= 1.0:
            raise OptionError(f"--min-prob must be between 0 and 1, not {self.min_prob}")
        if self.limit is not None and self.limit < 1:
            raise OptionError(f"--limit must be a positive integer, not {self.limit}")
        if overlap := set(self.labels) & set(self.not_labels):
            raise OptionError(f"{', '.join(sorted(overlap))} is both a --label and a --not-label: nothing can match")
        return self


def matches(dataset: OutputTable, q: LabelQuery) -> pl.LazyFrame:
    """The matching rows, unsorted and unlimited: `uri`, `labels`, one `p_<label>` per --label, `error`."""
    dataset.check_labels([*q.labels, *q.not_labels])
    lf = dataset.scan()
    condition = pl.lit(True)
    for label in q.labels:
        condition &= pl.col("labels").list.contains(label)
        if q.min_prob is not None:
            condition &= prob_expr(dataset, label) >= q.min_prob
    for label in q.not_labels:
        condition &= ~pl.col("labels").list.contains(label)
    if q.min_prob is not None and not q.labels:
        condition &= _max_prob(dataset) >= q.min_prob
    columns = [pl.col("uri"), pl.col("labels"), *(prob_expr(dataset, c).alias(prob_name(c)) for c in q.labels)]
    if not q.labels:
        columns.append(pl.col("error"))
    return lf.filter(condition).select(columns)


def label_query(dataset: OutputTable, q: LabelQuery) -> pl.DataFrame:
    """Run `q`: sorted by the first --label's probability (highest first), else by uri; at most `limit` rows."""
    q.validate()
    lf = matches(dataset, q)
    if q.labels:
        lf = lf.sort([prob_name(q.labels[0]), "uri"], descending=[True, False], nulls_last=True)
    else:
        lf = lf.sort("uri")
    if q.limit is not None:
        lf = lf.head(q.limit)
    return lf.collect(engine="streaming")


def count_matches(dataset: OutputTable, q: LabelQuery) -> int:
    return int(matches(dataset, q).select(pl.len()).collect(engine="streaming").item())


def _max_prob(dataset: OutputTable) -> pl.Expr:
    if dataset.bounded:
        return pl.col("probs").map.values().list.max()
    return pl.max_horizontal(*(prob_expr(dataset, c) for c in dataset.classes))


def duckdb_connection(dataset: OutputTable):  # -> duckdb.DuckDBPyConnection (imported lazily: a heavy module)
    """An in-memory DuckDB with the view `tags`: the table version's rows, one per image.

    The view reads the version's file list with `read_parquet`, which needs
    no DuckDB extension (its `delta` extension is downloaded on first use, and
    mlcls runs offline too); the list is the Delta log's, so the answer is
    `delta_scan`'s.
    """
    import duckdb

    con = duckdb.connect()
    if not is_local(dataset.fs):
        con.register_filesystem(dataset.fs)
    files = "[" + ", ".join(_sql_string(u) for u in dataset.part_uris) + "]"
    con.execute(f"create view tags as select * from read_parquet({files})")
    return con


def sql(dataset: OutputTable, statement: str, *, limit: int | None = None) -> pa.Table:
    """Run `statement` over the views; a DuckDB error becomes one-line `OptionError`.

    DuckDB reads the parts through our filesystem (and its retries); an I/O
    error that still reaches DuckDB runs the statement again, up to the
    storage policy's attempts: the views only read.
    """
    import duckdb

    try:
        return retrying(lambda: _run_sql(dataset, statement, limit), f"--sql over {dataset.out}",
                        also=(duckdb.IOException, _StorageFailed))
    except _StorageFailed as err:
        raise OutputError(f"--sql: cannot read {dataset.out}: {err}") from None
    except duckdb.Error as err:
        raise OptionError(f"--sql: {_first_line(str(err))}") from None


class _StorageFailed(Exception):
    """DuckDB stopped on a Python exception of our filesystem (it reports a traceback's text, nothing else):
    a storage error, never the SQL's."""


def _run_sql(dataset: OutputTable, statement: str, limit: int | None) -> pa.Table:
    import duckdb

    con = duckdb_connection(dataset)
    try:
        rel = con.sql(statement)
        if rel is None:
            raise OptionError("--sql must be a query that returns rows (a select)")
        if limit is not None:
            rel = rel.limit(limit)
        return rel.to_arrow_table()
    except duckdb.Error as err:
        text = str(err).strip()
        if text.startswith("Traceback (most recent call last)"):
            raise _StorageFailed(text.splitlines()[-1]) from err
        raise
    finally:
        con.close()


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def check_sql_args(statement: str | None, label_args: Sequence[object]) -> None:
    """--sql says everything itself: refuse the options it would silently ignore."""
    if statement is not None and any(label_args):
        raise OptionError("--sql cannot be combined with --label, --not-label or --min-prob: put them in the SQL")
