"""The output as a Delta Lake table: where it is, what its current version holds, what it can take.

Workers write Parquet parts (`mlcls.output.parts`); a run's parts join the
table in one commit (`mlcls.output.commit`). Everything that asks "what does
the output hold" reads the table's current version through this module, so
rows of a crashed run's uncommitted parts, or files a commit removed, are
never counted, and every reader that understands Delta (polars'
`scan_delta`, `deltalake`, DuckDB's `delta_scan`, Spark) sees the same rows.

The `deltalake` package (delta-rs) reaches object stores itself, not through
fsspec: `delta_options` turns mlcls's S3 settings (the environment, or
`storage_options` as given to s3fs) into delta-rs's, with commits made safe by
conditional puts (`If-None-Match`), which S3 has had since 2024.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from mlcls.errors import OutputError
from mlcls.images.load import READ_KIND
from mlcls.output.parts import INTERNAL_DIR, ProbsMode, read_dataset, read_footer_meta
from mlcls.storage import (
    S3_PROTOCOLS,
    StorageOptions,
    describe_os_error,
    join,
    list_files,
    probe,
    protocol_of,
    read_file,
    remove,
    retrying,
    stat,
    url_to_fs,
    write_atomic,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

LOG_DIR = "_delta_log"
META_FILE = "meta.json"  # under INTERNAL_DIR: the newest commit's footer metadata (classes, thresholds, model)
SPARK_REFUSED = set(" ,;{}()\n\t=")  # characters Spark's Delta writer refuses in column names without column mapping


def delta_uri(out: str) -> str:
    """The table's location for delta-rs: an absolute path on local disk, the URL elsewhere."""
    if "://" not in out or protocol_of(out) in ("file", "local"):
        path = out.split("://", 1)[1] if "://" in out else out
        return os.path.abspath(os.path.expanduser(path))
    return out.rstrip("/")


def delta_options(out: str, storage_options: StorageOptions = None) -> dict[str, str]:
    """delta-rs's storage options for `out`, from the same settings s3fs uses (theirs first, then the environment)."""
    if protocol_of(out) not in S3_PROTOCOLS:
        return {}
    so = storage_options or {}
    client = so.get("client_kwargs") or {}
    opts = {"conditional_put": "etag"}  # commits are put-if-absent: two writers never overwrite one version
    endpoint = so.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    region = client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    opts["region"] = region or "us-east-1"
    for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"), ("token", "session_token")):
        if so.get(ours):
            opts[theirs] = str(so[ours])
    return opts


class DeltaIOError(OSError):
    """A delta-rs error that a later attempt may not meet: its generic class covers failed and short reads."""


def delta_retrying(fn: Callable[[], T], what: str) -> T:
    """`fn()` (a delta-rs call that is safe to repeat), again after an I/O error, as mlcls's own reads are.

    delta-rs retries 5xx answers and resets itself, but a body cut short with
    a matching Content-Length reaches its JSON or Parquet parser and fails
    there, as a plain `DeltaError`, and a reset conditional PUT is not
    repeated (a plain `OSError`); its subclasses (a missing table, a commit
    conflict, a protocol or schema error) are not I/O and are raised at once.
    """
    from deltalake.exceptions import DeltaError

    def attempt() -> T:
        try:
            return fn()
        except DeltaError as err:
            if type(err) is DeltaError:
                raise DeltaIOError(str(err).splitlines()[0]) from err
            raise
        except OSError as err:  # delta-rs's object store gave up (it does not repeat a conditional PUT)
            if type(err) is OSError:
                raise DeltaIOError(str(err).splitlines()[0]) from err
            raise

    return retrying(attempt, what, also=(DeltaIOError,))


def open_table(out: str, storage_options: StorageOptions = None, version: int | None = None):
    """The `deltalake.DeltaTable` at `out` (at `version`, default the current one), or None if there is none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    def load():
        try:
            return DeltaTable(delta_uri(out), version=version, storage_options=delta_options(out, storage_options))
        except TableNotFoundError:
            return None

    try:
        return delta_retrying(load, f"read the Delta table {out}")
    except (OSError, ValueError, DeltaError) as err:
        if version is not None and "version" in str(err).lower():
            latest = open_table(out, storage_options)
            known = f"its versions are 0 to {latest.version()}" if latest is not None else "it is no Delta table"
            raise OutputError(f"output {out} has no version {version}: {known}") from err
        raise OutputError(f"cannot read the Delta table {out}: {describe_os_error(err)}") from err


def table_paths(table, out: str, storage_options: StorageOptions = None) -> list[str]:
    """The data files of `table`'s version as paths on `out`'s fsspec filesystem, sorted."""
    fs, _ = url_to_fs(out, storage_options)
    return sorted(fs._strip_protocol(uri) for uri in table.file_uris())


def current_files(out: str, storage_options: StorageOptions = None) -> list[str]:
    """The data files of the table's current version (fsspec paths); none for a folder that is no table yet."""
    table = open_table(out, storage_options)
    return [] if table is None else table_paths(table, out, storage_options)


