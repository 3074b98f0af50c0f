"""A deterministic corpus of photo-like images for the benchmarks.

Sizes 320 to 1600 px on the long side, portrait and landscape, JPEG quality
75 to 95, about 15% PNG and 10% greyscale. The content is smooth colour
fields with texture, edges and noise, so JPEG decode costs what it costs on
photos (pure noise or flat colour would not). Built in parallel; rebuilt only
when missing.
"""

from __future__ import annotations

import os
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("mixed", "imagenet", "photos")  # mixed: 320-1600 px, some PNG and grey; imagenet: long side ~500 px
# JPEGs, ~110 KB; photos: a phone's 12 MP JPEGs (4032x3024), a few MB each
NOISE = {"mixed": (3, 10), "imagenet": (14, 22), "photos": (4, 8)}  # grain: what makes JPEGs as large as they are


def _image(seed: int, i: int, kind: str = "mixed") -> tuple[Image.Image, str, int]:
    rng = np.random.default_rng([seed, i])
    if kind == "imagenet":  # ImageNet's validation set: mostly 500x375 / 375x500 / 500x333, quality ~90-96
        long_side = 500
        aspect = float(rng.choice([0.75, 0.75, 0.75, 0.666, 0.8, 1.0, 0.6]))
    elif kind == "photos":
        long_side, aspect = 4032, 0.75
    else:
        long_side = int(rng.integers(320, 1601))
        aspect = float(rng.uniform(0.5, 1.0))
    w, h = (long_side, int(long_side * aspect)) if rng.random() < 0.7 else (int(long_side * aspect), long_side)
    low = rng.uniform(0, 255, (max(2, h // 64), max(2, w // 64), 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.03, 0.25) * long_side
        box = [x0 - r, y0 - r, x0 + r, y0 + r]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, rng.uniform(*NOISE[kind]), (h, w, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind in ("imagenet", "photos"):
        return img, "JPEG", int(rng.integers(90, 97) if kind == "imagenet" else rng.integers(85, 93))
    if rng.random() < 0.10:
        img = img.convert("L")
    fmt = "PNG" if rng.random() < 0.15 else "JPEG"
    return img, fmt, int(rng.integers(75, 96))


def _write(args: tuple[str, int, int, str]) -> str:
    folder, seed, i, kind = args
    for ext in ("jpg", "png"):  # already there: not generated again
        if os.path.exists(path := os.path.join(folder, f"{i:06d}.{ext}")):
            return path
    img, fmt, quality = _image(seed, i, kind)
    path = os.path.join(folder, f"{i:06d}.{'png' if fmt == 'PNG' else 'jpg'}")
    img.save(path + ".tmp", fmt, **({"quality": quality} if fmt == "JPEG" else {"compress_level": 1}))
    os.replace(path + ".tmp", path)
    return path


def build_corpus(folder: str, n: int, seed: int = 0, processes: int | None = None, kind: str = "mixed") -> list[str]:
    """Write (or reuse) `n` images of `kind` (see KINDS) under `folder`; return their paths in order."""
    os.makedirs(folder, exist_ok=True)
    with Pool(processes or os.cpu_count()) as pool:
        return pool.map(_write, [(folder, seed, i, kind) for i in range(n)], chunksize=8)


def shapes_corpus(folder: str, n: int, seed: int = 0) -> list[str]:
    """Demo-task images at photo sizes (for label agreement with a trained bundle)."""
    from mlcls.demo.build import DEMO_DATA
    from mlcls.demo.synth import SynthConfig, make_image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        size = int(rng.integers(320, 1201))
        img, _ = make_image(rng, SynthConfig(**{**DEMO_DATA.__dict__, "size": size}))
        path = os.path.join(folder, f"{i:05d}.jpg")
        if not os.path.exists(path):
            img.save(path, quality=int(rng.integers(75, 96)))
        paths.append(path)
    return paths
