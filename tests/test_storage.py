"""The retry policy, rule by rule: what is retried (and how often, how long), what fails at once, and why."""

from __future__ import annotations

import errno
import json

import pytest
from botocore import exceptions as boto
from botocore.parsers import ResponseParserError
from fsspec.implementations.memory import MemoryFileSystem
from s3fs.errors import translate_boto_error

from mlcls import storage
from mlcls.errors import BundleError
from mlcls.storage import (
    CorruptReadError,
    RetryPolicy,
    ShortReadError,
    StorageError,
    describe_os_error,
    is_transient,
    read_bytes,
    read_file,
    read_many,
    retry_stream,
    retrying,
    with_defaults,
)


def client_error(code: str, status: int, message: str = "", bucket: str | None = None) -> boto.ClientError:
    error = {"Code": code, "Message": message or code}
    if bucket:
        error["BucketName"] = bucket
    return boto.ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def as_s3fs_raises(err: Exception) -> BaseException:
    """What s3fs raises for a botocore error once its own retries are done (`translate_boto_error`)."""
    return translate_boto_error(err)


@pytest.fixture()
def sleeps(monkeypatch) -> list[float]:
    """No real waiting; the delays the policy asked for, in order."""
    waited: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", waited.append)
    return waited


TRANSIENT = {
    "short read (listed size)": ShortReadError("3 of 9 bytes"),
    "bad file (failed its check)": CorruptReadError("footer"),
    "503 SlowDown after s3fs": as_s3fs_raises(client_error("SlowDown", 503, "Please reduce your request rate.")),
    "500 InternalError after botocore": as_s3fs_raises(client_error("InternalError", 500)),
    "throttling code": client_error("Throttling", 400),
    "408 RequestTimeout": as_s3fs_raises(client_error("RequestTimeout", 408)),
    "connection reset": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "timeout": TimeoutError("timed out"),
    "connection closed before a response": boto.ConnectionClosedError(endpoint_url="http://x"),
    "read timeout": boto.ReadTimeoutError(endpoint_url="http://x"),
    "body shorter than Content-Length": boto.IncompleteReadError(actual_bytes=3, expected_bytes=9),
    "checksum mismatch": boto.FlexibleChecksumError(error_msg="Expected checksum x did not match"),
    "unparsable XML": ResponseParserError("no element found"),
    "EREMOTEIO without a response": OSError(errno.EREMOTEIO, "remote I/O error"),
}
PERMANENT = {
    "not found": FileNotFoundError("bkt/key"),
    "access denied": as_s3fs_raises(client_error("AccessDenied", 403, "Access Denied")),
    "403 without a body (HEAD)": as_s3fs_raises(client_error("403", 403, "Forbidden")),
    "no such bucket": as_s3fs_raises(client_error("NoSuchBucket", 404, "The specified bucket does not exist")),
    "bad key id": as_s3fs_raises(client_error("InvalidAccessKeyId", 403)),
    "other 4xx": as_s3fs_raises(client_error("InvalidRequest", 400)),
    "no credentials": boto.NoCredentialsError(),
    "unreachable endpoint": boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bkt?list-type=2"),
    "connect timeout": boto.ConnectTimeoutError(endpoint_url="http://10.0.0.1:9000/"),
    "connection refused": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    "malformed bundle": BundleError("bundle.json is not valid JSON"),
    "a bug": ValueError("no"),
}


@pytest.mark.parametrize("name", TRANSIENT)
def test_transient_errors_are_retried_until_an_attempt_succeeds(name, sleeps):
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TRANSIENT[name]
        return "ok"

    assert is_transient(TRANSIENT[name])
    assert retrying(flaky, "read x") == "ok"
    assert len(calls) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("name", PERMANENT)
def test_permanent_errors_fail_at_once(name, sleeps):
    calls = []

    def refused() -> None:
        calls.append(1)
        raise PERMANENT[name]

    assert not is_transient(PERMANENT[name])
    with pytest.raises(Exception) as raised:
        retrying(refused, "read x")
    assert len(calls) == 1 and sleeps == []
    assert raised.value is PERMANENT[name] or raised.value.__cause__ is PERMANENT[name]


def test_attempts_are_bounded_and_the_last_error_is_raised(sleeps):
    calls = []

    def always() -> None:
        calls.append(1)
        raise ConnectionResetError(f"reset {len(calls)}")

    with pytest.raises(ConnectionResetError, match="reset 4"):
        retrying(always, "read x")
    assert len(calls) == storage.POLICY.attempts == 4 and len(sleeps) == 3


def test_backoff_is_exponential_with_full_jitter_and_capped():
    policy = RetryPolicy(attempts=10, base_delay=0.2, max_delay=4.0)
    for attempt, cap in enumerate([0.2, 0.4, 0.8, 1.6, 3.2, 4.0, 4.0]):
        delays = [policy.delay(attempt) for _ in range(300)]
        assert min(delays) >= 0.0 and max(delays) <= cap
        assert max(delays) > 0.8 * cap and len(set(delays)) > 250  # spread over the whole range, not one value


def test_client_errors_come_out_as_os_errors_saying_what_to_fix(sleeps):
    def no_credentials() -> None:
        raise boto.NoCredentialsError()

    with pytest.raises(StorageError) as raised:  # an OSError: callers' `except OSError` turn it into one line
        retrying(no_credentials, "read x")
    assert isinstance(raised.value.__cause__, boto.NoCredentialsError)
    assert "no S3 credentials found: set AWS_ACCESS_KEY_ID" in str(raised.value)