def legacy_parts(out: str, storage_options: StorageOptions = None) -> list[str]:
    """Part files of an output written before the Delta table (no `_delta_log`): what `adopt` commits."""
    fs, base = url_to_fs(out, storage_options)
    if stat(fs, join(base, LOG_DIR)) is not None:
        return []
    found = []
    for p in list_files(fs, base):
        rel = p[len(base):].lstrip("/")
        if p.endswith(".parquet") and not any(part[:1] in "._" for part in rel.split("/")):
            found.append(p)
    return sorted(found)


def table_meta(table, out: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """The metadata (classes, thresholds, model, probs mode) of the version's newest file that has it in its
    footer; `_mlcls/meta.json` (written by each commit) where none has (files `compact` merged).

    Not a table property: delta-rs's `set_table_properties` hung on an S3
    server here (moto), and delta-kernel refuses unknown properties at creation.
    """
    fs, base = url_to_fs(out, storage_options)
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows:
        order = pc.sort_indices(actions, [("modification_time", "descending")])
        for rel in actions["path"].take(order).to_pylist()[:3]:
            meta = read_footer_meta(fs, join(base, rel))
            if meta:
                return meta
    try:
        return read_file(fs, join(base, INTERNAL_DIR, META_FILE), json.loads)
    except FileNotFoundError:
        return {}


def write_meta(out: str, meta: dict[str, Any], storage_options: StorageOptions = None) -> None:
    """Record the metadata of the rows a commit adds, for `table_meta` when no footer has it."""
    fs, base = url_to_fs(out, storage_options)
    write_atomic(fs, join(base, INTERNAL_DIR, META_FILE), json.dumps(meta).encode())


def read_identities(out: str, model_id: str, storage_options: StorageOptions = None, *,
                    retry_errors: bool = False) -> pa.Table:
    """`uri`, `etag`, `mtime` of every current row `model_id` wrote that counts as done, read column-wise.

    A `read` error row is not done: the file was never seen (storage failed
    after the retries), so the next run tries it again. Other error rows
    (`decode`, `empty`, `too_large`) are the file's own: done, unless
    `retry_errors`.
    """
    import pyarrow.dataset as ds

    empty = pa.table({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()),
                      "mtime": pa.array([], pa.timestamp("us", tz="UTC"))})
    parts = current_files(out, storage_options)
    if not parts:
        return empty
    fs, _ = url_to_fs(out, storage_options)
    error = ds.field("error")
    keep = error.is_null() if retry_errors else error.is_null() | ~pc.starts_with(error, pattern=f"{READ_KIND}:")
    condition = (ds.field("model") == model_id) & keep
    table = read_dataset(fs, parts, ["uri", "etag", "mtime"], condition, f"read the output {out}")
    return table if table.num_rows else empty


def read_errors(out: str, run_id: str, limit: int = 1000,
                storage_options: StorageOptions = None) -> tuple[list[tuple[str, str]], int]:
    """Up to `limit` (uri, error) rows a run wrote into the current version, and how many there are in all.

    Read back from the table rather than collected in memory, so a run with
    millions of images (on many machines) still lists what it could not tag.
    """
    import pyarrow.dataset as ds

    parts = current_files(out, storage_options)
    if not parts:
        return [], 0
    fs, _ = url_to_fs(out, storage_options)
    condition = (ds.field("run_id") == run_id) & ds.field("error").is_valid()
    table = read_dataset(fs, parts, ["uri", "error"], condition, f"read the errors of {out}").sort_by("uri")
    rows = list(zip(table["uri"].to_pylist()[:limit], table["error"].to_pylist()[:limit], strict=True))
    return rows, table.num_rows


def check_output(out: str, classes: Sequence[str], mode: ProbsMode, storage_options: StorageOptions = None) -> None:
    """Fail before any work if `out` cannot be written, or holds a `probs` column of the other kind.

    Other classes are fine: a newer model's new class is a schema change the
    table takes (older rows read it as null).
    """
    try:
        probe(out, storage_options)
        fs, base = url_to_fs(out, storage_options)
        info = stat(fs, base)
        if info is not None and info.get("type") == "file":
            raise OutputError(f"output {out} is a file; give a folder or prefix")
        path = join(base, INTERNAL_DIR, ".write-probe")
        write_atomic(fs, path, b"")
        remove(fs, path)
        table = open_table(out, storage_options)
        existing = table_meta(table, out, storage_options) if table is not None else \
            next((read_footer_meta(fs, p) for p in legacy_parts(out, storage_options)[:1]), {})
    except OutputError:
        raise
    except (OSError, ValueError, ImportError) as err:
        raise OutputError(f"cannot write to output {out}: {describe_os_error(err)}") from err
    if existing and (existing.get("probs", "all") == "all") != (mode.kind == "all"):
        raise OutputError(f"output {out} was written with --probs {existing['probs']}; its probs column "
                          f"cannot hold --probs {mode}: use the same kind, or another --out")
    odd = [c for c in classes if SPARK_REFUSED & set(c)]
    if odd:
        log.warning("class names %s hold characters (space , ; { } ( ) = tab newline) that Spark's Delta writer "
                    "refuses without column mapping; polars, DuckDB, pyarrow and deltalake read them as they are",
                    ", ".join(repr(c) for c in odd[:5]))
