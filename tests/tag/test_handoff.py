"""The model's thread decodes files while it waits for them (`mlcls.tag.handoff`), and no file twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from mlcls.images.decode import Decoded
from mlcls.sources import FileRecord, iter_source
from mlcls.tag.handoff import FileJob, Handoff
from mlcls.tag.loader import Loader
from tests.helpers.images import bad_input_catalogue, write_images
from tests.tag.test_loader import PRE, _batches


class Recorder:
    """A decode that notes which thread decoded which file; files named in `gates` wait for their event."""

    def __init__(self, gates: dict[str, threading.Event] | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.gates = gates or {}

    def __call__(self, data: bytes, record: FileRecord) -> Decoded:
        if record.uri in self.gates:
            assert self.gates[record.uri].wait(10)
        self.calls.append((record.uri, threading.get_ident()))
        return Decoded(pixels=None, error=f"decoded {data.decode()}")


def _until(check, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def _job(handoff: Handoff, name: str) -> FileJob:
    job = FileJob(FileRecord(uri=name, size=1))
    handoff.read(job, name.encode())
    return job


def test_the_waiting_thread_decodes_a_file_no_decode_thread_took():
    decode = Recorder()
    handoff = Handoff(decode, slots=1)
    job = _job(handoff, "a")
    assert handoff.wait(job, []).error == "decoded a"
    assert decode.calls == [("a", threading.get_ident())] and handoff.helped == 1
    handoff.decode_in_pool(job)  # the pool thread that read it comes late: it skips the file
    assert len(decode.calls) == 1


def test_while_a_decode_thread_has_its_file_the_waiting_thread_decodes_the_next():
    release = threading.Event()
    decode = Recorder({"a": release})
    handoff = Handoff(decode, slots=1)
    a, b = _job(handoff, "a"), _job(handoff, "b")
    worker = threading.Thread(target=handoff.decode_in_pool, args=(a,))  # the pool takes `a` and is at it
    worker.start()
    assert _until(lambda: a.claimed)
    threading.Thread(target=lambda: b.done.wait(10) and release.set()).start()  # `a` ends once `b` is in
    assert handoff.wait(a, [b]).error == "decoded a"
    worker.join(10)
    assert sorted(decode.calls) == [("a", worker.ident), ("b", threading.get_ident())]  # each once, `b` here
    assert b.result is not None and b.result.error == "decoded b" and handoff.helped == 1


def test_a_handoff_that_does_not_help_leaves_every_decode_to_the_pool():
    decode = Recorder()
    handoff = Handoff(decode, slots=1, helps=False)
    job = _job(handoff, "a")
    worker = threading.Timer(0.2, handoff.decode_in_pool, args=(job,))
    worker.start()
    assert handoff.wait(job, []).error == "decoded a"
    assert decode.calls == [("a", worker.ident)] and handoff.helped == 0


def test_a_decode_that_raises_finishes_its_file_instead_of_leaving_waiters_hanging():
    def broken(data: bytes, record: FileRecord) -> Decoded:
        raise RuntimeError("bug")

    handoff = Handoff(broken, slots=1)
    job = _job(handoff, "a")
    with pytest.raises(RuntimeError, match="bug"):
        handoff.wait(job, [])
    assert job.done.is_set() and job.result is not None and "RuntimeError: bug" in job.result.error


def test_with_the_decode_threads_held_the_consumer_decodes_every_file_to_the_same_batches(tmp_path: Path):
    """Decoding paused for the whole pass: the decode threads take nothing, the consumer decodes it all,
    bad files included, and the batches equal a plain pass's."""
    write_images(tmp_path, 17)
    bad_input_catalogue(tmp_path)
    records = sorted(iter_source(str(tmp_path)), key=lambda r: r.uri)
    want = _batches(Loader(PRE, decode_workers=1, max_pixels=10_000_000), records, 4)
    loader = Loader(PRE, decode_workers=1, max_pixels=10_000_000)
    with loader.decode_paused():
        got = _batches(loader, records, 4)
    assert loader._handoff.helped == loader.decode_clock.read()[1] == len(records) > 0
    assert [(u, e) for u, e, _ in got] == [(u, e) for u, e, _ in want]
    assert sum(e is not None for _, errors, _ in got for e in errors) >= 5
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(got, want, strict=True))
