"""List an image collection as a stream of file records.

A source is a folder at any fsspec URL (listed recursively), a single image,
a URI list file (`.txt`, `.csv`, `.tsv` or `.parquet` with a `uri` column,
e.g. an S3 inventory), or a Python sequence of URIs. Listing streams: S3 is
read page by page and other filesystems folder by folder, so a bucket of
millions of objects never sits in memory as one listing.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fsspec import AbstractFileSystem

from mlcls import storage
from mlcls.errors import SourceError
from mlcls.storage import StorageOptions, describe_os_error, full_uri, is_local, url_to_fs

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".avif", ".ico",
})
URI_LIST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".tsv", ".parquet"})
S3_PAGE_SIZE = 1000  # keys per ListObjectsV2 request (the S3 maximum)
_URI_COLUMNS = ("uri", "url", "path")
_ETAG_COLUMNS = ("etag", "e_tag")
_MTIME_COLUMNS = ("mtime", "last_modified", "last_modified_date")


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One file to tag, with the identity used to skip it when unchanged."""

    uri: str
    size: int | None = None
    etag: str | None = None
    mtime: datetime | None = None


@dataclass
class ListingStats:
    """What a listing saw besides the records it yielded."""

    files: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, uri: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(uri)


def is_image_name(name: str) -> bool:
    """An image by extension (case-insensitive), and not a hidden file such as `._x.jpg`."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def iter_source(
    source: str | Sequence[str],
    storage_options: StorageOptions = None,
    stats: ListingStats | None = None,
) -> Iterator[FileRecord]:
    """Yield the records of `source`; raise `SourceError` if it is missing or holds no images."""
    stats = stats if stats is not None else ListingStats()
    if isinstance(source, str):
        records = _iter_url(source, storage_options, stats)
        where = source
    else:
        records = _iter_uris(source, base=None)
        where = f"the list of {len(source)} URIs"
    count = 0
    for record in records:
        count += 1
        stats.files += 1
        yield record
    if count == 0:
        hint = f" ({stats.skipped} files without an image extension were skipped)" if stats.skipped else ""
        raise SourceError(f"no images found in {where}{hint}")


def check_source(source: str | Sequence[str], storage_options: StorageOptions = None) -> None:
    """Fail fast: the source exists and holds an image (reads one listing page at most)."""
    records = iter_source(source, storage_options)
    next(records)
    records.close()


def _iter_url(url: str, storage_options: StorageOptions, stats: ListingStats) -> Iterator[FileRecord]:
    if not url.strip():
        raise SourceError("the source is empty: give a folder, URL or URI list")
    try:
        storage.probe(url, storage_options)
        fs, path = url_to_fs(url, storage_options)
        info = storage.stat(fs, path)
    except (OSError, ValueError, ImportError) as err:
        raise SourceError(f"cannot read source {url}: {describe_os_error(err)}") from err
    if info is None:
        raise SourceError(f"source not found: {url}")
    if info.get("type") == "file":
        ext = os.path.splitext(path)[1].lower()
        if ext in URI_LIST_EXTENSIONS:
            try:
                yield from _iter_uri_list(fs, path)
            except OSError as err:
                raise SourceError(f"cannot read URI list {url}: {describe_os_error(err)}") from err
        elif ext in IMAGE_EXTENSIONS:
            yield _record_from_info(fs, info)
        else:
            raise SourceError(
                f"source {url} is a file that is neither an image nor a URI list "
                f"({', '.join(sorted(URI_LIST_EXTENSIONS))})"
            )
        return
    try:
        for info in _walk_files(fs, path):
            if is_image_name(info["name"]):
                yield _record_from_info(fs, info)
            else:
                stats.skip(full_uri(fs, info["name"]))
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot list {url}: {describe_os_error(err)}") from err


def _walk_files(fs: AbstractFileSystem, root: str) -> Iterator[dict]:
    """File infos under `root` in a stable order, streaming where the filesystem allows."""
    if is_local(fs):
        yield from _walk_local(root)
    elif hasattr(fs, "call_s3"):
        yield from _walk_s3(fs, root)
    else:  # a sorted walk: after a failure, walk again and skip what was yielded
        fs.invalidate_cache(root)
        yield from storage.retry_stream(lambda: _walk_other(fs, root), f"list {full_uri(fs, root)}")


def _walk_other(fs: AbstractFileSystem, root: str) -> Iterator[dict]:
    for _folder, dirs, files in fs.walk(root, detail=True):
        for hidden in [d for d in dirs if d.startswith(".")]:
            del dirs[hidden]  # walk is top-down: pruning here skips the folder
        for name in sorted(files):
            yield files[name]


def _walk_local(root: str) -> Iterator[dict]:
    """Recursive scandir, sorted, skipping hidden folders."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            if not entry.name.startswith("."):
                yield from _walk_local(entry.path)
        elif entry.is_file(follow_symlinks=True):
            st = entry.stat()
            yield {"name": entry.path, "size": st.st_size, "mtime": st.st_mtime_ns / 1e9, "type": "file"}


