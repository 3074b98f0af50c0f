"""Files decoded by whichever thread is free first: a decode slot's pool thread, or the thread waiting for them.

On a CPU the thread that runs the model also collects the decoded batches
(`Loader.batches`, threads mode). When decoding is the slower stage, that
thread waits for the decode threads between forward passes and its core
idles meanwhile: the pipeline then runs at the decode threads' pace, not at
what the cores could do. So while it waits it claims files already read
but not yet decoded, the one it waits for first, else the earliest after
it, and decodes them itself; a pool thread gives up a file claimed before
it got a decode slot. The waiting thread decodes only while it would
otherwise idle, never during a forward pass, so it takes no core from the
model; it needs no slot and is not paused (`paused`: the model has the
cores). Measured in bench/RESULTS.md (issue 11, "the model's thread decodes
while it waits").

One lock guards claims, slots and pauses, with two conditions on it: pool
threads wait for a slot (woken when one frees, a pause ends or their file is
claimed elsewhere: they then go back to reading), the waiting thread for a
file (woken when one is read or decoded).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from mlcls.images.decode import Decoded, ImageError
from mlcls.sources import FileRecord


class FileJob:
    """One file of a pass: read by a pool thread, then decoded by the first thread to claim it."""

    __slots__ = ("claimed", "data", "done", "record", "result")

    def __init__(self, record: FileRecord) -> None:
        self.record = record
        self.data: bytes | None = None  # set once read; claimable while not `claimed`
        self.result: Decoded | None = None
        self.claimed = False
        self.done = threading.Event()


class Handoff:
    """Claims, decodes and waits for one loader's file jobs, with `slots` decodes at a time in the pool."""

    def __init__(self, decode: Callable[[bytes, FileRecord], Decoded], slots: int, *, helps: bool = True) -> None:
        self._decode = decode  # (data, record) -> Decoded; on any thread
        self.helps = helps  # False: `wait` only waits (the bench's decode rate a core)
        lock = threading.Lock()
        self._slot_changed = threading.Condition(lock)  # pool threads wait on it
        self._job_changed = threading.Condition(lock)  # the waiting thread waits on it
        self._free = slots  # decode slots of the pool threads
        self._pauses = 0
        self.helped = 0  # files decoded by a waiting thread (`wait`), for the log

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Pool threads start no new decode until the block ends (one under way finishes; reads go on)."""
        with self._slot_changed:
            self._pauses += 1
        try:
            yield
        finally:
            with self._slot_changed:
                self._pauses -= 1
                self._slot_changed.notify_all()

    def read(self, job: FileJob, data: bytes) -> None:
        """The file's bytes are in: from now on any thread may claim it."""
        with self._job_changed:
            job.data = data
            self._job_changed.notify_all()

    def finish(self, job: FileJob, result: Decoded) -> Decoded:
        """`job`'s result (a read error skips the decode); wakes the thread waiting for it."""
        with self._job_changed:
            job.result, job.data, job.claimed = result, None, True
            job.done.set()
            self._job_changed.notify_all()
        return result

    def decode_in_pool(self, job: FileJob) -> None:
        """On the pool thread that read `job`: decode it in a slot, unless another thread claims it first."""
        with self._slot_changed:
            self._slot_changed.wait_for(lambda: job.claimed or (self._free > 0 and self._pauses == 0))
            if job.claimed:
                return
            job.claimed = True
            self._free -= 1
        try:
            self.decode(job)
        finally:
            with self._slot_changed:
                self._free += 1
                self._slot_changed.notify_all()

    def decode(self, job: FileJob) -> Decoded:
        """Decode a job this thread claimed and finish it, whatever the decode raises (nobody waits forever)."""
        assert job.data is not None
        try:
            result = self._decode(job.data, job.record)
        except BaseException as err:
            self.finish(job, Decoded(pixels=None, error=str(ImageError("decode", f"{type(err).__name__}: {err}"))))
            raise
        return self.finish(job, result)

    def wait(self, job: FileJob, later: Iterable[FileJob], task: Future | None = None) -> Decoded:
        """`job`'s result; until it is in, decode it, or the earliest of `later` already read, on this thread.

        `task`: the pool task of `job`; an exception it raised outside the
        read and the decode is raised here.
        """
        while True:
            with self._job_changed:
                if job.done.is_set():
                    assert job.result is not None
                    return job.result
                failed = task.exception() if task is not None and task.done() else None
                if failed is not None:
                    raise failed
                target = None if not self.helps else (
                    job if self._take(job) else next((j for j in later if self._take(j)), None))
                if target is None:
                    self._job_changed.wait(timeout=0.1)  # woken by a read or a finished decode
                    continue
                self._slot_changed.notify_all()  # the pool thread that read it goes back to reading
            self.helped += 1
            self.decode(target)

    @staticmethod
    def _take(job: FileJob) -> bool:
        if job.claimed or job.data is None:
            return False
        job.claimed = True
        return True
