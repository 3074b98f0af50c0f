"""Labelled images held in memory as uint8 pixels, read and decoded once.

Training makes many passes over the same images; decoding JPEGs every epoch
would keep a CPU busy with Pillow instead of the model. Each image is read
(fsspec, many at a time on S3) and decoded by the tagging code path
(`workers.load_chunk`: draft decode, EXIF, alpha, 16-bit...) once, into a
preallocated array:

- training images at the resize size, as a square, so augmentation can crop;
- validation images exactly as tagging preprocesses them, so validation
  metrics are tagging metrics.

A listed image that does not exist is the user's to fix (a wrong `--images`
root, a stale labels file): that stops the run, naming a few. An image that
exists but cannot be decoded is left out with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mlcls import progress
from mlcls.errors import LabelsError
from mlcls.images.load import LoadConfig, load_chunk
from mlcls.images.preprocess import Preprocess
from mlcls.storage import StorageOptions

logger = logging.getLogger(__name__)
CHUNK = 16
MEMORY_SHARE = 0.6  # of the memory available now, at most this much for the pixel arrays


def stored_preprocess(pre: Preprocess) -> Preprocess:
    """Training storage: resized like inference, centre-cropped to a `resize_size` square."""
    side = pre.resize_size
    return Preprocess(size=side, resize_size=side, resize_mode=pre.resize_mode, interpolation=pre.interpolation,
                      mean=pre.mean, std=pre.std)


def check_memory(images: int, side: int, what: str = "images") -> None:
    """Refuse, before reading anything, a data set whose pixels cannot fit in memory."""
    need = images * side * side * 3
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > MEMORY_SHARE * free:
        raise LabelsError(f"{images:,} {what} at {side} px need {need / 2**30:.1f} GiB in memory, more than this "
                          f"machine has free ({free / 2**30:.1f} GiB): use a smaller --size or fewer images")


def load_pixels(uris: Sequence[str], pre: Preprocess, *, storage_options: StorageOptions = None,
                workers: int = 8, source: str = "the labels file") -> tuple[np.ndarray, np.ndarray]:
    """(pixels of the readable images, their indices into `uris`); emits `loading`/`loaded` events."""
    check_memory(len(uris), pre.size)
    cfg = LoadConfig(preprocess=pre, storage_options=dict(storage_options or {}))
    pixels = np.empty((len(uris), pre.size, pre.size, 3), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    progress.emit(progress.Event("loading", total=len(uris)))
    starts = range(0, len(uris), CHUNK)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mlcls-data") as pool:
        for start, decoded in zip(starts, pool.map(lambda s: load_chunk(uris[s:s + CHUNK], cfg), starts),
                                  strict=True):
            failed = 0
            for k, d in enumerate(decoded):
                if d.pixels is None:
                    errors.append((start + k, d.error or "unknown"))
                    failed += 1
                else:
                    pixels[start + k] = d.pixels
            progress.emit(progress.Event("loaded", count=len(decoded), errors=failed))
    bad = _check_errors(uris, errors, source)
    keep = np.setdiff1d(np.arange(len(uris)), bad)
    return (pixels if len(keep) == len(uris) else pixels[keep]), keep


def _check_errors(uris: Sequence[str], errors: list[tuple[int, str]], source: str) -> np.ndarray:
    """Missing files stop the run; undecodable ones are dropped with a warning."""
    missing = [uris[i] for i, e in errors if e.startswith("read: file not found")]
    if missing:
        raise LabelsError(f"{len(missing)} of {len(uris)} images listed in {source} do not exist "
                          f"(first: {', '.join(missing[:3])}); check the paths or --images")
    unreadable = [i for i, e in errors if not e.startswith("read:")]
    reads = [(i, e) for i, e in errors if e.startswith("read:")]
    if reads:
        raise LabelsError(f"cannot read {len(reads)} images listed in {source} ({uris[reads[0][0]]}: {reads[0][1]})")
    if len(unreadable) == len(uris):
        raise LabelsError(f"none of the {len(uris)} images listed in {source} could be decoded "
                          f"(first: {uris[errors[0][0]]}: {errors[0][1]})")
    if unreadable:
        first = dict(errors)[unreadable[0]]
        logger.warning("left out %d of %d images that cannot be decoded (first: %s: %s)", len(unreadable),
                       len(uris), uris[unreadable[0]], first)
    return np.array(sorted(i for i, _ in errors), dtype=np.int64)