@pytest.mark.parametrize("err, says", [
    (boto.NoCredentialsError(), "no S3 credentials found"),
    (boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bkt/key?x=1"),
     "cannot reach the storage endpoint http://127.0.0.1:1: check endpoint_url"),
    (as_s3fs_raises(client_error("AccessDenied", 403, "Access Denied")), "access denied (Access Denied)"),
    (as_s3fs_raises(client_error("NoSuchBucket", 404, bucket="photos")), "no such bucket 'photos'"),
    (as_s3fs_raises(client_error("SignatureDoesNotMatch", 403)), "the S3 credentials were refused"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),  # local disks keep their words
])
def test_permanent_storage_errors_are_described_in_one_line(err, says):
    text = describe_os_error(err)
    assert says in text and "\n" not in text


def test_also_retries_what_only_this_call_knows_is_a_bad_read(sleeps):
    calls = []

    def parse() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("File is too small: 0")
        return "table"

    assert retrying(parse, "read manifest", also=(ValueError,)) == "table"
    with pytest.raises(ValueError):
        retrying(lambda: (_ for _ in ()).throw(ValueError("bug")), "read manifest")  # without `also`: at once


def test_a_stream_resumes_after_a_fault_without_repeating_items(sleeps):
    made = []

    def numbers():
        made.append(1)
        for i in range(6):
            if i == 3 and len(made) == 1:
                raise ConnectionResetError("reset mid-stream")
            if i == 5 and len(made) == 2:
                raise TimeoutError("timed out later on")
            yield i

    assert list(retry_stream(numbers, "read part")) == [0, 1, 2, 3, 4, 5]
    assert len(made) == 3 and len(sleeps) == 2


def test_a_stream_stops_at_a_permanent_error(sleeps):
    def numbers():
        yield 0
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        list(retry_stream(numbers, "read part"))
    assert sleeps == []


class FlakyMemory(MemoryFileSystem):
    """An in-memory store whose first `bad` reads of a file come back wrong (cut short, or replaced)."""

    cachable = False
    protocol = "flaky"

    def __init__(self, bad: int = 1, garble: bytes | None = None) -> None:
        super().__init__()
        self.store, self.pseudo_dirs = {}, [""]
        self.bad, self.garble, self.reads = bad, garble, 0

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start, end)
        self.reads += 1
        if self.reads <= self.bad:
            return self.garble if self.garble is not None else data[: len(data) // 3]
        return data


def test_a_body_shorter_than_the_listed_size_is_read_again(sleeps):
    fs = FlakyMemory(bad=2)
    fs.pipe_file("/img.jpg", b"0123456789")
    assert read_bytes(fs, "/img.jpg", size=10) == b"0123456789"
    assert fs.reads == 3
    always = FlakyMemory(bad=99)
    always.pipe_file("/img.jpg", b"0123456789")
    with pytest.raises(ShortReadError, match="3 of 10 bytes"):
        read_bytes(always, "/img.jpg", size=10)
    assert always.reads == storage.POLICY.attempts


def test_a_file_that_fails_its_check_is_read_again_never_trusted(sleeps):
    fs = FlakyMemory(bad=1, garble=b'{"state": "comm')  # a half-written answer of the right length is no excuse
    fs.pipe_file("/_mlcls/results/a.json", json.dumps({"state": "committed"}).encode())
    assert read_file(fs, "/_mlcls/results/a.json", json.loads) == {"state": "committed"}
    bad = FlakyMemory(bad=99, garble=b"not json at all, but as long!!")
    bad.pipe_file("/r.json", b'{"state": "committed", "x": 1}')
    with pytest.raises(CorruptReadError, match="failed its check"):
        read_file(bad, "/r.json", json.loads)
    assert bad.reads == storage.POLICY.attempts


def test_read_many_retries_the_short_and_the_transient_not_the_missing(tmp_path, sleeps, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"aaaa")
    (tmp_path / "b.jpg").write_bytes(b"bb")
    reads: list[str] = []
    real = storage._cat

    def counted(fs, path):
        reads.append(path.rsplit("/", 1)[-1])
        return real(fs, path)

    monkeypatch.setattr(storage, "_cat", counted)
    got = read_many([str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg"), str(tmp_path / "b.jpg")], {},
                    sizes=[4, None, 5])
    assert got[0] == b"aaaa" and isinstance(got[1], FileNotFoundError)
    assert isinstance(got[2], ShortReadError)  # b.jpg is shorter than listed: read 4 times, then its error
    assert reads.count("gone.jpg") == 1 and reads.count("b.jpg") == storage.POLICY.attempts


def test_s3_urls_get_retry_mode_timeouts_and_no_listing_cache_unless_given():
    opts = with_defaults("s3://bkt/x", {"endpoint_url": "http://127.0.0.1:9000"})
    assert opts["config_kwargs"]["retries"] == {"mode": "standard", "total_max_attempts": 5}
    assert opts["use_listings_cache"] is False and opts["endpoint_url"] == "http://127.0.0.1:9000"
    mine = with_defaults("s3://bkt/x", {"config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 9}},
                                         "use_listings_cache": True})
    assert mine["config_kwargs"]["retries"] == {"mode": "adaptive", "max_attempts": 9}
    assert mine["config_kwargs"]["connect_timeout"] == 5 and mine["use_listings_cache"] is True
    assert with_defaults("/data/photos", {"anon": True}) == {"anon": True}
    storage.url_to_fs("s3://bkt/x")[0].connect()  # botocore rewrites the retries it is given: never our defaults
    assert storage.S3_CONFIG["retries"] == {"mode": "standard", "total_max_attempts": 5}
