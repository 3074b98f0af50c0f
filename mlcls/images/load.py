"""What a decode worker runs: read files and decode them, in a thread or a process.

Imports neither torch nor Prefect, so worker processes start in a fraction
of a second and each costs tens of megabytes, not hundreds. Every failure
becomes the image's `error`, never an exception.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlcls.images.decode import DEFAULT_MAX_PIXELS, Decoded, plain_jpeg_size, prepare
from mlcls.images.preprocess import Preprocess
from mlcls.images.shared import new_shared, shared
from mlcls.storage import describe_os_error, read_many

READ_KIND = "read"  # the error kind of a file storage would not give us (after the retries): tagged next run
# A folder listing's file deleted since, or a URI list's entry that is not there (yet): the next run tries it again.
MISSING = "file not found (listed, but not there when read)"


@dataclass(frozen=True)
class LoadConfig:
    """How to turn a file into a `Decoded`; small, so it travels with every task."""

    preprocess: Preprocess
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True
    gpu_share: float = 0.0  # share of plain JPEGs left as bytes for the GPU to decode (0: none, 1: all)
    storage_options: dict[str, Any] = field(default_factory=dict)


def new_ring(images: int, size: int) -> tuple[int, np.ndarray]:
    """A shared-memory ring of `images` pixel slots, made before the decode processes fork.

    Workers write pixels into their slots and send back only metadata: no
    pixel crosses a pipe, which is what limits a process pool at a few
    thousand images a second otherwise (bench/RESULTS.md).
    """
    return new_shared((images, size, size, 3))


def read_error(err: BaseException) -> Decoded:
    """The error row of a file that could not be read after the retries (`storage.read_many`)."""
    if isinstance(err, FileNotFoundError):
        return Decoded(pixels=None, error=f"{READ_KIND}: {MISSING}")
    return Decoded(pixels=None, error=f"{READ_KIND}: {describe_os_error(err)}")


def decode_one(data: bytes, cfg: LoadConfig, key: str = "") -> Decoded:
    """Pixels on the CPU, or the bytes of a plain JPEG for the GPU (`gpu_share` of them, picked by `key`).

    Splitting the work lets CPU workers and the GPU's decoder run side by
    side; the pick is a hash of the URI, so it is the same on every run.
    """
    if cfg.gpu_share > 0 and (cfg.gpu_share >= 1 or zlib.crc32(key.encode()) < cfg.gpu_share * 2**32):
        size = plain_jpeg_size(data, cfg.max_pixels)
        if size is not None:
            return Decoded(pixels=None, width=size[0], height=size[1], jpeg=data)
    return prepare(data, cfg.preprocess, max_pixels=cfg.max_pixels, draft=cfg.draft)


def load_chunk(uris: Sequence[str], cfg: LoadConfig, ring: int | None = None, first_slot: int = 0,
               sizes: Sequence[int | None] | None = None, arena: int | None = None,
               spans: Sequence[tuple[int, int] | None] | None = None) -> list[Decoded]:
    """Read then decode a few files: the unit of work of a decode process.

    `sizes` are the listed sizes, if known: a body shorter than that is read
    again, never decoded as a truncated image. With `ring`, file k's pixels
    go to slot `first_slot + k` of that ring; with `arena`, a JPEG left for
    the GPU goes to file k's span there if it fits (`mlcls.images.arena`).
    """
    results = []
    for k, (uri, item) in enumerate(zip(uris, read_many(uris, cfg.storage_options, sizes), strict=True)):
        d = read_error(item) if isinstance(item, BaseException) else decode_one(item, cfg, uri)
        if ring is not None and d.pixels is not None:
            slots = shared(ring)
            d.slot = (first_slot + k) % len(slots)
            slots[d.slot] = d.pixels
            d.pixels = None
        span = spans[k] if spans else None
        if arena is not None and span is not None and d.jpeg is not None and len(d.jpeg) <= span[1]:
            shared(arena)[span[0]:span[0] + len(d.jpeg)] = np.frombuffer(d.jpeg, dtype=np.uint8)
            d.jpeg, d.jpeg_at, d.jpeg_len = None, span[0], len(d.jpeg)
        results.append(d)
    return results
