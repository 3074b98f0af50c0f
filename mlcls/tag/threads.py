"""How many torch threads the model gets beside the CPU decode threads: measured on the run, not guessed.

On a CPU the model and the decode workers share the cores. torch starts
one intra-op thread per core, so with W decode threads the machine runs
cores + W busy threads: OpenMP's workers spin between operators and the
decode threads lose their core, or the decode threads preempt a worker and
every operator waits for it at its barrier. Which split is faster depends
on the model (bench/RESULTS.md, issue 11, 2 cores, one decode thread,
whole `mlcls tag` runs): mobilenet_v3_large ran 99.8 img/s with one torch
thread against 92.0 with two (3 of 3 rounds), resnet50 28.5 against 36.9.
No fixed default serves both, so the first batches of a long enough shard
(`MIN_BATCHES`)
try both splits (all threads, then all but one per decode worker), time
the forward pass and the decoding per image under each, and keep the split
whose slower stage is faster: with decoding ahead of the model, the
slower stage sets the pace. The choice is kept on the engine: later shards
in the process skip the probe.

When the lean split wins, the decode threads finish ahead of the model
part of the time and then idle. So a batch whose successor is already
decoded (`ImageBatch.ahead`) runs on all threads with new decodes paused
(`Loader.decode_paused`): the model gets every core without fighting the
decoders, which refill the window during the lean batches. Measured on a
2-core AVX2 EPYC (mobilenet_v3_large, whole shards of 2,400 images, paired
runs): ~1 batch in 3 ran that way, 69-93 img/s against 62-79 without it
(bench/RESULTS.md, issue 11). The probe weighs the lean split with that
boost: a third arm times batches on all threads with decoding paused, and
the lean split's estimate mixes its own batches with such ones in the share
the decode threads leave free (`_lean_with_boost`).

That estimate holds only if the decode threads never stop during a lean
batch, so the lean split also sets how far decoding may run ahead
(`prefetch`): a lean batch lasts m1/d times as long as decoding its
images, and the window must hold what is decoded meanwhile. For
resnet50 on a 2-core AVX-512 BF16 EPYC (m1/d ~ 5) the default window of 3
batches left the decode thread idle most of each lean batch: 28.6 img/s
against 31.5-32.1 with 8 batches (bench/RESULTS.md, issue 11).

Only for in-process decode threads, and only when the user has not set
`OMP_NUM_THREADS` (then torch's threads are theirs). A compiled engine is
balanced too: its kernels read the thread count when they run
(`compiling.compile_options`), and its graph for each count the balance may
set is built before the shard's first batch (`Engine.warm_threads`), since
Dynamo recompiles under a new count and the probe would time that.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

PROBE_BATCHES = 2  # batches timed under each split, after one warm-up batch
MIN_BATCHES = 20  # shorter shards are not probed: the losing split would run more than a tenth of them
PREFETCH = 3  # batches decoded ahead of the model, unless the lean split needs more (see the module doc)
MAX_AHEAD = 1024  # images decoded ahead at most, whatever the split (~150 MB of 224 px crops)


class Split(NamedTuple):
    """What the probe chose for a number of decode threads: torch's threads and how many batches decode ahead."""

    threads: int
    prefetch: int = PREFETCH


class StageClock:
    """Seconds and items of work done by many threads (the decode threads add to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.items = 0

    def add(self, seconds: float, items: int = 1) -> None:
        with self._lock:
            self.seconds += seconds
            self.items += items

    def read(self) -> tuple[float, int]:
        with self._lock:
            return self.seconds, self.items


@dataclass
class _Arm:
    """One split's measurements: forward seconds and images, decode seconds and images in its window."""

    threads: int
    model_seconds: float = 0.0
    model_images: int = 0
    decode_seconds: float = 0.0
    decoded: int = 0

    def model(self) -> float:
        """Forward seconds an image."""
        return self.model_seconds / max(1, self.model_images)

    def decode(self, workers: int) -> float:
        """Decode seconds an image, shared by `workers` threads."""
        return self.decode_seconds / self.decoded / workers if self.decoded else 0.0

    def per_image(self, workers: int) -> float:
        """Seconds per image of the slower stage."""
        return max(self.model(), self.decode(workers))


