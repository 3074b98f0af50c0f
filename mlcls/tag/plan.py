"""Plan a run: subtract what the output already holds, cut the rest into shards.

A file is done when the output has a row with the same URI, the same
identity (etag where the store gives one, else mtime) and the same model,
unless that row is a `read` error (storage failed us, not the file: tagged
again on the next run without being asked) or, with `retry_errors`, any
error row. A URI listed twice (a URI list may repeat one) is planned once.
The listing streams through in chunks; only compact sets of 64-bit keys (of
the done rows, and of the URIs listed so far) are held in memory, and each shard's file list is written as a
small Arrow file under `<out>/_mlcls/runs/<run id>/shards/`, so a task (or a
worker on another machine) receives a shard id and a URL, never a list of rows.

A shard's id is a hash of the model and of its files' identities: the same
work gets the same id, so a retried shard overwrites its own part file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlcls.errors import OutputError
from mlcls.output.parts import INTERNAL_DIR, TIMESTAMP
from mlcls.output.table import read_identities
from mlcls.sources import FileRecord, ListingStats, iter_source
from mlcls.storage import (
    StorageOptions,
    describe_os_error,
    full_uri,
    join,
    read_file,
    remove,
    url_to_fs,
    write_atomic,
)

MANIFEST_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string()),
                             ("mtime", TIMESTAMP)])
_CHUNK = 10_000


@dataclass(frozen=True)
class Shard:
    """A unit of work: `count` files listed in the Arrow file at `manifest`."""

    id: str
    count: int
    manifest: str


@dataclass
class RunPlan:
    """What a run will do, and what it found already done."""

    run_id: str
    listed: int = 0
    done: int = 0
    skipped: int = 0
    duplicates: int = 0
    shards: list[Shard] = field(default_factory=list)

    @property
    def new(self) -> int:
        return sum(s.count for s in self.shards)


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def uri_keys(table: pa.Table) -> np.ndarray:
    """64-bit keys of the URIs alone: one row per URI, whatever identities a list gives it."""
    return np.fromiter((_key(u) for u in table.column("uri").to_pylist()), dtype=np.uint64, count=table.num_rows)


class SeenKeys:
    """The keys met so far, in a few sorted arrays (8 bytes a key): the first of each key passes.

    New keys collect in a small array that is merged into the big one when
    it reaches an eighth of it, so each check is two binary searches and the
    merges cost O(n log n) over the whole listing.
    """

    def __init__(self) -> None:
        self.big = np.empty(0, np.uint64)
        self.small = np.empty(0, np.uint64)

    def first(self, keys: np.ndarray) -> np.ndarray:
        """A mask of the keys not met before (and the first of repeats within `keys`); remembers them."""
        _, index = np.unique(keys, return_index=True)
        mask = np.zeros(len(keys), dtype=bool)
        mask[index] = True
        mask &= ~(_contains(self.big, keys) | _contains(self.small, keys))
        self.small = np.union1d(self.small, keys[mask])
        if len(self.small) * 8 > max(len(self.big), 1 << 16):
            self.big, self.small = np.union1d(self.big, self.small), np.empty(0, np.uint64)
        return mask


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def identity_keys(table: pa.Table) -> np.ndarray:
    """64-bit keys of (uri, etag, else mtime): equal files give equal keys.

    Plain hashlib, so planning needs nothing beyond pyarrow (a GPU box with
    only torch can run the library); about a microsecond per row.
    """
    uris = table.column("uri").to_pylist()
    etags = table.column("etag").to_pylist()
    mtimes = pc.cast(table.column("mtime"), pa.int64()).to_pylist()
    keys = np.empty(len(uris), dtype=np.uint64)
    for i, (uri, etag, mtime) in enumerate(zip(uris, etags, mtimes, strict=True)):
        ident = etag if etag is not None else ("" if mtime is None else str(mtime))
        keys[i] = _key(f"{uri}\0{ident}")
    return keys


def records_table(records: Sequence[FileRecord]) -> pa.Table:
    return pa.table({
        "uri": pa.array([r.uri for r in records], pa.string()),
        "size": pa.array([r.size for r in records], pa.int64()),
        "etag": pa.array([r.etag for r in records], pa.string()),
        "mtime": pa.array([r.mtime for r in records], TIMESTAMP),
    }, schema=MANIFEST_SCHEMA)


def shard_id(model_id: str, table: pa.Table) -> str:
    """Content-derived, stable across processes and versions."""
    h = hashlib.blake2b(model_id.encode(), digest_size=8)
    for uri, etag, mtime in zip(*(table.column(c).to_pylist() for c in ("uri", "etag", "mtime")), strict=True):
        h.update(f"{uri}\0{etag}\0{mtime}\n".encode())
    return h.hexdigest()


def run_dir(out: str, run_id: str) -> str:
    return join(out.rstrip("/"), INTERNAL_DIR, "runs", run_id)


def plan_shards(source: str | Sequence[str], out: str, model_id: str, *, shard_size: int, run_id: str,
                storage_options: StorageOptions = None, limit: int | None = None,
                retry_errors: bool = False) -> RunPlan:
    """List `source`, drop repeats and what `out` holds for `model_id`, write shard manifests; return the plan."""
    plan = RunPlan(run_id=run_id)
    for _ in iter_shards(source, out, model_id, plan, shard_size=shard_size, storage_options=storage_options,
                         limit=limit, retry_errors=retry_errors):
        pass
    return plan


def iter_shards(source: str | Sequence[str], out: str, model_id: str, plan: RunPlan, *, shard_size: int,
                storage_options: StorageOptions = None, limit: int | None = None,
                retry_errors: bool = False) -> Iterator[Shard]:
    """Yield each shard as soon as its manifest is written, while the listing goes on.

    So the first shard is tagged while a listing of hours is still running.
    `plan` holds the running totals (and the shards so far); they are final
    when the generator is exhausted. The done identities are read once, before
    the first file is listed: a shard's content never depends on when it was cut.
    """
    done = read_identities(out, model_id, storage_options, retry_errors=retry_errors)
    done_keys = np.unique(identity_keys(done))
    del done
    stats = ListingStats()
    seen = SeenKeys()
    pending: list[pa.Table] = []
    pending_rows = 0
    for listed in _chunks(iter_source(source, storage_options, stats), min(_CHUNK, shard_size), limit):
        chunk = listed.filter(pa.array(seen.first(uri_keys(listed))))
        plan.duplicates += listed.num_rows - chunk.num_rows
        plan.listed += chunk.num_rows
        keys = identity_keys(chunk)
        new = chunk.filter(pa.array(~np.isin(keys, done_keys, assume_unique=False)))
        plan.done += chunk.num_rows - new.num_rows
        plan.skipped = stats.skipped
        pending.append(new)
        pending_rows += new.num_rows
        while pending_rows >= shard_size:
            table = pa.concat_tables(pending)
            pending, pending_rows = [table.slice(shard_size)], table.num_rows - shard_size
            yield _add_shard(plan, write_shard(out, plan.run_id, model_id, table.slice(0, shard_size),
                                                storage_options))
    plan.skipped = stats.skipped
    if pending_rows:
        yield _add_shard(plan, write_shard(out, plan.run_id, model_id, pa.concat_tables(pending), storage_options))


def _add_shard(plan: RunPlan, shard: Shard) -> Shard:
    plan.shards.append(shard)
    return shard


def _chunks(records: Iterator[FileRecord], size: int, limit: int | None) -> Iterator[pa.Table]:
    batch: list[FileRecord] = []
    for n, record in enumerate(records):
        if limit is not None and n >= limit:
            break
        batch.append(record)
        if len(batch) == size:
            yield records_table(batch)
            batch = []
    if batch:
        yield records_table(batch)


def write_shard(out: str, run_id: str, model_id: str, table: pa.Table,
                storage_options: StorageOptions = None) -> Shard:
    """Write the manifest of one shard (a `records_table`) under the run's folder; `tag_shard` reads it back.

    Public for the throughput bench on a machine without the Delta layer (the
    lent GPU box has no deltalake or polars): it cuts its shard here and tags
    it with `tag_shard`, the work whose rate it measures, with no table to
    subtract from or commit to.
    """
    table = table.combine_chunks()
    sid = shard_id(model_id, table)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, MANIFEST_SCHEMA) as writer:
        writer.write_table(table)
    fs, base = url_to_fs(run_dir(out, run_id), storage_options)
    path = join(base, "shards", f"{sid}.arrow")
    write_atomic(fs, path, sink.getvalue().to_pybytes())
    return Shard(id=sid, count=table.num_rows, manifest=full_uri(fs, path))


def read_shard(shard: Shard, storage_options: StorageOptions = None) -> list[FileRecord]:
    """The file records of a shard, from its manifest: checked (size, Arrow footer, row count), never trusted.

    A manifest read back short or empty (a throttled store's bad answer) is
    read again; one that stays bad fails the shard with its reason, and the
    shard's retries read it once more.
    """
    fs, path = url_to_fs(shard.manifest, storage_options)

    def parse(data: bytes) -> pa.Table:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        if table.num_rows != shard.count:
            raise ValueError(f"it lists {table.num_rows} files, the plan says {shard.count}")
        return table

    try:
        table = read_file(fs, path, parse)
    except OSError as err:
        raise OutputError(f"cannot read the manifest of shard {shard.id} ({shard.manifest}): "
                          f"{describe_os_error(err)}") from err
    cols = [table.column(c).to_pylist() for c in ("uri", "size", "etag", "mtime")]
    return [FileRecord(uri=u, size=s, etag=e, mtime=m) for u, s, e, m in zip(*cols, strict=True)]


def remove_manifests(out: str, run_id: str, storage_options: StorageOptions = None) -> None:
    """Delete a finished run's shard manifests (the summary stays)."""
    fs, base = url_to_fs(run_dir(out, run_id), storage_options)
    remove(fs, join(base, "shards"), recursive=True)
