"""Shared fixtures: generated images, small bundles, a real S3 server, a real Prefect API."""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


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


def write_images(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """`n` small seeded JPEGs of varied sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init mobilenet_v3_small bundle at 64 px, 4 classes: fast to load and run."""
    import torch
    import torchvision

    from mlcls.bundle import save_bundle
    from mlcls.images.preprocess import Preprocess

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=4)
    save_bundle(str(out), name="tiny", arch="mobilenet_v3_small", classes=["cat", "dog", "boat", "sky blue"],
                thresholds=[0.5, 0.45, 0.55, 0.5], state_dict=model.state_dict(),
                preprocess=Preprocess(size=64, resize_size=72))
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-protocol server (moto's server mode) on 127.0.0.1; s3fs reaches it via AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3(s3_server: str):
    """An s3fs filesystem on the moto server with fresh buckets per test."""
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    suffix = uuid.uuid4().hex[:8]
    buckets = {"src": f"src-{suffix}", "out": f"out-{suffix}", "models": f"models-{suffix}"}
    for b in buckets.values():
        fs.mkdir(b)
    fs.buckets = buckets  # type: ignore[attr-defined]
    yield fs
    fs.invalidate_cache()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (temporary SQLite database and server) for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
