"""Small seeded test images, and a catalogue of files a real collection holds that cannot be tagged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(arr: np.ndarray, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, photo-like RGB array (JPEG-friendly, unlike white noise)."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    arr = base + 60 * np.sin(x[..., None] / rng.uniform(8, 40) + rng.uniform(0, 6, 3)) \
        + 60 * np.cos(y[..., None] / rng.uniform(8, 40))
    return np.clip(arr + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, seed: int = 0, prefix: str = "img",
                 side: tuple[int, int] = (60, 200)) -> list[Path]:
    """`n` small seeded JPEGs of varied sizes, each side in [side[0], side[1])."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(*side)), int(rng.integers(*side))
        p = folder / f"{prefix}{i:04d}.jpg"
        p.write_bytes(jpeg_bytes(photo(rng, h, w)))
        paths.append(p)
    return paths


def bad_input_catalogue(folder: Path) -> dict[str, str | None]:
    """Every awkward file of the issue's catalogue; maps file name to the expected error kind (None: tagged)."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    ok = photo(rng, 120, 160)
    good = jpeg_bytes(ok)
    files: dict[str, tuple[bytes, str | None]] = {
        "truncated.jpg": (good[: len(good) // 2], "decode"),
        "zero-byte.jpg": (b"", "empty"),
        "text-named.jpg": (b"this is not an image, just text\n" * 3, "decode"),
        "random-bytes.png": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "decode"),
        "name with spaces.jpg": (good, None),
        "ünïcødé-名前.jpg": (good, None),
    }
    buf = io.BytesIO()
    Image.new("L", (4000, 3000)).save(buf, "PNG")
    files["huge-pixels.png"] = (buf.getvalue(), "too_large")
    for name, img, fmt, kw in [
        ("sixteen-bit.png", Image.fromarray((np.arange(120 * 90).reshape(90, 120) * 6).astype(np.uint16)), "PNG", {}),
        ("palette.gif", Image.fromarray(ok).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "GIF",
         {"transparency": 0}),
        ("rgba.png", Image.fromarray(np.dstack([ok, np.full(ok.shape[:2], 128, np.uint8)]), "RGBA"), "PNG", {}),
        ("cmyk.jpg", Image.fromarray(ok).convert("CMYK"), "JPEG", {}),
        ("grey.jpg", Image.fromarray(ok).convert("L"), "JPEG", {}),
        ("one-bit.png", Image.fromarray(ok).convert("1"), "PNG", {}),
    ]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        files[name] = (buf.getvalue(), None)
    files["exif-rotated.jpg"] = (exif_rotated_jpeg(ok), None)
    files["animated.gif"] = (animated_gif(rng), None)
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: kind for name, (_, kind) in files.items()}


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def animated_gif(rng: np.random.Generator) -> bytes:
    frames = [Image.fromarray(photo(rng, 64, 80)).convert("P") for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()
