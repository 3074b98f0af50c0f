"""Decode image bytes into model-ready pixels, or a reason why not.

Every file of a real collection reaches here: JPEGs far larger than the
model's input (decoded at reduced size with `Image.draft`), EXIF-rotated
photos, palette GIFs, 16-bit PNGs, CMYK, alpha, animations, truncated files,
text named `.jpg`, decompression bombs. `prepare` never raises for a bad
image: it returns a `Decoded` with an `error` of the form `kind: detail`, so
one bad file costs one error row, never a run.

Preprocessing (`Preprocess`) travels in the model bundle, so tagging feeds
the model exactly what it was trained on. The resize and crop follow
torchvision's `Resize`/`CenterCrop` on PIL images to the pixel (tested), but
this module imports neither torch nor torchvision: decode worker processes
start in a fraction of a second and stay small. Normalisation happens on the
batch, on the device (see `mlcls.tag.engine`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlcls.images.preprocess import Preprocess, resize_crop

DEFAULT_MAX_PIXELS = 100_000_000


_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


_ORIENTATION_TAG = 0x0112


class ImageError(Exception):
    """Why one image could not be tagged; `str()` gives `kind: detail`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(slots=True)
class Decoded:
    """One image ready for batching: pixels (HWC uint8) and its original size, or an error.

    On CUDA runs a JPEG may instead carry its bytes in `jpeg`, to be decoded on the GPU.
    """

    pixels: np.ndarray | None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    jpeg: bytes | None = None
    slot: int | None = None  # where a decode process left the pixels (see `mlcls.tag.loader`)
    jpeg_at: int | None = None  # where a decode process left `jpeg` in the arena (`mlcls.images.arena`)...
    jpeg_len: int | None = None  # ...and its length


def open_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
             draft: Callable[[int, int], tuple[int, int]] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `data` to an upright RGB image; return it with the original (upright) size.

    `draft(width, height)` gives the smallest size the caller needs; JPEG
    decoding then scales down by 1/2, 1/4 or 1/8 while staying at least that
    large, which saves most of the decode cost on photos much larger than the
    model input. Raises `ImageError`.
    """
    if not data:
        raise ImageError("empty", "the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("decode", "not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as err:
        raise ImageError("too_large", str(err).split(",")[0]) from None
    except Exception as err:  # noqa: BLE001 - a malformed header can raise anything
        raise ImageError("decode", _reason(err)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} is {width * height:,} pixels, "
                         f"over the limit of {max_pixels:,} (raise it with --max-pixels)")
    orientation = _orientation(img)
    upright = (height, width) if orientation in _TRANSPOSED else (width, height)
    try:
        if draft is not None and img.format == "JPEG":
            img.draft(None, draft(width, height))
        img.load()
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
        return to_rgb(img), upright
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        raise ImageError("decode", _reason(err)) from None


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels as stored
        return None


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "truncated" in text.lower():
        return f"truncated image data (the file ends early): {text}"
    return text


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float scaled, alpha composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit or float pixels to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        top = 1.0 if np.nanmax(arr, initial=0) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).astype(np.uint8)
    top = 65535 if arr.max(initial=0) > 255 else 255
    return (np.clip(arr.astype(np.int64), 0, top) * 255 // top).astype(np.uint8)


def plain_jpeg_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """The size of a complete, upright RGB or grey JPEG within the pixel limit, else None.

    Such a file can be decoded anywhere (nvJPEG on the GPU, say) with the same
    result; anything else (other formats, CMYK, EXIF rotation, a missing end
    marker) takes the PIL path above, which knows how to handle or report it.
    """
    if not data.startswith(b"\xff\xd8") or data.rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            if width * height > max_pixels or _orientation(img) not in (None, 1):
                return None
            return width, height
    except Exception:  # noqa: BLE001 - the PIL path reports what is wrong with it
        return None


def prepare(data: bytes, pre: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS,
            draft: bool = True) -> Decoded:
    """Bytes to a `Decoded`: pixels of shape (size, size, 3), or an error. Never raises for bad data.

    `draft` is the fast mode: JPEGs decoded at reduced size and only the crop's window resampled
    (`resize_crop(fast=True)`); off, the pixels are torchvision's `Resize`/`CenterCrop` exactly.
    """
    try:
        img, (width, height) = open_rgb(data, max_pixels=max_pixels, draft=pre.draft_request if draft else None)
        pixels = np.asarray(resize_crop(img, pre, fast=draft))
        return Decoded(pixels=pixels, width=width, height=height)
    except ImageError as err:
        return Decoded(pixels=None, error=str(err))
    except MemoryError:
        return Decoded(pixels=None, error="too_large: out of memory while decoding")