class ThreadBalance:
    """Sets torch's threads per batch: the probe's splits first, then the faster one (see the module doc)."""

    def __init__(self, chosen: dict[int, Split] | None, base: int, workers: int, decode_clock: StageClock | None,
                 batches: int, pause: Callable[[], AbstractContextManager[None]] | None = None) -> None:
        self.saved, self.workers, self.clock, self.chosen = base, workers, decode_clock, chosen
        self.pause, self.boosted, self.prefetch = pause, 0, PREFETCH
        lean = base - workers
        self.arms: list[_Arm] = []
        if chosen is not None and workers in chosen:
            self.fixed: int | None = chosen[workers].threads
            self.prefetch = chosen[workers].prefetch
        elif chosen is not None and decode_clock is not None and lean >= 1 and batches >= MIN_BATCHES:
            self.fixed = None
            self.arms = [_Arm(base), _Arm(lean)] + ([_Arm(base)] if pause is not None else [])  # the third: boost
        else:
            self.fixed = base
        self._mark: tuple[float, int] = (0.0, 0)

    def thread_counts(self) -> set[int]:
        """Every torch thread count this balance may set: the probe's arms, the split chosen, all threads."""
        return {self.saved, *(a.threads for a in self.arms), *([self.fixed] if self.fixed else [])}

    @classmethod
    def off(cls) -> ThreadBalance:
        """Leave torch's threads as they are (GPU engines, process pools, threads the user pinned)."""
        return cls(None, torch.get_num_threads(), 0, None, 0)

    def _arm(self, index: int) -> _Arm | None:
        k = (index - 1) // PROBE_BATCHES
        return self.arms[k] if self.arms and index >= 1 and k < len(self.arms) else None

    @contextmanager
    def batch(self, index: int, images: int, ahead: int = 0) -> Iterator[None]:
        """Run batch `index` (0-based) of `images` images under this balance's threads; time it if probed.

        `ahead`: images already decoded beyond this batch. Where the lean
        split runs and the next batch is ready, this batch runs on all
        threads with decoding paused (see the module doc).
        """
        arm = self._arm(index)
        if self.fixed is None and arm is None and index > len(self.arms) * PROBE_BATCHES:
            self._decide()
        threads = arm.threads if arm is not None else (self.fixed or self.saved)
        pause = self.pause if arm is None and threads < self.saved and 0 < images <= ahead else None
        if arm is not None and arm is self._boost_arm():
            pause = self.pause  # the probe times the boost whether or not the next batch is ready
        if pause is not None:
            threads = self.saved
            self.boosted += arm is None
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with pause() if pause is not None else nullcontext(), self._timed(arm, index, images):
            yield

    @contextmanager
    def _timed(self, arm: _Arm | None, index: int, images: int) -> Iterator[None]:
        """Add a probed batch's forward time and its window's decoding to its arm."""
        if arm is None or self.clock is None:
            yield
            return
        if (index - 1) % PROBE_BATCHES == 0:  # the arm's first batch: its decode window opens
            self._mark = self.clock.read()
        started = time.perf_counter()
        yield
        arm.model_seconds += time.perf_counter() - started
        arm.model_images += images
        seconds, items = self.clock.read()  # the window so far; its last batch leaves the whole arm's
        arm.decode_seconds, arm.decoded = seconds - self._mark[0], items - self._mark[1]

    def _boost_arm(self) -> _Arm | None:
        return self.arms[2] if len(self.arms) > 2 else None

    def _lean_with_boost(self) -> float:
        """Seconds an image with the lean split, counting the batches it runs boosted (see the module doc).

        The decode threads, at d seconds an image (shared), decode all the
        time; the model runs m1 an image beside them and m2 on all threads
        while they pause. With d < m1 a share d/m1 of the images goes
        through lean batches and the rest through boosted ones: N images
        take N(d + m2(1 - d/m1)). With d >= m1 decoding sets the pace.
        """
        lean, boost = self.arms[1], self._boost_arm()
        decode, m1 = lean.decode(self.workers), lean.model()
        if boost is None or not boost.model_images or decode >= m1:
            return lean.per_image(self.workers)
        return decode + boost.model() * (1 - decode / m1)

    def window(self, batch_size: int) -> int:
        """Images the loader may decode ahead of the model now (read on every image: the probe may widen it)."""
        return batch_size * min(self.prefetch, max(PREFETCH, MAX_AHEAD // batch_size))

    def _decide(self) -> None:
        full, lean = self.arms[0].per_image(self.workers), self._lean_with_boost()
        self.fixed = self.arms[0].threads if full <= lean else self.arms[1].threads
        if self.fixed < self.saved and self._boost_arm() is not None:
            self.prefetch = self._lean_prefetch()
        if self.chosen is not None:
            self.chosen[self.workers] = Split(self.fixed, self.prefetch)
        log.info("torch threads beside %d decode thread(s): %d (slower stage %.1f ms an image with %d threads, "
                 "%.1f with %d%s), %d batches decoded ahead", self.workers, self.fixed, 1e3 * full,
                 self.arms[0].threads, 1e3 * lean, self.arms[1].threads,
                 " and paused decoding between" if self._boost_arm() else "", self.prefetch)

    def _lean_prefetch(self) -> int:
        """Batches to decode ahead so a lean batch never stalls the decode threads: m1/d of them, and two spare."""
        lean = self.arms[1]
        decode = lean.decode(self.workers)
        return max(PREFETCH, math.ceil(lean.model() / decode) + 2) if decode > 0 else PREFETCH

    def close(self) -> None:
        """Give torch back the threads the engine started with."""
        if self.boosted:
            log.debug("%d batches ran on all %d threads with decoding paused", self.boosted, self.saved)
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)


def user_pinned_threads() -> bool:
    """Whether the user chose torch's threads through the environment (then they are left alone)."""
    return bool(os.environ.get("OMP_NUM_THREADS"))
