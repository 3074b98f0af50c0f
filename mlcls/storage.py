"""fsspec helpers shared by sources, bundles and outputs, and the one retry policy for storage.

One place decides how a URL becomes a filesystem and a path, how a listed
path becomes the URI written to the output, how a file is written so that
readers never see half of it, and how a storage call that fails is retried.

Every read, write, listing and delete in mlcls goes through the helpers
below (`read_file`, `read_bytes`, `read_many`, `write_atomic`, `stat`,
`list_files`, `list_dir`, `remove`, `put_file`, or `retrying` and
`retry_stream` around a library call). Three layers retry, each what the
one below cannot; their attempts multiply, so each is kept short:

1. botocore, `standard` retry mode, 5 attempts per S3 request (`S3_CONFIG`,
   set by `url_to_fs` on `s3://` URLs unless `config_kwargs` says
   otherwise), exponential backoff with jitter within a retry quota.
   Retries: HTTP 500/502/503/504, throttling codes (`SlowDown`, ...),
   `RequestTimeout`, connections refused, reset or closed before a
   response, timeouts. Not: anything that goes wrong in the body, which is
   read after botocore returns.
2. s3fs `_error_wrapper`, 5 attempts (`S3FileSystem.retries`), around each
   `call_s3` (listing pages included), each `cat_file` (request and body
   read together) and each ranged read of an open file. Retries: `SlowDown` after botocore gave up,
   a reset or timeout while reading the body, a body shorter than its
   Content-Length (aiohttp `ClientPayloadError`), unparsable XML. Not:
   botocore's `IncompleteReadError` or checksum mismatch (a body that
   disagrees with its headers), `InternalError` once botocore gave up.
3. mlcls, `retrying`/`retry_stream` (`POLICY`: 4 attempts, 0.2 s doubling
   to at most 4 s, full jitter), around every whole operation: listing,
   request, body and check again. Retries: what `is_transient` calls
   transient that escaped the layers below, and what no library can see:
   a body shorter than the listed size (`ShortReadError`), a file that fails
   its check when read (Arrow, Parquet footer, JSON: `CorruptReadError`).

Never retried (`is_transient` is False): not found, access denied, missing
or refused credentials, no such bucket, other 4xx, an endpoint that cannot
be reached at all (botocore already tried; `probe` tries once), and
anything that is not a storage error (a malformed bundle, a bug).

Before any work, `probe` makes one request with a single connection attempt,
so a missing credential, a refused access, a missing bucket or an endpoint
that does not answer is one line in a second, not a traceback after minutes
of retries. Listings are never served from s3fs's listing cache: a run or a
reader acts on what is stored now, not on what was there before the last
write (`use_listings_cache=False` on S3, and `list_files`/`list_dir`
invalidate the cache of other filesystems first).
"""

from __future__ import annotations

import asyncio
import copy
import errno
import functools
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem

from mlcls import errors

logger = logging.getLogger(__name__)

StorageOptions = dict[str, Any] | None
T = TypeVar("T")

S3_PROTOCOLS = ("s3", "s3a")
# botocore's `total_max_attempts` counts the first attempt (its `max_attempts` counts only the retries)
S3_CONFIG: dict[str, Any] = {"retries": {"mode": "standard", "total_max_attempts": 5}, "connect_timeout": 5,
                             "read_timeout": 30}
PROBE_CONFIG: dict[str, Any] = {"retries": {"mode": "standard", "total_max_attempts": 1}, "connect_timeout": 3,
                                "read_timeout": 10}
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                              "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded",
                              "RequestThrottled", "OperationAborted", "PriorRequestNotComplete"})
_TRANSIENT_ERRNOS = frozenset({errno.EREMOTEIO, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                               errno.EPIPE, errno.EAGAIN})
_ACCESS_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                               "TokenRefreshRequired"})


# --- errors and how they are told apart ---------------------------------------------------------------------


class TransientStorageError(OSError):
    """A read that came back wrong in a way a second read may not: always retried."""


class ShortReadError(TransientStorageError):
    """Fewer bytes than the listing (or the stored size) says the file has."""


class CorruptReadError(TransientStorageError):
    """A file mlcls wrote failed its check when read (Arrow, Parquet footer, JSON): read it again."""


class StorageError(OSError):
    """A storage client's error (botocore, aiohttp) after the retries, as an `OSError` with a one-line message."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded attempts, exponential backoff with full jitter (so many clients' retries spread out)."""

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 4.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** attempt))


