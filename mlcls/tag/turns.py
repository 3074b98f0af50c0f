"""On a CPU box, decoding and the forward pass take turns on all the cores instead of fighting over them.

torch runs a forward pass on every core with OpenMP threads that meet at a
barrier after each operator: one of them descheduled for a decode thread
holds up all the others, which spin while they wait. Running decode threads
beside the model therefore costs more than the decoding itself. Taking
turns (decodes run together, up to one per core, while no forward pass
runs; a forward pass waits for the decodes under way, then has the cores to
itself) gives the pipeline's own limit, cores / (cores / model rate + 1 /
decode rate per core). Reads are not gated: they wait on storage, not on
the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Turns:
    """A readers-writer gate: many decodes at once, or one forward pass; a waiting forward goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._decoding = 0
        self._forward_waiting = 0
        self._forward = False

    @contextmanager
    def decode(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._forward and not self._forward_waiting)
            self._decoding += 1
        try:
            yield
        finally:
            with self._cond:
                self._decoding -= 1
                self._cond.notify_all()

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self._cond:
            self._forward_waiting += 1
            self._cond.wait_for(lambda: self._decoding == 0 and not self._forward)
            self._forward_waiting -= 1
            self._forward = True
        try:
            yield
        finally:
            with self._cond:
                self._forward = False
                self._cond.notify_all()


# Off by default: on a shared 2-core machine the A/B against decode threads beside the model was within the noise
# (mobilenet_v3_large +5%, resnet50 -29% to +15% over rounds; bench/RESULTS.md). bench/throughput.py's
# `draft-turns` variant switches it on, to measure it on a quiet machine before making it the default.
ENABLED = False
CPU_TURNS = Turns()  # one per process: its cores are shared by every engine and loader in it
