"""A fault-injecting HTTP proxy for S3 tests: a busy bucket's bad day, seeded and on 127.0.0.1 only.

`FaultProxy` forwards every request to an upstream S3 server (the suite's
moto server) and, for a seeded share of them, answers as a throttled or
failing S3 endpoint does instead:

- `slowdown`: `503 SlowDown` with S3's XML error body, without forwarding;
- `internal`: `500 InternalError`, without forwarding;
- `reset`: forwards the request (a write takes effect), then resets the
  connection instead of answering, so the client never sees the reply;
- `short`: forwards, then sends the status line, the upstream headers (with
  their `Content-Length`) and only part of the body, and closes;
- `truncated`: forwards, then sends half the body with a `Content-Length`
  that says so (a broken middlebox: the HTTP layer cannot tell, only the
  size the listing gave, or the file's own structure, can).

Seeded and exact: in every block of `BLOCK` requests, `rate * BLOCK` of them
(at positions drawn from `seed`) fail, so a test with a hundred requests
meets its ten faults whatever the draw. Bounded: listens on 127.0.0.1 and
forwards only to a 127.0.0.1 upstream;
sockets time out; at most `max_in_a_row` faults hit the same request
(method and path) one after another, so every retry budget of the code
under test (four attempts or more) gets through and a test's outcome does
not depend on luck; `deny` names buckets that answer `403 AccessDenied` to
everything (an access-denied bucket, which moto cannot play).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal", "reset", "short", "truncated")
BLOCK = 20
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


class FaultProxy:
    """Forward to `upstream`, failing a seeded `rate` of requests with one of `kinds` (see the module docstring)."""

    def __init__(self, upstream: str, *, rate: float = 0.1, seed: int = 0, kinds: Iterable[str] = KINDS,
                 max_in_a_row: int = 2, deny: Iterable[str] = ()) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the fault proxy forwards to 127.0.0.1 only, not {upstream}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.max_in_a_row = max_in_a_row
        self.deny = set(deny)
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._rng = random.Random(seed)
        self._due: list[bool] = []
        self._owed = 0  # faults drawn for requests that had met their max_in_a_row: given to the next ones
        self._in_a_row: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def pick(self, method: str, path: str) -> str | None:
        """The fault for this request, or None to pass it through (seeded; thread-safe)."""
        key = f"{method} {path}"
        with self._lock:
            self.requests += 1
            if not self._due:
                faults = round(self.rate * BLOCK)
                self._due = [True] * faults + [False] * (BLOCK - faults)
                self._rng.shuffle(self._due)
            self._owed += self._due.pop()
            fault = None
            if self._owed and self._in_a_row[key] < self.max_in_a_row:
                self._owed -= 1
                fault = self._rng.choice(self.kinds)
            if fault is None:
                self._in_a_row.pop(key, None)
            else:
                self._in_a_row[key] += 1
                self.injected[fault] += 1
            return fault

    def denied(self, path: str) -> bool:
        bucket = path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        return bucket in self.deny


@contextmanager
def fault_proxy(upstream: str, **kwargs) -> Iterator[FaultProxy]:
    """A started `FaultProxy`, stopped on exit."""
    proxy = FaultProxy(upstream, **kwargs).start()
    try:
        yield proxy
    finally:
        proxy.stop()


class _QuietServer(ThreadingHTTPServer):
    """Threads per connection; a connection the proxy reset on purpose is no error worth printing."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        owner = proxy

    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it: a reset hits a pooled connection
    timeout = 30
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _serve(self) -> None:
        body = self._request_body()
        if self.owner.denied(self.path):
            self._error("denied")
            return
        fault = self.owner.pick(self.command, self.path)
        if fault in ("slowdown", "internal"):
            self._error(fault)
            return
        status, reason, headers, data = self._forward(body)
        if fault == "reset" or (fault in ("short", "truncated") and len(data) < 2):
            self._reset()
            return
        if fault == "truncated":
            data, headers = data[: len(data) // 2], [(k, v) for k, v in headers if k.lower() != "content-length"]
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_HEADERS:
                self.send_header(name, value)
        if not any(name.lower() == "content-length" for name, _ in headers):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "short":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _error(self, kind: str) -> None:
        status, code, message = _ERRORS[kind]
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees `connection reset by peer`."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
