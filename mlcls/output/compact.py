"""Merge small part files and drop superseded rows, so that a crash at any moment loses nothing.

Readers apply one rule (`mlcls.output.reader`): an image's row is its newest, and
identical copies count once. Compaction only ever (a) adds merged parts
whose rows are copies of rows already stored, minus superseded ones, and then
(b) deletes the parts it merged. Under the reading rule the dataset answers
the same in every state in between: after (a) the copies tie with their
originals (same `tagged_at`, `run_id`, `model`: either one is the same row),
and (b) removes only rows that a merged part holds, or that are superseded.
No rename of a set of files is needed, which object stores cannot do
atomically anyway; each merged part appears in one step (local: temporary
file, fsync, rename; object store: one upload that completes or leaves no
object).

A journal, `_mlcls/compact/<id>.json`, records the plan before any change
(state `writing`) and is marked `committed` once every merged part exists.
The next `compact` finishes what a crash left: it deletes the partial merged
parts of an uncommitted journal, or the leftover inputs of a committed one.
Incremental runs stay incremental: the newest row per uri, which `mlcls tag`
matches files against, is always kept, with its identity columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlcls.errors import OptionError, OutputError
from mlcls.output.parts import BAD_READ, INTERNAL_DIR, META_KEY, dictionary_columns
from mlcls.output.reader import OutputTable
from mlcls.storage import (
    StorageOptions,
    describe_os_error,
    full_uri,
    is_local,
    join,
    list_dir,
    put_file,
    read_file,
    remove,
    retry_stream,
    stat,
    url_to_fs,
    write_atomic,
)

JOURNAL_DIR = "compact"
DEFAULT_TARGET_BYTES = 256 * 2**20
ROW_GROUP_ROWS = 100_000


@dataclass(frozen=True)
class PartInfo:
    """A part file as compaction sees it: size, rows, footer metadata, and an identity to detect rewrites."""

    path: str
    rows: int
    size: int
    meta: bytes
    identity: str


@dataclass
class Merge:
    """Parts (indices into the dataset's parts) merged into one new part."""

    inputs: list[int]
    output: str
    rows: int = 0


@dataclass
class CompactionPlan:
    id: str
    parts: list[PartInfo]
    merges: list[Merge]
    drop: dict[int, np.ndarray]  # part index -> superseded rows within it

    @property
    def inputs(self) -> list[PartInfo]:
        return [self.parts[i] for m in self.merges for i in m.inputs]


@dataclass
class CompactResult:
    out: str
    parts_before: int = 0
    parts_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    recovered: list[str] = field(default_factory=list)
    kept_changed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def dropped(self) -> int:
        return self.rows_before - self.rows_after


def compact(out: str, storage_options: StorageOptions = None, *,
            target_bytes: int = DEFAULT_TARGET_BYTES) -> CompactResult:
    """Recover an interrupted compaction, then merge small parts and drop superseded rows."""
    if target_bytes < 1:
        raise OptionError(f"--target-size must be positive, not {target_bytes}")
    started = time.perf_counter()
    result = CompactResult(out=out, recovered=recover(out, storage_options))
    dataset = OutputTable.open(out, storage_options)
    plan = plan_compaction(dataset, target_bytes)
    result.parts_before = len(plan.parts)
    result.rows_before = sum(p.rows for p in plan.parts)
    for step in compact_steps(dataset, plan):
        if step.startswith("kept "):
            result.kept_changed.append(step[5:])
    after = OutputTable.open(out, storage_options)
    result.parts_after, result.rows_after = len(after.parts), sum(after.row_counts())
    result.seconds = time.perf_counter() - started
    return result


def plan_compaction(dataset: OutputTable, target_bytes: int = DEFAULT_TARGET_BYTES) -> CompactionPlan:
    """Which parts to merge: small ones and any holding superseded rows, grouped by footer metadata."""
    parts = part_infos(dataset)
    drop = dataset.superseded_by_part()
    candidates = [i for i, p in enumerate(parts) if p.size < target_bytes // 2 or i in drop]
    groups: dict[bytes, list[int]] = {}
    for i in candidates:  # parts of different models (thresholds, digest) keep their own footers
        groups.setdefault(parts[i].meta, []).append(i)
    merges = []
    for members in groups.values():
        for inputs in _bins(members, parts, target_bytes):
            if len(inputs) > 1 or inputs[0] in drop:
                rows = sum(parts[i].rows - len(drop.get(i, ())) for i in inputs)
                merges.append(Merge(inputs=inputs, output=_merged_name(parts, inputs, drop), rows=rows))
    plan_id = hashlib.blake2b("\n".join(m.output for m in merges).encode(), digest_size=6).hexdigest()
    return CompactionPlan(id=plan_id, parts=parts, merges=merges, drop=drop)


def _bins(members: list[int], parts: list[PartInfo], target_bytes: int) -> Iterator[list[int]]:
    """Consecutive runs of parts whose sizes add up to at most `target_bytes` (at least one part each)."""
    current: list[int] = []
    size = 0
    for i in members:
        if current and size + parts[i].size > target_bytes:
            yield current
            current, size = [], 0
        current.append(i)
        size += parts[i].size
    if current:
        yield current


def _merged_name(parts: list[PartInfo], inputs: list[int], drop: dict[int, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for i in inputs:
        h.update(f"{os.path.basename(parts[i].path)}\0{parts[i].identity}\0{drop.get(i, np.empty(0)).tolist()}\n"
                 .encode())
    return f"part-m{h.hexdigest()}.parquet"


def part_infos(dataset: OutputTable) -> list[PartInfo]:
    """Footer and file info of every part (concurrently: one or two small requests each)."""
    def info(path: str) -> PartInfo:
        found = stat(dataset.fs, path)
        if found is None:
            raise OutputError(f"{full_uri(dataset.fs, path)} was removed while compact ran; run compact again")
        meta, rows = dataset.read_part(path, lambda pf: ((pf.schema_arrow.metadata or {}).get(META_KEY, b""),
                                                         pf.metadata.num_rows))
        return PartInfo(path=path, rows=rows, size=int(found.get("size") or 0), meta=meta, identity=_identity(found))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(info, dataset.parts))


def compact_steps(dataset: OutputTable, plan: CompactionPlan) -> Iterator[str]:
    """Carry out `plan`, yielding after every change to storage (a crash can only happen between two)."""
    if not plan.merges:
        return
    fs, base = url_to_fs(dataset.out, dataset.storage_options)
    journal = join(base, INTERNAL_DIR, JOURNAL_DIR, f"{plan.id}.json")
    record = {"id": plan.id, "state": "writing", "outputs": [m.output for m in plan.merges],
              "inputs": {os.path.basename(p.path): p.identity for p in plan.inputs}}
    write_atomic(fs, journal, json.dumps(record, indent=1).encode())
    yield "journal"
    for merge in plan.merges:
        write_merged(dataset, plan, merge, join(base, merge.output))
        yield f"wrote {merge.output}"
    write_atomic(fs, journal, json.dumps(record | {"state": "committed"}, indent=1).encode())
    yield "committed"
    for part in plan.inputs:
        yield _delete_if_unchanged(fs, part.path, part.identity)
    remove(fs, journal)
    yield "done"


def write_merged(dataset: OutputTable, plan: CompactionPlan, merge: Merge, path: str) -> None:
    """Stream the inputs of `merge`, minus superseded rows, into one new part that appears in one step."""
    schema = _schema_of(dataset, plan.parts[merge.inputs[0]].path)
    folder = None if not is_local(dataset.fs) else os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            with pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=dictionary_columns(schema)) as writer:
                for table in _merged_tables(dataset, plan, merge, schema):
                    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            f.flush()
            os.fsync(f.fileno())
        if folder is not None:
            os.replace(tmp, path)
        else:
            put_file(dataset.fs, tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write merged part {path}: {describe_os_error(err)}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _merged_tables(dataset: OutputTable, plan: CompactionPlan, merge: Merge, schema: pa.Schema) -> Iterator[pa.Table]:
    """The rows to keep, in input order, in tables of about `ROW_GROUP_ROWS` rows."""
    pending: list[pa.Table] = []
    pending_rows = 0
    for i in merge.inputs:
        drop = plan.drop.get(i, np.empty(0, np.int64))
        path = plan.parts[i].path
        start = 0
        try:
            for batch in retry_stream(lambda p=path: _part_batches(dataset, p), f"read {full_uri(dataset.fs, path)}",
                                      also=BAD_READ):
                keep = np.ones(batch.num_rows, dtype=bool)
                inside = drop[(drop >= start) & (drop < start + batch.num_rows)]
                keep[inside - start] = False
                start += batch.num_rows
                table = pa.Table.from_batches([batch.filter(pa.array(keep))]).cast(schema)
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= ROW_GROUP_ROWS:
                    yield pa.concat_tables(pending)
                    pending, pending_rows = [], 0
        except (OSError, pa.ArrowException) as err:
            raise OutputError(f"cannot read {full_uri(dataset.fs, path)}: {describe_os_error(err)}") from err
    if pending_rows:
        yield pa.concat_tables(pending)


def _part_batches(dataset: OutputTable, path: str) -> Iterator[pa.RecordBatch]:
    with dataset.open_part(path) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP_ROWS)


def _schema_of(dataset: OutputTable, path: str) -> pa.Schema:
    return dataset.read_part(path, lambda pf: pf.schema_arrow)


def _identity(info: dict) -> str:
    return str(info.get("ETag") or info.get("etag") or (info.get("size"), info.get("mtime")))


def _delete_if_unchanged(fs, path: str, identity: str) -> str:
    """Delete a merged input, unless it was rewritten since the plan (a retried shard): that one stays."""
    found = stat(fs, path)
    if found is None:
        return f"gone {os.path.basename(path)}"
    if _identity(found) != identity:
        return f"kept {os.path.basename(path)}"
    remove(fs, path)
    return f"deleted {os.path.basename(path)}"


def recover(out: str, storage_options: StorageOptions = None) -> list[str]:
    """Finish what interrupted compactions left: roll back uncommitted ones, complete committed ones."""
    try:
        fs, base = url_to_fs(out, storage_options)
        folder = join(base, INTERNAL_DIR, JOURNAL_DIR)
        journals = sorted(p for p in list_dir(fs, folder) if p.endswith(".json"))
        return [_recover_one(fs, base, journal) for journal in journals]
    except OSError as err:
        raise OutputError(f"cannot read output {out}: {describe_os_error(err)}") from err


def _recover_one(fs, base: str, journal: str) -> str:
    """Finish one journal's compaction (the journal is checked as JSON when read), then drop the journal."""
    record = read_file(fs, journal, json.loads)
    if record["state"] == "committed":
        for name, identity in record["inputs"].items():
            _delete_if_unchanged(fs, join(base, name), identity)
        message = f"finished interrupted compaction {record['id']}: removed the parts it had merged"
    else:
        for name in record["outputs"]:
            remove(fs, join(base, name))
        message = f"rolled back interrupted compaction {record['id']}: removed its partial merged parts"
    remove(fs, journal)
    return message
