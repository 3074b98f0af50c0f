"""Generated multi-label images: coloured shapes on cluttered backgrounds.

A true multi-label task that needs no download: each image holds zero or
more shapes (some images none at all), the label set is the set of shape
kinds present. Deterministic from a seed, so the demo model, the tests and
the training benchmarks rebuild exactly.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]
Drawer = Callable[[Image.Image, Point, float, float, tuple[int, int, int]], None]


def _polygon(n: int, star: bool = False) -> Drawer:
    def draw(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
        points = []
        steps = n * 2 if star else n
        for i in range(steps):
            radius = r if (not star or i % 2 == 0) else r * 0.45
            a = angle + 2 * math.pi * i / steps
            points.append((c[0] + radius * math.cos(a), c[1] + radius * math.sin(a)))
        ImageDraw.Draw(img).polygon(points, fill=color)

    return draw


def _circle(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
    ImageDraw.Draw(img).ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=color)


def _ring(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
    ImageDraw.Draw(img).ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=color, width=max(2, int(r * 0.3)))


def _cross(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
    w = max(2, int(r * 0.45))
    d = ImageDraw.Draw(img)
    for a in (angle, angle + math.pi / 2):
        dx, dy = r * math.cos(a), r * math.sin(a)
        d.line([(c[0] - dx, c[1] - dy), (c[0] + dx, c[1] + dy)], fill=color, width=w)


def _ellipse(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
    a = [(c[0] + r * math.cos(t) * math.cos(angle) - 0.45 * r * math.sin(t) * math.sin(angle),
          c[1] + r * math.cos(t) * math.sin(angle) + 0.45 * r * math.sin(t) * math.cos(angle))
         for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    ImageDraw.Draw(img).polygon(a, fill=color)


def _crescent(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
    outer = [(c[0] + r * math.cos(t), c[1] + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40)]
    off = (c[0] + 0.5 * r * math.cos(angle), c[1] + 0.5 * r * math.sin(angle))
    mask = Image.new("L", img.size, 0)
    md = ImageDraw.Draw(mask)
    md.polygon(outer, fill=255)
    md.ellipse([off[0] - 0.8 * r, off[1] - 0.8 * r, off[0] + 0.8 * r, off[1] + 0.8 * r], fill=0)
    img.paste(Image.new("RGB", img.size, color), (0, 0), mask)


def _arrow(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
    pts = [(-1, -0.2), (0.2, -0.2), (0.2, -0.55), (1, 0), (0.2, 0.55), (0.2, 0.2), (-1, 0.2)]
    ca, sa = math.cos(angle), math.sin(angle)
    ImageDraw.Draw(img).polygon([(c[0] + r * (x * ca - y * sa), c[1] + r * (x * sa + y * ca)) for x, y in pts],
                                fill=color)


def _diamond(img: Image.Image, c: Point, r: float, angle: float, color: tuple[int, int, int]) -> None:
    pts = [(1, 0), (0, 0.55), (-1, 0), (0, -0.55)]
    ca, sa = math.cos(angle), math.sin(angle)
    ImageDraw.Draw(img).polygon([(c[0] + r * (x * ca - y * sa), c[1] + r * (x * sa + y * ca)) for x, y in pts],
                                fill=color)


SHAPES: dict[str, Drawer] = {
    "circle": _circle,
    "square": _polygon(4),
    "triangle": _polygon(3),
    "star": _polygon(5, star=True),
    "cross": _cross,
    "ring": _ring,
    "hexagon": _polygon(6),
    "pentagon": _polygon(5),
    "ellipse": _ellipse,
    "crescent": _crescent,
    "arrow": _arrow,
    "diamond": _diamond,
}
DEMO_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")


@dataclass(frozen=True)
class SynthConfig:
    """How hard the generated task is."""

    size: int = 160
    classes: tuple[str, ...] = DEMO_CLASSES
    max_objects: int = 3
    p_empty: float = 0.2
    clutter: int = 4
    min_radius: float = 0.09
    max_radius: float = 0.2
    min_contrast: float = 120.0
    p_blur: float = 0.5
    distractors: int = 0  # up to this many shape-like blobs that are no class (0: none, as the demo)


HARD = SynthConfig(size=128, classes=tuple(SHAPES), max_objects=4, p_empty=0.2, clutter=8, distractors=3,
                   min_radius=0.1, max_radius=0.22, min_contrast=90.0, p_blur=0.3)
"""The quality benchmark's task: all 12 shapes, up to 4 per image (they overlap), lines and shape-like
blobs as clutter, lower contrast, 20 % of images with no shape at all."""


def make_image(rng: np.random.Generator, cfg: SynthConfig) -> tuple[Image.Image, list[str]]:
    """One image and the sorted list of shape kinds it shows."""
    s = cfg.size
    img, mean_color = _background(rng, s)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, cfg.clutter + 1))):  # distractors: thin lines and specks
        pts = [tuple(rng.uniform(0, s, 2)) for _ in range(2)]
        d.line(pts, fill=_color(rng), width=1)
    if cfg.distractors:  # drawn only when asked for, so other configurations keep their random stream
        for _ in range(int(rng.integers(0, cfg.distractors + 1))):
            _blob(img, rng, s, cfg, mean_color)
    n = 0 if rng.random() < cfg.p_empty else int(rng.integers(1, cfg.max_objects + 1))
    kinds = [cfg.classes[int(i)] for i in rng.integers(0, len(cfg.classes), n)]
    for kind in kinds:
        r = rng.uniform(cfg.min_radius, cfg.max_radius) * s
        margin = r + 0.06 * s
        center = (rng.uniform(margin, s - margin), rng.uniform(margin, s - margin))
        color = _color(rng, mean_color, cfg.min_contrast)
        SHAPES[kind](img, center, r, rng.uniform(0, 2 * math.pi), color)
    if rng.random() < cfg.p_blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 1.0))))
    return img, sorted(set(kinds))


def _blob(img: Image.Image, rng: np.random.Generator, s: int, cfg: SynthConfig, mean_color: np.ndarray) -> None:
    """A filled irregular polygon the size of a shape: clutter that a model must learn is not a class."""
    r = rng.uniform(cfg.min_radius, cfg.max_radius) * s
    c = rng.uniform(r, s - r, 2)
    k = int(rng.integers(7, 12))
    angles = np.sort(rng.uniform(0, 2 * math.pi, k))
    radii = r * rng.uniform(0.35, 1.0, k)
    points = [(float(c[0] + q * math.cos(a)), float(c[1] + q * math.sin(a)))
              for a, q in zip(angles, radii, strict=True)]
    ImageDraw.Draw(img).polygon(points, fill=_color(rng, mean_color, cfg.min_contrast * 0.6))


def _background(rng: np.random.Generator, s: int) -> tuple[Image.Image, np.ndarray]:
    """A noisy gradient, and its mean colour (shapes keep their distance from it)."""
    base = rng.integers(0, 256, 3)
    grad = np.linspace(0, 1, s)[:, None, None] * rng.integers(-60, 60, 3)
    noise = rng.normal(0, rng.uniform(2, 14), (s, s, 3))
    arr = np.clip(base + grad + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB"), arr.reshape(-1, 3).mean(0)


def _color(rng: np.random.Generator, away_from: np.ndarray | None = None,
           min_distance: float = 0.0) -> tuple[int, int, int]:
    """A random colour, at least `min_distance` (sum of channel differences) from `away_from`."""
    while True:
        c = rng.integers(0, 256, 3)
        if away_from is None or np.abs(c - away_from).sum() >= min_distance:
            return tuple(int(v) for v in c)  # type: ignore[return-value]


def make_dataset(n: int, seed: int, cfg: SynthConfig = SynthConfig()) -> list[tuple[Image.Image, list[str]]]:
    rng = np.random.default_rng(seed)
    return [make_image(rng, cfg) for _ in range(n)]


def write_dataset(folder: str, n: int, seed: int, cfg: SynthConfig = SynthConfig(), *, val_fraction: float = 0.0,
                  fmt: str = "JPEG") -> str:
    """Write `n` images and a fastai-style `labels.csv` (image, labels, is_valid); return the CSV path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    rows = []
    for i in range(n):
        img, labels = make_image(rng, cfg)
        name = f"images/{i:06d}{ext}"
        img.save(os.path.join(folder, name), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        rows.append((name, " ".join(labels), int(i >= n * (1 - val_fraction)) if val_fraction else 0))
    path = os.path.join(folder, "labels.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels", "is_valid"])
        w.writerows(rows)
    return path
