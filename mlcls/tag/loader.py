"""Read and decode ahead of the model, in order, with bounded memory.

Three ways to run the workers; by default chosen by how many there are
(`default_pool`):

- threads, for a few workers (a small CPU box, where the model needs the
  cores): fsspec reads wait on I/O and Pillow releases the GIL while it
  decodes and resizes, so threads overlap both with the forward pass at no
  start-up cost; reads may run many at a time, decodes are capped;
- processes, for many workers (a GPU box with 16 cores): Python's share of
  each decode holds the GIL, so threads stop scaling at a few hundred images
  a second (measured in bench/RESULTS.md); processes each read and decode
  chunks of files and leave the pixels in a shared-memory ring (a GPU run's
  JPEG bodies in a shared arena, `mlcls.images.arena`), sending back only
  where. They are forked, as torch's DataLoader does on Linux: a
  forkserver or spawned worker re-runs the caller's main module and starts
  in seconds, not milliseconds. The pool is started with the Loader, so its
  start-up is not paid inside a shard;
- torch's `DataLoader` (`dataloader=True`, opt-in): an IterableDataset over
  the shard, worker k reading and decoding every k-th batch with the same
  `load_chunk` (retried reads, an error row per bad file) and stacking uint8
  pixels; workers are forked per shard (tens of milliseconds), which is what
  lets them see the shard's records without a queue of our own.

Threads and processes live for the process, not for one shard; at most
`prefetch` batches are in flight.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mlcls.allocator import keep_freed_memory
from mlcls.images.arena import ByteArena
from mlcls.images.decode import Decoded
from mlcls.images.gpu import GpuJpegDecoder
from mlcls.images.load import LoadConfig, decode_one, load_chunk, new_ring, read_error
from mlcls.images.preprocess import Preprocess
from mlcls.sources import FileRecord
from mlcls.storage import StorageOptions, read_one
from mlcls.tag.handoff import FileJob, Handoff
from mlcls.tag.threads import PREFETCH, StageClock

log = logging.getLogger(__name__)

PROCESS_THRESHOLD = 4  # this many decode workers or more run as processes


POOLS = ("threads", "processes", "dataloader")


def default_pool(workers: int) -> str:
    """Which decode pool runs by default: our threads (few workers) or processes with the ring (many).

    torch's DataLoader (`decode_pool="dataloader"`) decoded 15–38% faster
    on a 2-core machine with no model running, but end to end at the CPU
    default (one decode worker beside the model) the thread pool was faster
    (69.6 against 61.5 img/s, `bench/RESULTS.md`), so the DataLoader stays
    opt-in; the A/B on a many-core GPU box is still to run.
    """
    return "processes" if workers >= PROCESS_THRESHOLD else "threads"


def default_decode_workers(device_type: str) -> int:
    """Feed a GPU with all cores but the one that drives it; on a CPU, decode on half of them beside the model."""
    cores = os.cpu_count() or 1
    if device_type == "cuda":
        return max(1, cores - 1)
    return max(1, cores // 2)


@dataclass
class ImageBatch:
    """Consecutive records with their decode results.

    `pixels` stacks the CPU-decoded images (positions `ok`); positions `gpu`
    hold JPEG bytes still to be decoded on the device (`Loader.device_pixels`).
    """

    records: list[FileRecord]
    decoded: list[Decoded]
    ok: list[int]
    pixels: torch.Tensor
    gpu: list[int] = field(default_factory=list)
    ahead: int = 0  # images already read and decoded beyond this batch when it was handed out (threads mode)


class Loader:
    """Turns file records into batches of decoded pixels, reading and decoding ahead.

    `consumer_decodes` (threads mode): the thread that takes the batches
    decodes files while it waits for them (`mlcls.tag.handoff`).
    """

    def __init__(self, preprocess: Preprocess, *, decode_workers: int = 1, io_workers: int = 8,
                 max_pixels: int | None = None, draft: bool = True, storage_options: StorageOptions = None,
                 pin_memory: bool = False, gpu_decoder: GpuJpegDecoder | None = None, gpu_share: float = 1.0,
                 processes: bool | None = None, ring_images: int = 1024, dataloader: bool = False,
                 consumer_decodes: bool = True) -> None:
        keep_freed_memory()  # before the workers fork: decoded images reuse freed pages (`mlcls.allocator`)
        self.preprocess = preprocess
        self.config = LoadConfig(preprocess=preprocess, draft=draft,
                                 gpu_share=gpu_share if gpu_decoder is not None else 0.0,
                                 storage_options=dict(storage_options or {}),
                                 **({"max_pixels": max_pixels} if max_pixels else {}))
        self.gpu_decoder = gpu_decoder
        self._cpu_config = replace(self.config, gpu_share=0.0)
        self.pin_memory = pin_memory
        self.processes = default_pool(decode_workers) == "processes" if processes is None else processes
        self.decode_workers = decode_workers
        self.dataloader = dataloader
        self.decode_clock = StageClock()  # decode time per image in threads mode (`threads.ThreadBalance`)
        self._pool: Executor
        self._stragglers: list[Future] = []  # tasks of a pass given up early that may still write ring or arena
        self._handoff = Handoff(self._decode, decode_workers, helps=consumer_decodes)  # threads mode (`handoff`)
        if self.processes:
            self._ring_id, self._ring = new_ring(ring_images, preprocess.size)
            self._arena = ByteArena() if self.config.gpu_share > 0 else None
            self._pool = ProcessPoolExecutor(max_workers=decode_workers, mp_context=_context())
            for f in [self._pool.submit(_ready) for _ in range(decode_workers)]:
                f.result()
        else:
            self._pool = ThreadPoolExecutor(max_workers=io_workers + decode_workers, thread_name_prefix="mlcls-load")

    def _load(self, job: FileJob) -> None:
        """Read then decode one file (a pool thread); any failure becomes its error.

        The decode is left to the consumer where it claims the file first,
        waiting for it (`mlcls.tag.handoff`).
        """
        record = job.record
        try:
            data = read_one(record.uri, self.config.storage_options, record.size)
        except Exception as err:  # noqa: BLE001 - any filesystem error is this file's error
            self._handoff.finish(job, read_error(err))
            return
        self._handoff.read(job, data)
        self._handoff.decode_in_pool(job)

    def _decode(self, data: bytes, record: FileRecord) -> Decoded:
        started = time.perf_counter()
        decoded = decode_one(data, self._task_config(), record.uri)
        self.decode_clock.add(time.perf_counter() - started)
        return decoded

    def _task_config(self) -> LoadConfig:
        """The config a new decode task gets: every image decoded by the workers while the GPU decoder rests
        (`GpuJpegDecoder.wants_jpegs`), as the thread that feeds the device would decode them otherwise."""
        gpu = self.gpu_decoder
        return self.config if gpu is None or gpu.wants_jpegs() else self._cpu_config

    def decode_paused(self) -> AbstractContextManager[None]:
        """Start no new decode in the pool (threads mode) until the block ends: the model gets the cores.

        Reads go on; a decode under way finishes. `threads.ThreadBalance`
        uses it when decoding is a batch ahead of the model.
        """
        return self._handoff.paused()

    def decoded(self, records: Iterable[FileRecord], window: Callable[[], int], held: int = 0,
                pending: deque | None = None) -> Iterator[tuple[FileRecord, Decoded]]:
        """Yield (record, decoded) in input order, keeping about `window()` files in flight (read per file).

        In process mode a decoded image's pixels are a view of a ring slot,
        valid until `window + held` more images have been yielded: the caller
        holds at most `held` of them before copying (as `batches` does).
        In threads mode `pending`, when given, holds the (record, future)
        pairs in flight beyond the image just yielded (see `batches`).
        """
        if self.processes:
            yield from self._from_processes(records, max(1, min(window(), len(self._ring) - held)))  # slots fixed
        else:
            jobs = ((job, self._pool.submit(self._load, job)) for job in map(FileJob, records))
            for job, decoded in _in_order(jobs, window, pending, self._wait):
                yield job.record, decoded

    def _wait(self, job: FileJob, task: Future, later: deque[tuple[FileJob, Future]]) -> Decoded:
        """A file's decode result for the consumer, which decodes files itself until it is in (`handoff`)."""
        return self._handoff.wait(job, (j for j, _ in later), task)

    def _from_processes(self, records: Iterable[FileRecord], window: int) -> Iterator[tuple[FileRecord, Decoded]]:
        """`decoded` for the process pool: chunks of files, pixels in ring slots, JPEG bodies in arena spans.

        When the arena has no room for the next chunk's files, the oldest
        chunks in flight are taken in (their bodies copied out, their spans
        freed) before it is submitted: large files then have fewer chunks in
        flight, and none of them is pushed through the pipe for want of room.
        """
        wait_all(self._stragglers)  # a pass given up early: its running tasks write slots and spans until they end
        self._stragglers = []
        arena, count = self._arena, max(1, min(16, window // (4 * self.decode_workers) or 1))
        if arena is not None:
            arena.reset()
        starts = itertools.count(0, count)
        pending: deque[tuple[_Chunk, Future]] = deque()

        def submit(chunk: _Chunk) -> tuple[_Chunk, Future]:
            config = self._task_config()
            if arena is not None and config.gpu_share > 0:
                chunk.spans = self._reserve(chunk.records, pending)
            return chunk, self._pool.submit(
                load_chunk, [r.uri for r in chunk.records], config, self._ring_id, next(starts) % len(self._ring),
                [r.size for r in chunk.records], arena.id if arena else None, chunk.spans)

        chunks = _chunks(records, count, arena, self.decode_workers)
        try:
            in_flight = max(1, window // count)
            for chunk, decoded in _in_order(map(submit, chunks), lambda: in_flight, pending):
                self._take_in(chunk, decoded)
                yield from zip(chunk.records, decoded, strict=True)
        finally:  # given up early (an error, a cancelled shard): what already runs is waited for next pass
            self._stragglers = [f for _, f in pending if not f.cancel()]

    def _reserve(self, records: list[FileRecord], pending: deque[tuple[_Chunk, Future]]) -> list:
        """Arena spans for `records`, taking in the oldest chunks in flight until they fit (or none is left)."""
        arena = self._arena
        assert arena is not None
        while True:
            sizes = [arena.reserve_for(r.size) for r in records]
            spans = [arena.take(n) for n in sizes]
            if all(s is not None for s, n in zip(spans, sizes, strict=True) if 0 < n <= arena.capacity):
                return spans
            oldest = next(((c, f) for c, f in pending if not c.taken_in), None)  # only when the arena is full
            if oldest is None:
                return spans
            for _ in filter(None, spans):
                arena.free_newest()
            self._take_in(oldest[0], oldest[1].result())

    def _take_in(self, chunk: _Chunk, decoded: list[Decoded]) -> None:
        """Once per chunk, in order: JPEG bodies copied out of the arena (spans freed), pixels seen in the ring."""
        if chunk.taken_in:
            return
        for d in decoded:
            if d.jpeg_at is not None:
                assert self._arena is not None and d.jpeg_len is not None
                d.jpeg, d.jpeg_at, d.jpeg_len = self._arena.read(d.jpeg_at, d.jpeg_len), None, None
            elif d.slot is not None:
                d.pixels = self._ring[d.slot]
        for _ in filter(None, chunk.spans or ()):
            self._arena.free_oldest()  # type: ignore[union-attr]
        chunk.taken_in = True

    def batches(self, records: Iterable[FileRecord], batch_size: int, prefetch: int = PREFETCH,
                window: Callable[[int], int] | None = None) -> Iterator[ImageBatch]:
        """Batches of `batch_size` records; decoding runs `prefetch` batches ahead.

        `window(batch_size)`, when given, is the number of images to keep in
        flight instead, read again as each image is handed on: the CPU
        thread balance widens it once it has chosen its split (`threads.py`).
        """
        if self.dataloader:
            yield from self._dataloader_batches(list(records), batch_size, prefetch)
            return
        chunk: list[tuple[FileRecord, Decoded]] = []
        pending: deque[tuple[FileJob, Future]] = deque()
        helped, count = self._handoff.helped, 0
        ahead = (lambda: window(batch_size)) if window is not None else (lambda: batch_size * prefetch)
        for item in self.decoded(records, window=ahead, held=batch_size, pending=pending):
            count += 1
            chunk.append(item)
            if len(chunk) == batch_size:
                batch = self._collate(chunk)
                batch.ahead = sum(1 for job, _ in pending if job.done.is_set())
                yield batch
                chunk = []
        if chunk:
            yield self._collate(chunk)
        if not self.processes:
            log.debug("the consumer decoded %d of %d files while waiting for them", self._handoff.helped - helped,
                      count)

    def _dataloader_batches(self, records: list[FileRecord], batch_size: int, prefetch: int) -> Iterator[ImageBatch]:
        from torch.utils.data import DataLoader

        workers = max(1, min(self.decode_workers, -(-len(records) // batch_size)))
        shard = _ShardBatches(records, self._task_config(), batch_size, self.preprocess.size)
        loader = DataLoader(shard, batch_size=None,
                            num_workers=workers, prefetch_factor=max(1, prefetch // workers + 1),
                            pin_memory=self.pin_memory, multiprocessing_context=_context(),
                            worker_init_fn=_forget_parent_exit_hooks)
        expected = 0
        for start, pixels, decoded in loader:
            if start != expected:  # rows are matched to records by position: never hand on a batch out of order
                raise RuntimeError(f"decode workers returned batch {start}, expected {expected}")
            expected += len(decoded)
            yield _image_batch(records[start:expected], decoded, pixels)

    def _collate(self, chunk: list[tuple[FileRecord, Decoded]]) -> ImageBatch:
        decoded = [d for _, d in chunk]
        pixels = stack_pixels(decoded, self.preprocess.size, pin=self.pin_memory)  # the batch owns the pixels now:
        for d in decoded:  # ring slots get reused, memory stays bounded
            d.slot = None
        return _image_batch([r for r, _ in chunk], decoded, pixels)

    def device_pixels(self, batch: ImageBatch, device: torch.device) -> tuple[list[int], torch.Tensor]:
        """All of the batch's decodable images on `device`, and their positions in the batch.

        GPU-decodes the batch's JPEGs (`GpuJpegDecoder.decode_or_fallback`: one the GPU
        cannot decode goes through the CPU path, which gives it pixels or its error row).
        """
        decoded_order, decoded_parts = [], []
        if self.gpu_decoder is not None:
            self.gpu_decoder.next_batch()
        if batch.gpu:  # first: the GPU decode waits for the stream's queued work, this batch's copy not among it
            assert self.gpu_decoder is not None
            done = self.gpu_decoder.decode_or_fallback([batch.decoded[i] for i in batch.gpu], self._cpu_config)
            for i, (decoded, img) in zip(batch.gpu, done, strict=True):
                batch.decoded[i] = decoded
                if img is not None:
                    decoded_parts.append(img[None])
                    decoded_order.append(i)
        order = list(batch.ok) + decoded_order
        parts = ([batch.pixels.to(device, non_blocking=True)] if batch.ok else []) + decoded_parts
        if not parts:
            size = self.preprocess.size
            return [], torch.empty((0, size, size, 3), dtype=torch.uint8, device=device)
        return order, torch.cat(parts)

    def close(self, wait: bool = False) -> None:
        """Stop the workers; `wait` for them to exit (a process about to end: else the pool's exit hook fails)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)


class _ShardBatches(torch.utils.data.IterableDataset):
    """A shard's records as batches of (first position, uint8 pixels, decode results); worker k takes every k-th
    batch, so the DataLoader's round-robin hands them back in order."""

    def __init__(self, records: list[FileRecord], config: LoadConfig, batch_size: int, size: int) -> None:
        self.records, self.config, self.batch_size, self.size = records, config, batch_size, size

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, list[Decoded]]]:
        info = torch.utils.data.get_worker_info()
        n, k = (info.num_workers, info.id) if info else (1, 0)
        for j, start in enumerate(range(0, len(self.records), self.batch_size)):
            if j % n != k:
                continue
            chunk = self.records[start:start + self.batch_size]
            decoded = load_chunk([r.uri for r in chunk], self.config, None, 0, [r.size for r in chunk])
            yield start, stack_pixels(decoded, self.size), decoded


def stack_pixels(decoded: list[Decoded], size: int, *, pin: bool = False) -> torch.Tensor:
    """The CPU-decoded images of a batch stacked as (n, size, size, 3) uint8; their `pixels` are let go.

    `pin`: stacked straight into page-locked memory, for an asynchronous copy
    to a GPU; pinning a stacked batch would copy it once more (~38 MB a
    batch of 256 at 224 px, on the thread that feeds the GPU).
    """
    ok = [d.pixels for d in decoded if d.pixels is not None]
    for d in decoded:
        d.pixels = None
    out = torch.empty((len(ok), size, size, 3), dtype=torch.uint8, pin_memory=pin and bool(ok))
    if ok:
        np.stack(ok, out=out.numpy())
    return out


def _image_batch(records: list[FileRecord], decoded: list[Decoded], pixels: torch.Tensor) -> ImageBatch:
    """A batch whose `pixels` stack, in order, its images with neither an error nor bytes left for the GPU."""
    ok = [i for i, d in enumerate(decoded) if d.error is None and d.jpeg is None]
    gpu = [i for i, d in enumerate(decoded) if d.jpeg is not None]
    return ImageBatch(records=records, decoded=decoded, ok=ok, pixels=pixels, gpu=gpu)


def _context() -> multiprocessing.context.BaseContext:
    """fork where there is one (Linux): workers run only PIL, numpy and fsspec code."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and os.name == "posix" else "spawn")


def _forget_parent_exit_hooks(_worker: int) -> None:
    """Drop the exit hooks a forked worker inherited through `threading._register_atexit`.

    Prefect's queue services register one that drains their queue; in a
    forked child Prefect's own at-fork reset leaves that queue without its
    event, so the hook fails an assertion as the worker exits and
    multiprocessing turns it into exit status 1: the DataLoader then calls a
    worker that did all its work "exited unexpectedly" and the shard fails.
    The child never started those services, so there is nothing to drain.
    """
    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def _ready() -> bool:
    return True


@dataclass
class _Chunk:
    """Files a decode process reads and decodes as one task, with their arena spans (None: no room reserved)."""

    records: list[FileRecord]
    spans: list | None = None
    taken_in: bool = False


def _chunks(records: Iterable[FileRecord], count: int, arena: ByteArena | None, workers: int) -> Iterator[_Chunk]:
    """Up to `count` files a chunk; with an arena, fewer where their bytes would pass capacity / (4 × workers),
    so that big files travel in small chunks and every worker still has several in flight."""
    limit = arena.capacity // (4 * workers) if arena is not None else None
    chunk: list[FileRecord] = []
    size = 0
    for r in records:
        n = arena.reserve_for(r.size) if arena is not None else 0
        if chunk and (len(chunk) == count or (limit and size + n > limit)):
            yield _Chunk(chunk)
            chunk, size = [], 0
        chunk.append(r)
        size += n
    if chunk:
        yield _Chunk(chunk)


def _in_order(tasks: Iterator[tuple], window: Callable[[], int], pending: deque[tuple[Any, Future]] | None = None,
              wait: Callable[[Any, Future, deque], Any] | None = None) -> Iterator[tuple]:
    """(key, future) pairs in, (key, result) out in the same order, at most `window()` pending (read per pair).

    `pending`, when given, is the queue to use: the caller can count how
    many of its futures are done (how far the workers lead it). `wait(key,
    future, pending)`, when given, gets a result instead of `future.result()`.
    """
    pending = deque() if pending is None else pending
    result = wait or (lambda _key, fut, _later: fut.result())
    try:
        for key, fut in tasks:
            pending.append((key, fut))
            if len(pending) >= window():
                k, f = pending.popleft()
                yield k, result(k, f, pending)
        while pending:
            k, f = pending.popleft()
            yield k, result(k, f, pending)
    finally:
        for _, f in pending:
            f.cancel()
