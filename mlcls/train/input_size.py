"""The model's input size and resize mode for training: what the user gave, or what fits the images.

Upscaling small images to ImageNet's 224 px costs three times the compute
of their native size and adds no detail (issue 14: 128 px scans upscaled
to 256 and centre-cropped to 224 took 2.4x the time per epoch of a loop
at 128 px, and trained worse). So by default the side is the images' own
(their median shorter side, sampled from the labels file), at most
`MAX_AUTO_SIZE`. And the resize mode defaults to `squash`, the whole frame
resized to a square: for multi-label, a centre crop can cut out a labelled
object while its label stays. The bundle records the result
(`Preprocess`), so tagging preprocesses exactly as training did.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from mlcls.errors import OptionError
from mlcls.images.preprocess import RESIZE_MODES, Preprocess
from mlcls.storage import StorageOptions, url_to_fs

logger = logging.getLogger(__name__)
MAX_AUTO_SIZE = 224
MIN_SIZE = 32  # the smallest input the common architectures take (five stride-2 stages)
SAMPLE = 16  # images whose headers are read to find the size


@dataclass(frozen=True)
class InputChoice:
    """The user's input options: `size=None` means from the images; `resize_size` only for `shorter`."""

    size: int | None = None
    resize_mode: str = "squash"
    resize_size: int | None = None

    @classmethod
    def of(cls, size: int | None, resize_mode: str | None, resize_size: int | None) -> InputChoice:
        """The choice from user options: no mode given means `shorter` with a `resize_size`, else `squash`."""
        mode = resize_mode or ("shorter" if resize_size else "squash")
        return cls(size=size, resize_mode=mode, resize_size=resize_size).check()

    def check(self) -> InputChoice:
        if self.size is not None and self.size < 16:
            raise OptionError(f"--size must be at least 16, not {self.size}")
        if self.resize_mode not in RESIZE_MODES:
            raise OptionError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}")
        if self.resize_size is not None and self.resize_mode != "shorter":
            raise OptionError("--resize-size goes with --resize-mode shorter (squash resizes to --size)")
        if self.size is not None and self.resize_size is not None and self.resize_size < self.size:
            raise OptionError(f"--resize-size ({self.resize_size}) must be at least --size ({self.size})")
        return self

    def preprocess(self, size: int) -> Preprocess:
        """The bundle's preprocessing for a model input of `size` px."""
        if self.resize_mode == "squash":
            return Preprocess(size=size, resize_size=size, resize_mode="squash")
        return Preprocess(size=size, resize_size=max(size, self.resize_size or round(size * 8 / 7)))


def size_for(sides: Sequence[int]) -> int:
    """The input side that fits images whose shorter sides are `sides`: their median, a multiple of 32, <= 224."""
    if not sides:
        return MAX_AUTO_SIZE
    median = int(statistics.median(sides))
    return max(MIN_SIZE, min(MAX_AUTO_SIZE, median // 32 * 32))


def shorter_sides(uris: Sequence[str], storage_options: StorageOptions = None, sample: int = SAMPLE) -> list[int]:
    """Shorter sides of up to `sample` images spread over `uris`, from their headers (no decoding)."""
    step = max(1, len(uris) // sample)
    sides = []
    for uri in list(uris)[::step][:sample]:
        try:
            fs, path = url_to_fs(uri, storage_options)
            with fs.open(path, "rb") as f, Image.open(f) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            logger.debug("size of %s unknown: %s", uri, err)
    return sides


def resolve_preprocess(choice: Preprocess | InputChoice, uris: Sequence[str],
                       storage_options: StorageOptions = None) -> Preprocess:
    """The preprocessing to train with: given outright, or with the size read from the images."""
    if isinstance(choice, Preprocess):
        return choice
    choice.check()
    if choice.size is not None:
        return choice.preprocess(choice.size)
    sides = shorter_sides(uris, storage_options)
    pre = choice.preprocess(size_for(sides))
    logger.info("input %d px (%s) from the images (median shorter side %s px of %d sampled)", pre.size,
                pre.resize_mode, int(statistics.median(sides)) if sides else "?", len(sides))
    return pre
