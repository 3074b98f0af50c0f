"""A run's shards in the order the planner cut them, where workers on any machine can follow them.

The planner publishes shard number `seq` as `<run dir>/stream/<seq>.json`
(its id, count and manifest URL) as soon as its manifest is written, and
`end.json` (how many shards there are) when the listing is over. A fanned-out
run is split into `slots` long-lived worker runs; slot `i` tags shards
`i, i + slots, i + 2 * slots, ...` in turn, waiting for each to be published.
Nothing is claimed or leased: which slot tags a shard is fixed by its number,
and a slot run that is redone skips the shards whose results are recorded
(a shard's part file is named by its content, so one redone after a crash
replaces its half-written self).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict

from mlcls.errors import MlclsError
from mlcls.storage import StorageOptions, join, read_file, remove, url_to_fs, write_atomic
from mlcls.tag.plan import Shard, run_dir

logger = logging.getLogger(__name__)

END = "end.json"


def _stream_dir(out: str, run_id: str) -> str:
    return join(run_dir(out, run_id), "stream")


def clear(out: str, run_id: str, storage_options: StorageOptions = None) -> None:
    """Drop a run's stream: before publishing (a parent run again under the same id) and after a clean finish."""
    fs, base = url_to_fs(_stream_dir(out, run_id), storage_options)
    remove(fs, base, recursive=True)


def publish(out: str, run_id: str, seq: int, shard: Shard, storage_options: StorageOptions = None) -> None:
    """Make shard number `seq` visible to the slot that owns it."""
    fs, base = url_to_fs(_stream_dir(out, run_id), storage_options)
    write_atomic(fs, join(base, f"{seq:09d}.json"), json.dumps(asdict(shard)).encode())


def publish_end(out: str, run_id: str, shards: int, error: str | None = None,
                storage_options: StorageOptions = None) -> None:
    """The listing is over: `shards` in all (`error` when the planner failed; slots stop after what they have)."""
    fs, base = url_to_fs(_stream_dir(out, run_id), storage_options)
    write_atomic(fs, join(base, END), json.dumps({"shards": shards, "error": error}).encode())


def follow(out: str, run_id: str, slot: int, slots: int, storage_options: StorageOptions = None, *,
           wait_seconds: float = 3600.0, poll_seconds: float = 0.5) -> Iterator[Shard]:
    """Yield slot `slot`'s shards as the planner publishes them; stop when the stream has ended."""
    if not 0 <= slot < slots:
        raise MlclsError(f"slot {slot} is not one of {slots} slots")
    fs, base = url_to_fs(_stream_dir(out, run_id), storage_options)
    seq = slot
    while True:
        shard = _next(fs, base, seq, wait_seconds, poll_seconds)
        if shard is None:
            return
        yield shard
        seq += slots


def _next(fs, base: str, seq: int, wait_seconds: float, poll_seconds: float) -> Shard | None:
    """Shard `seq` once it is published; None when the stream ended before it."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return Shard(**read_file(fs, join(base, f"{seq:09d}.json"), json.loads))
        except FileNotFoundError:
            pass
        try:
            end = read_file(fs, join(base, END), json.loads)
        except FileNotFoundError:
            end = None
        if end is not None:
            if end["shards"] > seq:
                continue  # published between the two reads
            if end.get("error"):
                logger.warning("the planner stopped after %d shards: %s", end["shards"], end["error"])
            return None
        if time.monotonic() > deadline:
            raise MlclsError(f"shard {seq} of run {base} was not published within {wait_seconds:.0f} s; "
                             "is its tag-images run still listing?")
        time.sleep(poll_seconds)
