"""A run's parts join the Delta table in one commit; the rows they supersede leave it in that same commit.

Workers write their parts (`mlcls.output.parts`) without touching the
table. Once the run's shards are in, `commit_parts` adds them in one Delta
transaction. An image tagged again (a changed file, a newer model) has an
older row in some file of the table: that file is rewritten without the row
and the commit swaps it (remove + add), so the current version holds exactly
one row per uri, the newest (latest `tagged_at`, then `run_id`, then
`model`, then the later file). A reader sees the version before or after the
commit, never half of it.

Exactly once: the commit carries an app transaction (`mlcls-run-<run id>`),
so a retried commit whose first attempt landed does nothing. A commit that
loses a race with another writer's conflicting commit is planned again on
the new version (delta-rs retries the ones that do not conflict itself). If
another run's rows for the same uris landed between our read and our commit,
a second commit settles them by the same rule.

Finding the superseded rows costs one pass over the `uri` column of the
run's parts (a 64-bit hash a row: 8 bytes, 80 MB per 10 million) and one of
the table's other files that could hold those uris (files whose uri range
misses the run's are skipped by their Delta statistics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlcls.errors import OutputError
from mlcls.output.parts import BAD_READ, meta_of_schema, open_part, part_bytes, read_part
from mlcls.output.table import (
    delta_options,
    delta_retrying,
    delta_uri,
    legacy_parts,
    open_table,
    table_paths,
    write_meta,
)
from mlcls.storage import (
    StorageOptions,
    describe_os_error,
    full_uri,
    remove,
    retrying,
    url_to_fs,
    write_atomic,
)

log = logging.getLogger(__name__)

APP_PREFIX = "mlcls-run-"
ADOPT_RUN = "adopt"  # the app transaction of turning a folder of parts into a table
NEWEST_FIRST = ("tagged_at", "run_id", "model", "_order")
MAX_ATTEMPTS = 8


@dataclass
class CommitResult:
    """What a commit did; `version` is the table version after it (None when there was nothing to commit)."""

    version: int | None
    added: int = 0  # the run's own files in the table: its parts, or their rewrites without superseded rows
    rewritten: int = 0
    superseded: int = 0
    already: bool = False  # an earlier attempt of this run's commit had landed


@dataclass
class _Plan:
    adds: list[str] = field(default_factory=list)  # paths of files to add
    removes: list[str] = field(default_factory=list)  # table files to remove
    written: list[str] = field(default_factory=list)  # files this plan wrote (rewrites): deleted if it is dropped
    replaced: list[str] = field(default_factory=list)  # own parts replaced by a rewrite: deleted after the commit
    older: set[str] = field(default_factory=set)  # rewrites of other runs' files: dated a moment earlier
    superseded: int = 0
    stats: dict[str, str] = field(default_factory=dict)  # path -> Delta stats JSON


def commit_parts(out: str, run_id: str, parts: Sequence[str], storage_options: StorageOptions = None) -> CommitResult:
    """Add a run's part files (URIs under `out`) to the table in one commit; superseded rows leave it."""
    from deltalake.exceptions import CommitFailedError, DeltaError

    fs, base = url_to_fs(out, storage_options)
    own = sorted({fs._strip_protocol(p) for p in parts})
    app = APP_PREFIX + run_id
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if attempt > 1:
            time.sleep(min(8.0, 0.2 * 2 ** attempt))
        table = open_table(out, storage_options)
        if table is not None and (table.transaction_version(app) or 0) >= 1:
            return CommitResult(table.version(), already=True)
        if not own:
            return CommitResult(None if table is None else table.version())
        others = [] if table is None else [p for p in table_paths(table, out, storage_options) if p not in own]
        plan = plan_commit(fs, base, own, others, run_id, table)
        try:
            version = _commit(out, storage_options, table, plan, app, run_id)
        except CommitFailedError as err:
            _discard(fs, plan.written)
            log.info("commit of run %s met a concurrent commit (attempt %d): %s", run_id, attempt, err)
            continue
        except (OSError, DeltaError) as err:  # it may have landed: the app transaction tells, on the next attempt
            log.warning("commit of run %s failed (attempt %d of %d): %s", run_id, attempt, MAX_ATTEMPTS,
                        describe_os_error(err))
            continue
        for path in plan.replaced:
            remove(fs, path)
        result = CommitResult(version, added=len(plan.adds) - len(plan.older), rewritten=len(plan.removes),
                              superseded=plan.superseded)
        if table is not None and version > table.version() + 1:
            result.version = settle(out, run_id, plan.adds, storage_options) or version
        log.info("committed run %s as version %s of %s: %d parts, %d superseded rows", run_id, result.version,
                 full_uri(fs, base), result.added, result.superseded)
        return result
    raise OutputError(f"could not commit run {run_id} to {out} in {MAX_ATTEMPTS} attempts (concurrent commits or "
                      "storage errors, logged above); run mlcls tag again: what is not in the table is tagged again")