POLICY = RetryPolicy()


@functools.cache
def _client_errors() -> dict[str, tuple[type[BaseException], ...]]:
    """The storage clients' exception classes by role, imported once (botocore and aiohttp come with s3fs)."""
    found: dict[str, list[type[BaseException]]] = {"transient": [], "unreachable": [], "client": []}
    try:
        from botocore import exceptions as b
        from botocore.parsers import ResponseParserError

        found["transient"] += [b.HTTPClientError, b.IncompleteReadError, b.ChecksumError, b.FlexibleChecksumError,
                               ResponseParserError]
        found["unreachable"] += [b.ConnectionError]  # endpoint refused or timed out connecting: botocore retried it
        found["client"] += [b.BotoCoreError, b.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        found["unreachable"] += [aiohttp.ClientConnectorError]
        found["transient"] += [aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError]
        found["client"] += [aiohttp.ClientError]
    except ImportError:
        pass
    import http.client

    found["transient"] += [http.client.IncompleteRead, http.client.RemoteDisconnected, fsspec.exceptions.FSTimeoutError]
    return {k: tuple(v) for k, v in found.items()}


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and the errors it was raised from (s3fs keeps botocore's `ClientError` as the cause)."""
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 6:
        yield current
        seen += 1
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _response(err: BaseException) -> tuple[str | None, int | None, str]:
    """(error code, HTTP status, message) of the first `ClientError` in the chain; Nones if there is none."""
    for e in _chain(err):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return error.get("Code"), status, error.get("Message") or ""
    return None, None, ""


def is_unreachable(err: BaseException) -> bool:
    """The endpoint did not answer at all (refused, unknown host, connect timeout): the client already retried."""
    kinds = _client_errors()
    return any(isinstance(e, (ConnectionRefusedError, *kinds["unreachable"])) for e in _chain(err))


def is_transient(err: BaseException) -> bool:
    """True for errors a later attempt may not meet: throttling, 5xx, resets, timeouts, short or bad bodies.

    Permanent, and never retried: not found, access denied, bad or missing
    credentials, other 4xx, an unreachable endpoint, anything that is not a
    storage error (a malformed bundle, a bug).
    """
    if isinstance(err, TransientStorageError):
        return True
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                        errors.MlclsError)) or is_unreachable(err):
        return False
    code, status, _ = _response(err)
    if code is not None or status is not None:
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    transient = (TimeoutError, ConnectionError, *_client_errors()["transient"])
    return any(isinstance(e, transient) or (type(e) is OSError and e.errno in _TRANSIENT_ERRNOS) for e in _chain(err))


def as_os_error(err: BaseException) -> BaseException:
    """A storage client's error as an `OSError` (callers catch `OSError`); anything else unchanged."""
    if isinstance(err, OSError) or not isinstance(err, _client_errors()["client"]):
        return err
    wrapped = StorageError(describe_os_error(err))
    wrapped.__cause__ = err
    return wrapped


def retrying(fn: Callable[[], T], what: str, *, policy: RetryPolicy | None = None,
             also: tuple[type[BaseException], ...] = ()) -> T:
    """`fn()`, called again after a transient error (or one of `also`) up to the policy's attempts.

    The last error is raised; a storage client's error as an `OSError`
    (`as_os_error`), so that callers' `except OSError` turn it into one line.
    """
    policy = policy or POLICY
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below: retried, or raised as it is
            if attempt + 1 >= policy.attempts or not (isinstance(err, also) or is_transient(err)):
                _reraise(err)
            _wait(policy, attempt, what, err)
    raise AssertionError("unreachable: the loop returns or raises")


def retry_stream(make: Callable[[], Iterator[T]], what: str, *, policy: RetryPolicy | None = None,
                 also: tuple[type[BaseException], ...] = ()) -> Iterator[T]:
    """The items of `make()`; after a transient error, `make()` again and skip what was already yielded.

    For deterministic streams (a Parquet part's batches, a sorted listing):
    a consumer never sees an item twice. Attempts count again after progress.
    """
    policy = policy or POLICY
    done = failures = 0
    while True:
        items: Iterator[T] | None = None
        position = 0
        try:
            while True:
                try:
                    items = items if items is not None else make()
                    item = next(items)
                except StopIteration:
                    return
                except Exception as err:  # noqa: BLE001 - classified below: retried, or raised as it is
                    failures += 1
                    if failures >= policy.attempts or not (isinstance(err, also) or is_transient(err)):
                        _reraise(err)
                    _wait(policy, failures - 1, what, err)
                    break
                position += 1
                if position > done:
                    done, failures = position, 0
                    yield item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


