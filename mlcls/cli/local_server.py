"""Prefect's local mode, started early: its temporary server boots while the CLI checks and loads.

Without `PREFECT_API_URL`, Prefect starts a temporary API server (uvicorn in
a subprocess) the first time a flow needs a client, and waits for it: about
ten seconds on a small machine, before any work. The CLI has work of its
own to do meanwhile (loading the bundle, checking the output), so it starts
that server in a thread once the options and the source have passed their
checks, and waits for it only when the flow is about to run. Prefect keeps one server
per process (`SubprocessASGIServer` is a singleton keyed by port), so the
flow's client finds this one already up.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from mlcls.errors import MlclsError

logger = logging.getLogger(__name__)


class LocalServer:
    """Prefect's temporary server, booting in a background thread; `wait()` before the first flow."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.seconds = 0.0  # how long the server took to answer
        self.waited = 0.0  # how much of that the command still waited for
        self._thread: threading.Thread | None = None

    def start(self) -> LocalServer:
        if not os.environ.get("PREFECT_API_URL"):  # a profile may still set one: checked in the thread
            self._thread = threading.Thread(target=self._boot, name="mlcls-prefect-server", daemon=True)
            self._thread.start()
        return self

    def _boot(self) -> None:
        started = time.perf_counter()
        try:
            from prefect.settings import get_current_settings

            if not get_current_settings().api.url:
                from prefect.server.api.server import SubprocessASGIServer

                SubprocessASGIServer().start()
        except BaseException as err:  # noqa: BLE001 - reported to the main thread by wait()
            self.error = err
        self.seconds = time.perf_counter() - started

    def wait(self) -> None:
        """Block until the server answers; one line if it never does."""
        if self._thread is None:
            return
        started = time.perf_counter()
        self._thread.join()
        self.waited = time.perf_counter() - started
        logger.debug("Prefect's local server answered after %.1f s; %.1f s of it spent waiting", self.seconds,
                     self.waited)
        if self.error is not None:
            raise MlclsError(f"could not start Prefect's local server ({str(self.error).splitlines()[0]}); "
                             "set PREFECT_API_URL to a running server, or use --no-prefect") from None