def settle(out: str, run_id: str, mine: Sequence[str], storage_options: StorageOptions = None) -> int | None:
    """After other commits landed between our read and ours: drop rows of the same uris by the rule, once more."""
    from deltalake.exceptions import CommitFailedError

    fs, base = url_to_fs(out, storage_options)
    for _ in range(MAX_ATTEMPTS):
        table = open_table(out, storage_options)
        current = table_paths(table, out, storage_options)
        own = [p for p in mine if p in current]
        plan = plan_commit(fs, base, own, [p for p in current if p not in own], run_id, table, committed=True)
        if not plan.removes:
            return table.version()
        try:
            return _commit(out, storage_options, table, plan, None, run_id)
        except CommitFailedError:
            _discard(fs, plan.written)
    return None


def adopt(out: str, storage_options: StorageOptions = None) -> CommitResult:
    """Make a folder of parts written before the Delta table into one, committing its files as they are.

    Only files holding superseded rows are rewritten (their older rows would
    otherwise count twice); the rest are committed without a byte changed.
    """
    parts = legacy_parts(out, storage_options)
    if not parts:
        return CommitResult(None)
    fs, _ = url_to_fs(out, storage_options)
    result = commit_parts(out, ADOPT_RUN, [full_uri(fs, p) for p in parts], storage_options)
    log.info("%s is now a Delta table: %d of its %d part files committed, %d superseded rows left out",
             out, result.added, len(parts), result.superseded)
    return result


def ensure_table(out: str, schema: pa.Schema, storage_options: StorageOptions = None) -> None:
    """Create an empty table at `out` if there is none, before a run writes parts.

    With the table there from the start, a run killed before its commit
    leaves parts the table never lists (vacuum deletes them), not a folder of
    parts that the next run would take for a pre-Delta output and adopt.
    """
    from deltalake import Schema
    from deltalake.exceptions import DeltaError
    from deltalake.transaction import create_table_with_add_actions

    if open_table(out, storage_options) is not None:
        return
    try:
        delta_retrying(lambda: create_table_with_add_actions(
            delta_uri(out), Schema.from_arrow(schema), [], mode="ignore",
            storage_options=delta_options(out, storage_options)), f"create the Delta table {out}")
    except (OSError, DeltaError) as err:
        if open_table(out, storage_options) is None:  # not a concurrent creator that won: a real failure
            raise OutputError(f"cannot create the Delta table {out}: {describe_os_error(err)}") from err


def plan_commit(fs, base: str, own: list[str], others: list[str], run_id: str, table: Any,
                *, committed: bool = False) -> _Plan:
    """Which files to add, remove and rewrite so that each uri of `own` keeps only its newest row."""
    own_uris = [_read(fs, p, ["uri"])["uri"] for p in own]
    hashes = np.concatenate([_hashes(u) for u in own_uris]) if own_uris else np.empty(0, np.uint64)
    ranges = [_range(u) for u in own_uris]
    lo, hi = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (None, None)
    wanted = np.unique(hashes)
    ordered = np.sort(hashes)
    repeated = [np.unique(ordered[1:][ordered[1:] == ordered[:-1]])]  # a uri twice among the run's own rows
    hit_files = []
    for path in _overlapping(table, others, base, lo, hi):
        found = _hashes(_read(fs, path, ["uri"])["uri"])
        hits = np.unique(found[np.isin(found, wanted)])
        if len(hits):
            hit_files.append(path)
            repeated.append(hits)
    plan = _Plan()
    repeated_all = np.unique(np.concatenate(repeated))
    drops = _superseded(fs, own, hit_files, repeated_all) if len(repeated_all) else {}
    plan.superseded = sum(len(r) for r in drops.values())
    for path, uris, (first, last) in zip(own, own_uris, ranges, strict=True):
        if path not in drops:
            plan.adds.append(path)
            plan.stats[path] = _stats(len(uris), first, last)
            continue
        if committed:
            plan.removes.append(path)
        else:
            plan.replaced.append(path)
        _rewrite(fs, path, drops[path], run_id, plan)
    for path in hit_files:
        if path in drops:
            plan.removes.append(path)
            new = _rewrite(fs, path, drops[path], run_id, plan)
            if new:
                plan.older.add(new)
    return plan