def _walk_s3(fs: AbstractFileSystem, root: str) -> Iterator[dict]:
    """ListObjectsV2 page by page (1,000 keys each), so memory stays flat for any bucket size.

    Each page is one request, retried on its own (its continuation token
    names it), so a fault on page 900 costs one page, not the listing.
    """
    bucket, _, prefix = root.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    kwargs: dict = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_SIZE}
    while True:
        page = storage.retrying(lambda: fs.call_s3("list_objects_v2", **kwargs), f"list {full_uri(fs, root)}")
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue
            yield {
                "name": f"{bucket}/{obj['Key']}",
                "size": obj["Size"],
                "ETag": obj.get("ETag"),
                "LastModified": obj.get("LastModified"),
                "type": "file",
            }
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _record_from_info(fs: AbstractFileSystem, info: dict) -> FileRecord:
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return FileRecord(
        uri=full_uri(fs, info["name"]),
        size=int(info["size"]) if info.get("size") is not None else None,
        etag=str(etag).strip('"') if etag else None,
        mtime=_to_datetime(mtime),
    )


def _to_datetime(value: object) -> datetime | None:
    """Normalise an mtime (epoch seconds, datetime or ISO string) to UTC, microsecond precision."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(round(float(value) * 1e6) / 1e6, tz=UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    raise SourceError(f"cannot read a modification time from {value!r}")


def _iter_uri_list(fs: AbstractFileSystem, path: str) -> Iterator[FileRecord]:
    """Records from a URI list; relative entries resolve against the list's folder."""
    base = full_uri(fs, path.rsplit("/", 1)[0]) if "/" in path else None
    ext = os.path.splitext(path)[1].lower()
    where = full_uri(fs, path)
    if ext == ".parquet":
        def read() -> Iterator[dict]:
            return _parquet_rows(fs, path, where)
    elif ext in (".csv", ".tsv"):
        def read() -> Iterator[dict]:
            return _csv_rows(fs, path, where, delimiter="\t" if ext == ".tsv" else ",")
    else:
        def read() -> Iterator[dict]:
            return ({"uri": line} for line in _text_lines(fs, path))
    # streamed, not read whole (an inventory can be large): after a failure, read again and skip what was yielded
    for row in storage.retry_stream(read, f"read {where}"):
        uri = _resolve(str(row["uri"]).strip(), base)
        yield FileRecord(
            uri=uri,
            size=int(row["size"]) if row.get("size") not in (None, "") else None,
            etag=str(row["etag"]).strip('"') if row.get("etag") else None,
            mtime=_to_datetime(row.get("mtime")),
        )


def _iter_uris(uris: Iterable[str], base: str | None) -> Iterator[FileRecord]:
    for uri in uris:
        if not isinstance(uri, str) or not uri.strip():
            raise SourceError(f"the URI list holds an entry that is not a URI: {uri!r}")
        yield FileRecord(uri=_resolve(uri.strip(), base))


def _resolve(uri: str, base: str | None) -> str:
    if "://" in uri:
        return uri
    if os.path.isabs(uri):
        return uri
    if base is None:
        return os.path.abspath(uri)
    return f"{base}/{uri}" if "://" in base else os.path.normpath(os.path.join(base, uri))


def _text_lines(fs: AbstractFileSystem, path: str) -> Iterator[str]:
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _pick(columns: Sequence[str], choices: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in choices if c in lower), None)


def _column_map(columns: Sequence[str], where: str) -> dict[str, str]:
    """Map our names (uri, size, etag, mtime) to the file's column names."""
    uri = _pick(columns, _URI_COLUMNS)
    if uri is None:
        raise SourceError(f"URI list {where} has no 'uri' column (it has: {', '.join(columns)})")
    found = {"uri": uri, "size": _pick(columns, ("size",)), "etag": _pick(columns, _ETAG_COLUMNS),
             "mtime": _pick(columns, _MTIME_COLUMNS)}
    return {ours: theirs for ours, theirs in found.items() if theirs is not None}


def _csv_rows(fs: AbstractFileSystem, path: str, where: str, delimiter: str) -> Iterator[dict]:
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        mapping = _column_map(reader.fieldnames or [], where)
        for row in reader:
            if row.get(mapping["uri"]):
                yield {ours: row.get(theirs) for ours, theirs in mapping.items()}


def _parquet_rows(fs: AbstractFileSystem, path: str, where: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        mapping = _column_map(pf.schema_arrow.names, where)
        for batch in pf.iter_batches(batch_size=10_000, columns=list(mapping.values())):
            columns = {ours: batch.column(theirs).to_pylist() for ours, theirs in mapping.items()}
            for i in range(batch.num_rows):
                if columns["uri"][i]:
                    yield {ours: values[i] for ours, values in columns.items()}
