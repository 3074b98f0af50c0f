"""Shared memory through which decode processes hand JPEG bodies to the process that decodes them on the GPU.

Moving a 110 KB JPEG through a process pool's pipe costs the receiving
process ~120 µs of CPU (a pipe read, a copy, unpickling), most of its
budget at 8,000 images/s (bench/RESULTS.md, issue 11). Instead the feeding
process reserves a span of this arena for each file it submits, from the
size the listing gave; the worker writes the body there and sends back
only its length; the feeding process copies it out as the result arrives
and frees the span. Spans are handed out and freed in submission order,
so the arena is a ring of variable-sized spans. A file with no listed
size gets a span of `UNLISTED_BYTES`; one larger than its span, or larger
than the whole arena, goes through the pipe as before: slower, never
wrong. When the arena is full, the feeding process takes in finished
chunks before it submits more (`mlcls.tag.loader`).
"""

from __future__ import annotations

from collections import deque

from mlcls.images.shared import new_shared

ARENA_BYTES = 256 * 1024 * 1024  # in flight at once: ~2,300 JPEGs of ImageNet's size, ~115 phone photos
UNLISTED_BYTES = 1024 * 1024  # the span reserved for a file whose size was not listed (a plain URI list)


class ByteArena:
    """A ring of variable-sized spans over shared memory, allocated and freed first in, first out.

    Only the process that made it allocates (`take`, `free_oldest`); it must
    be made before the decode processes fork, which find its bytes as
    `mlcls.images.shared.shared(id)`.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity or ARENA_BYTES
        self.unlisted = min(UNLISTED_BYTES, self.capacity)
        self.id, self._buf = new_shared((self.capacity,))
        self._live: deque[tuple[int, int]] = deque()  # (start, end) of the spans in use, oldest first
        self._head = 0  # where the next span starts if it fits

    def reserve_for(self, listed: int | None) -> int:
        """The bytes to reserve for a file of `listed` size (a guess where the listing gave none)."""
        return self.unlisted if listed is None else listed

    def take(self, size: int | None) -> tuple[int, int] | None:
        """A span (offset, size) for `size` bytes, or None: no size, or no room until older spans are freed."""
        if not size or size > self.capacity:
            return None
        if not self._live:
            self._head = 0
        tail = self._live[0][0] if self._live else 0
        if self._live and self._head <= tail:  # wrapped: the room is between head and the oldest span
            start = self._head if tail - self._head >= size else None
        elif self.capacity - self._head >= size:
            start = self._head
        else:  # no room at the end: wrap to the start, in front of the oldest span
            start = 0 if tail >= size else None
        if start is None:
            return None
        self._live.append((start, start + size))
        self._head = start + size
        return start, size

    def free_oldest(self) -> None:
        """Free the oldest span still in use (spans are freed in the order they were taken)."""
        self._live.popleft()

    def free_newest(self) -> None:
        """Give back the span taken last, as if it had not been taken."""
        self._live.pop()
        self._head = self._live[-1][1] if self._live else 0

    def read(self, offset: int, length: int) -> bytes:
        """A copy of `length` bytes at `offset` (its span can be freed after)."""
        return self._buf[offset:offset + length].tobytes()

    def reset(self) -> None:
        """Forget every span: only once no worker can still write to one."""
        self._live.clear()
        self._head = 0

    @property
    def in_use(self) -> int:
        return len(self._live)