def _overlapping(table: Any, paths: list[str], base: str, lo: str | None, hi: str | None) -> list[str]:
    """The files whose uri range (Delta statistics) meets [lo, hi]; files without statistics count as meeting it."""
    if table is None or lo is None or not paths:
        return paths
    actions = pa.table(table.get_add_actions(flatten=True))
    names = actions.column_names
    if "min.uri" not in names or "max.uri" not in names:
        return paths
    ranges = {a: (mn, mx) for a, mn, mx in zip(actions["path"].to_pylist(), actions["min.uri"].to_pylist(),
                                                 actions["max.uri"].to_pylist(), strict=True)}
    keep = []
    for path in paths:
        mn, mx = ranges.get(path[len(base):].lstrip("/"), (None, None))
        if mn is None or mx is None or not (mx < lo or mn > hi):
            keep.append(path)
    return keep


def _superseded(fs, own: list[str], hit_files: list[str], repeated: np.ndarray) -> dict[str, np.ndarray]:
    """{file: row numbers to drop}: every row of a repeated uri except its newest."""
    import polars as pl  # here, not at the top: a worker that only tags shards runs without polars

    frames = []
    files = hit_files + own  # own parts last: on a full tie the run's own row wins
    for order, path in enumerate(files):
        t = _read(fs, path, ["uri", "tagged_at", "run_id", "model"])
        rows = np.flatnonzero(np.isin(_hashes(t["uri"]), repeated))
        if len(rows):
            df = pl.from_arrow(t.take(pa.array(rows)))
            assert isinstance(df, pl.DataFrame)
            frames.append(df.with_columns(_file=pl.lit(order), _row=pl.Series(rows, dtype=pl.Int64),
                                          _order=pl.lit(order) * (1 << 40) + pl.Series(rows, dtype=pl.Int64)))
    if not frames:
        return {}
    rows = pl.concat(frames).filter(pl.col("uri").is_duplicated())  # a hash that repeats for other uris is none
    newest = rows.sort(list(NEWEST_FIRST), descending=True, nulls_last=True).unique("uri", keep="first")
    dropped = rows.join(newest.select("_order"), on="_order", how="anti")
    return {files[i]: np.sort(g["_row"].to_numpy()) for (i,), g in dropped.group_by("_file")}


def _rewrite(fs, path: str, drop: np.ndarray, run_id: str, plan: _Plan) -> str | None:
    """Write `path` without the rows `drop` as a new file (the table's files never change in place)."""
    table = _read(fs, path, None)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[drop] = False
    if not keep.any():
        return None
    table = table.filter(pa.array(keep))
    stem = re.sub(r"-rw[0-9a-f]{8}$", "", path.rsplit("/", 1)[-1].removesuffix(".parquet"))
    tag = hashlib.blake2b(f"{run_id}:{path}".encode(), digest_size=4).hexdigest()
    new = f"{path.rsplit('/', 1)[0]}/{stem}-rw{tag}.parquet"  # plain characters: delta-rs escapes others
    write_atomic(fs, new, part_bytes(table))
    plan.adds.append(new)
    plan.written.append(new)
    plan.stats[new] = _stats(table.num_rows, *_range(table["uri"]))
    return new


