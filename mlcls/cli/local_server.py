"""Prefect's local mode, started first: its temporary server boots while the CLI imports, checks and loads.

Without `PREFECT_API_URL`, Prefect starts a temporary API server (uvicorn in
a subprocess) the first time a flow needs a client, and waits for it: about
ten seconds on a small machine, before any work. The CLI starts that same
server itself (Prefect's app factory, with the settings Prefect's
`SubprocessASGIServer` gives it) as its very first step, as a plain
subprocess, and points `PREFECT_API_URL` at it; it waits for it only when the
flow is about to run, so the boot overlaps the torch import, the checks and
the bundle load.

A subprocess, not a thread that imports Prefect: a thread still importing at
exit made an early error slow (its import competed with the main thread's on
two cores) and could abort the interpreter at shutdown. The subprocess is
terminated at exit, and dies with the CLI if the CLI is killed (Linux).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

from mlcls.errors import MlclsError

logger = logging.getLogger(__name__)

_PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind
_RUNNING: LocalServer | None = None


class LocalServer:
    """Prefect's temporary server, booting in a subprocess; `wait()` before the first flow."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.started = 0.0
        self.seconds = 0.0  # how long the server took to answer
        self.waited = 0.0  # how much of that the command still waited for
        self.used = False  # a flow may have run on it: stop it gently, after Prefect's exit-time flushes
        self._log = None

    def start(self) -> LocalServer:
        """Boot the server unless an API is configured (environment or the active Prefect profile).

        One server per process: a second command in the same process (a notebook, the tests) reuses it.
        """
        global _RUNNING
        if os.environ.get("PREFECT_API_URL") or profile_api_url():
            return self
        if _RUNNING is not None and _RUNNING.process is not None and _RUNNING.process.poll() is None:
            os.environ["PREFECT_API_URL"] = _RUNNING.url
            return _RUNNING
        _RUNNING = self
        self.started = time.perf_counter()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._spawn()
        atexit.register(self.stop)
        os.environ["PREFECT_API_URL"] = self.url
        return self

    def _spawn(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        app_dir = str(Path(importlib.util.find_spec("prefect").submodule_search_locations[0]).parent)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, preexec_fn=_die_with_parent)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server answers; one line if it never does."""
        if self.process is None:
            return
        started = time.perf_counter()
        timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        while not _healthy(self.url):
            code = self.process.poll()
            if code == _PORT_IN_USE:  # another process took the port first
                self._spawn()
                os.environ["PREFECT_API_URL"] = self.url
            elif code is not None:
                self._fail(f"it exited with code {code}")
            elif time.perf_counter() - started > timeout:
                self._fail(f"it did not answer within {timeout:.0f} s")
            time.sleep(0.1)
        self.waited = time.perf_counter() - started
        self.used = True
        self.seconds = time.perf_counter() - self.started
        logger.debug("Prefect's local server answered after %.1f s; %.1f s of it spent waiting", self.seconds,
                     self.waited)

    def _fail(self, why: str) -> None:
        tail = ""
        if self._log is not None:
            self._log.seek(0)
            lines = self._log.read().decode(errors="replace").strip().splitlines()
            tail = f": {lines[-1]}" if lines else ""
        self.stop()
        raise MlclsError(f"could not start Prefect's local server ({why}{tail}); set PREFECT_API_URL to a "
                         "running server, or use --no-prefect")

    def release(self) -> None:
        """The command is done: unset the URL it had set; the server stays up for Prefect's exit-time flushes.

        Prefect sends its last logs and events from exit hooks that run before
        `atexit`'s, so the server is stopped by `stop()`, registered with atexit.
        """
        if self.url and os.environ.get("PREFECT_API_URL") == self.url:
            del os.environ["PREFECT_API_URL"]

    def stop(self, graceful: bool = True) -> None:
        """Terminate the server (at exit, or when it failed); the flow's records stay in Prefect's database.

        `graceful=False` kills it at once: after an early error nothing ran on it that needs a clean shutdown.
        """
        self.release()
        if self.process is not None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def profile_api_url() -> str | None:
    """The API URL of the active Prefect profile, read without importing Prefect (None if unset or unreadable)."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return (profiles.get("profiles", {}).get(name) or {}).get("PREFECT_API_URL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the child: SIGTERM when the CLI dies, however it dies (Linux; elsewhere atexit alone)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
