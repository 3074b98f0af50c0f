"""fsspec helpers shared by sources, bundles and outputs.

One place decides how a URL becomes a filesystem and a path, how a listed
path becomes the URI written to the output, and how a file is written so
that readers never see half of it.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Sequence
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from mlcls import errors

StorageOptions = dict[str, Any] | None


def url_to_fs(url: str, storage_options: StorageOptions = None) -> tuple[AbstractFileSystem, str]:
    """Resolve `url` to a filesystem and a path on it (`~` expanded for local paths)."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or path


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local disk, where rename is atomic and paths are plain."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def full_uri(fs: AbstractFileSystem, path: str) -> str:
    """The URI written to the output: a plain absolute path on local disk, a URL elsewhere."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    """Join path parts with `/`, the separator of every fsspec filesystem."""
    return posixpath.join(base, *parts)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that `path` is either absent or complete.

    On local disk: a hidden temporary file in the same folder, fsync, then an
    atomic rename. On object stores a single PUT is already atomic.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def describe_os_error(err: BaseException) -> str:
    """A short reason for an I/O error, without the traceback noise."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.splitlines()[0]


def probe_writable(url: str, storage_options: StorageOptions = None) -> None:
    """Write and remove a small file under `url`: raises `OSError` (or `NotADirectoryError`
    for a file) if a job could not write its results there, before the job spends any time."""
    fs, base = url_to_fs(url, storage_options)
    if fs.exists(base) and fs.isfile(base):
        raise NotADirectoryError(f"{url} is a file; give a folder")
    probe = join(base, ".write-probe")
    write_atomic(fs, probe, b"")
    fs.rm_file(probe)


def check_folder(url: str, option: str, storage_options: StorageOptions = None) -> None:
    """Fail before any image is read if `url` cannot be written as a folder."""
    try:
        probe_writable(url, storage_options)
    except NotADirectoryError:
        raise errors.OptionError(f"{option} {url} is a file; give a folder") from None
    except (OSError, ValueError, ImportError) as err:
        raise errors.OptionError(f"cannot write to {option} {url}: {describe_os_error(err)}") from err


def read_one(uri: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs.cat_file(path)


def read_many(uris: Sequence[str], storage_options: dict[str, Any]) -> list[bytes | BaseException]:
    """The files' bytes, or the error each read raised; concurrent on async stores such as S3."""
    fs, _ = fsspec.core.url_to_fs(uris[0], **storage_options)
    paths = [fsspec.core.url_to_fs(u, **storage_options)[1] for u in uris]
    if getattr(fs, "async_impl", False) and all("://" in u for u in uris):
        got = fs.cat(paths, on_error="return")
        return [got.get(p, FileNotFoundError(p)) for p in paths]
    out: list[bytes | BaseException] = []
    for uri in uris:
        try:
            out.append(read_one(uri, storage_options))
        except Exception as err:  # noqa: BLE001 - a read failure is that file's error
            out.append(err)
    return out