def _reraise(err: Exception) -> None:
    """Raise `err` after its last attempt: as it is, or a client's error as an `OSError` caused by it."""
    wrapped = as_os_error(err)
    if wrapped is err:
        raise err
    raise wrapped from err


def _wait(policy: RetryPolicy, attempt: int, what: str, err: BaseException) -> None:
    delay = policy.delay(attempt)
    logger.debug("%s failed (%s); attempt %d of %d in %.2f s", what, describe_os_error(err), attempt + 2,
                policy.attempts, delay)
    time.sleep(delay)


def describe_os_error(err: BaseException) -> str:
    """A short reason for an I/O error, without the traceback noise; says what to fix for permanent ones."""
    hint = _storage_hint(err)
    if hint:
        return hint
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.splitlines()[0]


def _storage_hint(err: BaseException) -> str | None:
    """What to fix, for the storage errors a user meets: credentials, access, bucket, endpoint."""
    names = {type(e).__name__ for e in _chain(err)}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or give key and secret in --storage-options")
    if is_unreachable(err):
        return f"cannot reach the storage endpoint{_endpoint(err)}: check endpoint_url (--storage-options or " \
               "AWS_ENDPOINT_URL) and the network"
    code, status, message = _response(err)
    if code == "NoSuchBucket":
        name = _bucket_name(err)
        return f"no such bucket{f' {name!r}' if name else ''}: check the bucket name (and the endpoint)"
    if code in _CREDENTIAL_CODES:
        return f"the S3 credentials were refused ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if code in _ACCESS_CODES or status == 403:
        detail = message or (str(err).splitlines()[0] if str(err) else "Forbidden")
        return f"access denied ({detail}): check the credentials and this bucket's permissions"
    return None


def _endpoint(err: BaseException) -> str:
    for e in _chain(err):
        url = (getattr(e, "kwargs", None) or {}).get("endpoint_url")
        if url:
            parts = url.split("/", 3)
            return f" {'/'.join(parts[:3])}" if len(parts) >= 3 else f" {url}"
    return ""


def _bucket_name(err: BaseException) -> str | None:
    for e in _chain(err):
        name = ((getattr(e, "response", None) or {}).get("Error") or {}).get("BucketName")
        if name:
            return name
    return None


