"""Anonymous shared memory made before the decode processes fork, found again in them by a small id.

The pixel ring (`mlcls.images.load.new_ring`) and the JPEG arena
(`mlcls.images.arena`) both live here: a task sends a worker the id, not
the memory, and a forked worker's copy of this registry points at the same
pages as the parent's.
"""

from __future__ import annotations

import itertools
import mmap

import numpy as np

_BUFFERS: dict[int, np.ndarray] = {}
_IDS = itertools.count()


def new_shared(shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """A zeroed uint8 array of `shape` in anonymous shared memory, and its id for `shared`."""
    buf_id = next(_IDS)
    _BUFFERS[buf_id] = np.frombuffer(mmap.mmap(-1, int(np.prod(shape))), dtype=np.uint8).reshape(shape)
    return buf_id, _BUFFERS[buf_id]


def shared(buf_id: int) -> np.ndarray:
    """The array `new_shared` made under `buf_id`, here or in a decode process forked after it was made."""
    return _BUFFERS[buf_id]