def _commit(out: str, storage_options: StorageOptions, table: Any, plan: _Plan, app: str | None,
            run_id: str) -> int:
    """One transaction: the plan's adds and removes (and the app transaction); returns the new version."""
    from deltalake import Schema
    from deltalake.transaction import (
        AddAction,
        CommitProperties,
        RemoveAction,
        Transaction,
        create_table_with_add_actions,
    )

    fs, base = url_to_fs(out, storage_options)
    now = int(time.time() * 1000)
    schema = _schema(fs, plan.adds[0]) if plan.adds else pa.schema(table.schema().to_arrow())
    meta = meta_of_schema(schema)
    if meta:
        write_meta(out, meta, storage_options)
    # the run's own files are the newest: `table_meta` takes the model's metadata from the newest file's footer
    adds = [AddAction(p[len(base):].lstrip("/"), _size(fs, p), {}, now - (p in plan.older), True, plan.stats[p])
            for p in plan.adds]
    removes = [RemoveAction(p[len(base):].lstrip("/"), True, now) for p in plan.removes]
    props = CommitProperties(app_transactions=[Transaction(app, 1, now)] if app else None,
                             custom_metadata={"mlcls.run_id": run_id})
    uri, opts = delta_uri(out), delta_options(out, storage_options)
    if table is None:
        create_table_with_add_actions(uri, Schema.from_arrow(schema), adds, mode="error",
                                      storage_options=opts, commit_properties=props)
    else:
        _merge_schema(table, schema, uri, opts)
        table.create_write_transaction([*adds, *removes], "append", schema, commit_properties=props)
    return open_table(out, storage_options).version()


def _merge_schema(table: Any, schema: pa.Schema, uri: str, opts: dict[str, str]) -> None:
    """A newer model's new classes join the table's schema (a commit of its own, before the data)."""
    from deltalake import write_deltalake

    current = pa.schema(table.schema().to_arrow())
    if not _covers(current, schema):
        write_deltalake(uri, schema.empty_table(), mode="append", schema_mode="merge", storage_options=opts)
        table.update_incremental()


def _covers(current: pa.Schema, new: pa.Schema) -> bool:
    """True when every field of `new` (struct fields included) is in `current`."""
    for f in new:
        if f.name not in current.names:
            return False
        have = current.field(f.name).type
        if pa.types.is_struct(f.type) and pa.types.is_struct(have) and \
                not {c.name for c in f.type} <= {c.name for c in have}:
            return False
    return True


def _schema(fs, path: str) -> pa.Schema:
    """The Arrow schema of a file to add (the run's own first part: its footer metadata names the run's model).

    Storage errors stay `OSError`s, not `read_part`'s `OutputError`: inside
    the commit they fail this attempt, and `commit_parts` tries again.
    """
    def read() -> pa.Schema:
        with open_part(fs, path) as source:
            return pq.read_schema(source)

    return retrying(read, f"read {full_uri(fs, path)}", also=BAD_READ)


def _read(fs, path: str, columns: list[str] | None) -> pa.Table:
    """Columns of one file in row order, read again after a transient error or a bad read."""
    return read_part(fs, path, lambda source: pq.read_table(source, columns=columns))


def _hashes(uris: pa.ChunkedArray | pa.Array) -> np.ndarray:
    import polars as pl

    return pl.Series(uris).hash().to_numpy()


def _range(uris: pa.ChunkedArray) -> tuple[str, str]:
    mm = pc.min_max(uris)
    return mm["min"].as_py() or "", mm["max"].as_py() or ""


def _stats(rows: int, lo: str, hi: str) -> str:
    """Delta file statistics: the row count and the uri range, which readers (and `_overlapping`) skip files by."""
    return json.dumps({"numRecords": rows, "minValues": {"uri": lo}, "maxValues": {"uri": hi},
                       "nullCount": {"uri": 0}})


def _size(fs, path: str) -> int:
    return int(retrying(lambda: fs.info(path), f"stat {full_uri(fs, path)}")["size"])


def _discard(fs, paths: list[str]) -> None:
    for path in paths:
        try:
            remove(fs, path)
        except OSError as err:  # an orphan file is harmless: the table never references it, vacuum deletes it
            log.warning("could not delete %s: %s", full_uri(fs, path), describe_os_error(err))
