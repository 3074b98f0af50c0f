"""Preprocessing that travels in the bundle: size, resize mode, interpolation, mean/std, and the
PIL resize and crop that follow torchvision's `Resize`/`CenterCrop` to the pixel.

Imports neither torch nor torchvision, so decode worker processes start fast and stay small;
normalisation happens on the batch, on the device (`mlcls.tag.engine`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from mlcls.errors import BundleError

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


RESIZE_MODES = ("shorter", "squash")


DRAFT_MARGIN = 2.0  # JPEG draft decodes to at least twice the resize target: keeps labels (bench/RESULTS.md)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: resize, crop, normalise.

    `resize_mode="shorter"` resizes the shorter side to `resize_size` and
    centre-crops `size` (torchvision's ImageNet recipe); `"squash"` resizes
    to `size`×`size`, ignoring the aspect ratio, and keeps the whole frame.
    """

    size: int = 224
    resize_size: int = 256
    resize_mode: str = "shorter"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.size, int) and self.size > 0):
            problems.append(f"size must be a positive integer, not {self.size!r}")
        if not (isinstance(self.resize_size, int) and self.resize_size >= (self.size or 0)):
            problems.append(f"resize_size must be an integer >= size, not {self.resize_size!r}")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                problems.append(f"{name} must be three numbers, not {value!r}")
        if len(self.std) == 3 and any(v <= 0 for v in self.std):
            problems.append(f"std must be positive, not {self.std!r}")
        if problems:
            raise BundleError("bad preprocessing: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise BundleError(f"bad preprocessing: unknown keys {', '.join(sorted(unknown))}")
        d = dict(d)
        for name in ("mean", "std"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def draft_request(self, width: int, height: int) -> tuple[int, int]:
        """The smallest decode size (stored orientation) that loses nothing after resizing."""
        if self.resize_mode == "squash":
            side = math.ceil(self.size * DRAFT_MARGIN)
            return (side, side)
        scale = self.resize_size * DRAFT_MARGIN / min(width, height)
        return (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))


def resize_crop(img: Image.Image, pre: Preprocess, *, fast: bool = False) -> Image.Image:
    """The bundle's resize and crop: torchvision's `Resize` then `CenterCrop` semantics, in plain PIL.

    `fast` resamples only the centre crop's window of the source (Pillow's
    `box`), with the same scale and sample positions, instead of resizing the
    whole image and throwing its margins away: 1.7 -> 1.0 ms an ImageNet-sized
    photo and 3.5 -> 1.9 ms a mixed-corpus JPEG here (bench/RESULTS.md, issue
    11). Pillow computes the window's filter positions in floating point from
    the box, so about 1 % of the values come out one level apart from the
    full resize; with `fast=False` the pixels are torchvision's exactly.
    """
    resample = INTERPOLATIONS[pre.interpolation]
    if pre.resize_mode == "squash":
        return img if img.size == (pre.size, pre.size) else img.resize((pre.size, pre.size), resample)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(pre.resize_size * long / short)
    size = (pre.resize_size, new_long) if w <= h else (new_long, pre.resize_size)
    if fast and size != (w, h) and min(size) >= pre.size:
        return _resize_window(img, size, pre.size, resample)
    if size != (w, h):
        img = img.resize(size, resample)
    return center_crop(img, pre.size)


def _resize_window(img: Image.Image, size: tuple[int, int], crop: int, resample: Image.Resampling) -> Image.Image:
    """The centre `crop` square of `img` resized to `size`, resampling only that square's source window."""
    (w, h), (nw, nh) = img.size, size
    top, left = round((nh - crop) / 2.0), round((nw - crop) / 2.0)  # center_crop's rounding
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), resample, box=box)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's centre crop (its rounding; zero padding if the image is smaller)."""
    w, h = img.size
    if w < size or h < size:
        padded = Image.new(img.mode, (max(w, size), max(h, size)))
        padded.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = padded, padded.size
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))
