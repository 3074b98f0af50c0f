"""The library's log records (loggers under `mlcls`) in Prefect's run logs.

The library logs with `logging.getLogger(__name__)` and configures no
handlers. Prefect sends a logger's records to its API (the run's logs in the
UI) when the logger has Prefect's `APILogHandler`; its own way to give one
is the setting `PREFECT_LOGGING_EXTRA_LOGGERS=mlcls`, read once, when Prefect
sets up logging (`prefect.logging.configuration.setup_logging`, run when
`prefect.main` is first imported). The CLI sets it before it imports the
flows, and so do the Docker image and the deployments' job variables.

`route_library_logs` covers a process where the setting came too late or
not at all (a flow imported from Python, another worker image): every flow
calls it first. It also lets INFO through: Prefect leaves an extra logger's
level alone, and under its logging config the root logger's WARNING would
drop the library's progress lines otherwise.
"""

from __future__ import annotations

import logging
import threading

LIBRARY_LOGGER = "mlcls"
_lock = threading.Lock()


def _in_a_run(record: logging.LogRecord) -> bool:
    """Records logged outside any flow or task run have no run to go to: drop them here, quietly.

    (Prefect's handler would warn about each, or raise with PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=error:
    the library also runs outside flows, in the same process.)
    """
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get())


def route_library_logs() -> logging.Logger:
    """Give the `mlcls` logger Prefect's API handler unless it has one, and INFO unless it has a level.

    Idempotent and cheap: call it at the start of every flow.
    """
    from prefect.logging.handlers import APILogHandler

    lib = logging.getLogger(LIBRARY_LOGGER)
    with _lock:
        if not any(isinstance(h, APILogHandler) for h in lib.handlers):
            handler = APILogHandler()
            handler.addFilter(_in_a_run)
            lib.addHandler(handler)
        if lib.level == logging.NOTSET:
            lib.setLevel(logging.INFO)
    return lib