# --- filesystems and paths ------------------------------------------------------------------------------------


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def with_defaults(url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """The caller's fsspec options, plus on S3 our retry mode, timeouts and no listing cache (theirs win)."""
    opts = dict(storage_options or {})
    if protocol_of(url) in S3_PROTOCOLS:
        _teach_s3fs()
        opts["config_kwargs"] = copy.deepcopy({**S3_CONFIG, **(opts.get("config_kwargs") or {})})  # botocore edits it
        opts.setdefault("use_listings_cache", False)
    return opts


@functools.cache
def _teach_s3fs() -> None:
    """Have s3fs retry, with its own machinery (`add_retryable_error`), the body errors it does not know:
    a body that disagrees with its Content-Length or checksum is a bad transfer, not a bad file. Reads that
    mlcls does not drive itself (DuckDB's, pyarrow's ranged reads of an open file) get them retried too."""
    try:
        import s3fs.core
        from botocore import exceptions as b
    except ImportError:
        return
    for exc in (b.IncompleteReadError, b.ChecksumError, b.FlexibleChecksumError):
        if not issubclass(exc, s3fs.core.S3_RETRYABLE_ERRORS):
            s3fs.core.add_retryable_error(exc)


def url_to_fs(url: str, storage_options: StorageOptions = None) -> tuple[AbstractFileSystem, str]:
    """Resolve `url` to a filesystem and a path on it (`~` expanded for local paths)."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    fs, path = fsspec.core.url_to_fs(url, **with_defaults(url, storage_options))
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


def probe(url: str, storage_options: StorageOptions = None) -> None:
    """One request to `url`'s store with a single connection attempt, before any work.

    Raises an `OSError` whose `describe_os_error` says what to fix (missing
    credentials, access denied, no such bucket, an endpoint that does not
    answer) within seconds; a path that does not exist yet passes. S3 only:
    other stores are reached by the first real call.
    """
    if protocol_of(url) not in S3_PROTOCOLS:
        return
    opts = with_defaults(url, storage_options)
    opts["config_kwargs"] = {**opts["config_kwargs"], **copy.deepcopy(PROBE_CONFIG)}
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **opts)
    path = path.rstrip("/")
    try:
        retrying(lambda: fs.info(path), f"reach {url}")
    except FileNotFoundError as err:
        code, _, _ = _response(err)
        if code == "NoSuchBucket" or "/" not in path:
            bucket = path.split("/", 1)[0]
            raise FileNotFoundError(f"no such bucket {bucket!r}: check the bucket name (and the endpoint)") from err


# --- reads ------------------------------------------------------------------------------------------------------


def stat(fs: AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """`fs.info(path)`, or None if nothing is there; other errors raise (`fs.isfile`/`exists` would hide them)."""
    try:
        return retrying(lambda: fs.info(path), f"stat {full_uri(fs, path)}")
    except FileNotFoundError as err:
        return _missing(err, None)


def read_bytes(fs: AbstractFileSystem, path: str, size: int | None = None) -> bytes:
    """The file's bytes; with `size` (the listed size), a shorter body is a transient error, read again."""
    return retrying(lambda: _checked(_cat(fs, path), size, fs, path), f"read {full_uri(fs, path)}")


def read_file(fs: AbstractFileSystem, path: str, check: Callable[[bytes], T] | None = None) -> T | bytes:
    """A file mlcls wrote, checked: its stored size, then `check(data)` (parse it); read again on a bad read.

    A `check` that raises counts as a bad read (`CorruptReadError`), retried
    up to the policy's attempts: a file is never trusted on one bad read.
    """
    def attempt() -> Any:
        info = fs.info(path)
        data = _checked(_cat(fs, path), info.get("size"), fs, path)
        if check is None:
            return data
        try:
            return check(data)
        except Exception as err:  # whatever the parser raises, this read is not to be trusted
            raise CorruptReadError(f"{full_uri(fs, path)} failed its check: {describe_os_error(err)}") from err

    return retrying(attempt, f"read {full_uri(fs, path)}")


def _checked(data: bytes, size: int | None, fs: AbstractFileSystem, path: str) -> bytes:
    if size is not None and len(data) < size:
        raise ShortReadError(f"short read of {full_uri(fs, path)}: {len(data)} of {size} bytes")
    return data


def _cat(fs: AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path, **_cat_options(fs))


def _cat_options(fs: AbstractFileSystem) -> dict[str, Any]:
    """On S3, `max_concurrency=1`: no HEAD request before each GET (s3fs makes one to decide whether to
    split a large object into concurrent ranges; our files are small, or streamed by pyarrow)."""
    return {"max_concurrency": 1} if hasattr(fs, "call_s3") else {}


def read_one(uri: str, storage_options: StorageOptions, size: int | None = None) -> bytes:
    """One file's bytes by URI (see `read_bytes`)."""
    fs, path = url_to_fs(uri, storage_options)
    return read_bytes(fs, path, size)


def read_many(uris: Sequence[str], storage_options: StorageOptions,
              sizes: Sequence[int | None] | None = None) -> list[bytes | BaseException]:
    """The files' bytes, or the error each read raised after the retries; concurrent on async stores (S3).

    `sizes` are the listed sizes: a shorter body is read again, never handed
    on to be decoded as a truncated image.
    """
    sizes = list(sizes) if sizes is not None else [None] * len(uris)
    fs, _ = url_to_fs(uris[0], storage_options)
    protocol = protocol_of(uris[0])
    if not (getattr(fs, "async_impl", False) and all("://" in u and protocol_of(u) == protocol for u in uris)):
        return [_read_or_error(u, storage_options, s) for u, s in zip(uris, sizes, strict=True)]
    paths = [url_to_fs(u, storage_options)[1] for u in uris]
    out: list[bytes | BaseException | None] = [None] * len(uris)
    todo = list(range(len(uris)))
    policy = POLICY
    for attempt in range(policy.attempts):
        got = _cat_concurrently(fs, [paths[i] for i in todo])
        again = []
        for i, item in zip(todo, got, strict=True):
            if not isinstance(item, BaseException):
                item = _short_or_bytes(item, sizes[i], fs, paths[i])
            out[i] = item
            if isinstance(item, BaseException) and is_transient(item) and attempt + 1 < policy.attempts:
                again.append(i)
        if not again:
            break
        _wait(policy, attempt, f"read {len(again)} of {len(uris)} files", out[again[0]])  # type: ignore[arg-type]
        todo = again
    return [as_os_error(x) if isinstance(x, BaseException) else x for x in out]  # type: ignore[misc]


def _short_or_bytes(data: bytes, size: int | None, fs: AbstractFileSystem, path: str) -> bytes | BaseException:
    try:
        return _checked(data, size, fs, path)
    except ShortReadError as err:
        return err


def _read_or_error(uri: str, storage_options: StorageOptions, size: int | None) -> bytes | BaseException:
    try:
        return read_one(uri, storage_options, size)
    except Exception as err:  # noqa: BLE001 - a read failure is that file's error
        return err


def _cat_concurrently(fs: AbstractFileSystem, paths: list[str]) -> list[bytes | BaseException]:
    """`cat_file` of every path at once on the filesystem's event loop, each result or error in order.

    Not `fs.cat`: it expands glob characters in names and drops repeats.
    """
    kwargs = _cat_options(fs)

    async def cat_all() -> list[bytes | BaseException]:
        return await asyncio.gather(*(fs._cat_file(p, **kwargs) for p in paths), return_exceptions=True)

    return fsspec.asyn.sync(fs.loop, cat_all)


# --- listings ---------------------------------------------------------------------------------------------------


def list_files(fs: AbstractFileSystem, base: str) -> list[str]:
    """Every file under `base`, as stored now (no listing cached before a write); [] if there is none."""
    fs.invalidate_cache(base)
    try:
        return retrying(lambda: fs.find(base), f"list {full_uri(fs, base)}")
    except FileNotFoundError as err:
        return _missing(err, [])


def list_dir(fs: AbstractFileSystem, path: str, detail: bool = False) -> list:
    """The entries of folder `path`, as stored now; [] if there is none."""
    fs.invalidate_cache(path)
    try:
        return retrying(lambda: fs.ls(path, detail=detail), f"list {full_uri(fs, path)}")
    except FileNotFoundError as err:
        return _missing(err, [])


def _missing(err: FileNotFoundError, value: T) -> T:
    """`value` for a path that is not there; a bucket that is not there stays an error."""
    if _response(err)[0] == "NoSuchBucket":
        raise err
    return value


# --- writes -----------------------------------------------------------------------------------------------------


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that `path` is either absent or complete.

    On local disk: a hidden temporary file in the same folder, fsync, then an
    atomic rename. On object stores a single PUT is already atomic, and
    idempotent: one whose answer was lost is sent again.
    """
    if not is_local(fs):
        retrying(lambda: fs.pipe_file(path, data), f"write {full_uri(fs, path)}")
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


def put_file(fs: AbstractFileSystem, local: str, path: str) -> None:
    """Upload a local file (one object appears complete or not at all), retried as a whole."""
    retrying(lambda: fs.put_file(local, path), f"write {full_uri(fs, path)}")


def remove(fs: AbstractFileSystem, path: str, recursive: bool = False) -> None:
    """Delete `path` (a folder with `recursive`); already gone is fine, as after a retried delete."""
    fs.invalidate_cache(path)
    try:
        retrying(lambda: fs.rm(path, recursive=recursive), f"delete {full_uri(fs, path)}")
    except FileNotFoundError as err:
        _missing(err, None)


def probe_writable(url: str, storage_options: StorageOptions = None) -> None:
    """Write and remove a small file under `url`: raises `OSError` (or `NotADirectoryError`
    for a file) if a job could not write its results there, before the job spends any time."""
    probe(url, storage_options)
    fs, base = url_to_fs(url, storage_options)
    info = stat(fs, base)
    if info is not None and info.get("type") == "file":
        raise NotADirectoryError(f"{url} is a file; give a folder")
    path = join(base, ".write-probe")
    write_atomic(fs, path, b"")
    remove(fs, path)


def check_folder(url: str, option: str, storage_options: StorageOptions = None) -> None:
    """Fail before any image is read if `url` cannot be written as a folder."""
    try:
        probe_writable(url, storage_options)
    except NotADirectoryError:
        raise errors.OptionError(f"{option} {url} is a file; give a folder") from None
    except (OSError, ValueError, ImportError) as err:
        raise errors.OptionError(f"cannot write to {option} {url}: {describe_os_error(err)}") from err
