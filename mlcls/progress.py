"""Progress events from the library to whoever displays them.

The engine runs inside Prefect tasks, notebooks and benchmarks alike; it only
emits events here. The CLI subscribes to draw a progress bar, flows log them.
Listeners are called from worker threads and must be quick and thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """`kind` is `planned` (total = images to tag), `images` (count = images just done,
    errors = of which failed), `shard_done` or `shard_failed`.

    Training and evaluation add `loading` (total = images to read), `loaded`
    (count, errors), `epoch` (total = steps; values: epoch, epochs), `step`
    (count = images; values: loss) and `validated` (values: loss, val_mAP, best).
    """

    kind: str
    count: int = 0
    total: int = 0
    errors: int = 0
    shard: str = ""
    values: dict[str, float] = field(default_factory=dict)


Listener = Callable[[Event], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Add a listener; returns the function that removes it."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def emit(event: Event) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(event)
