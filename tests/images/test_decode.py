"""Decoding: every awkward file becomes pixels or a clear error, and pixels match torchvision."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mlcls.errors import BundleError
from mlcls.images.decode import open_rgb, prepare, to_rgb
from mlcls.images.preprocess import DRAFT_MARGIN, Preprocess, resize_crop
from tests.helpers.images import animated_gif, bad_input_catalogue, exif_rotated_jpeg, jpeg_bytes, photo

PRE = Preprocess(size=64, resize_size=72)


def test_catalogue_each_file_is_pixels_or_a_named_error(tmp_path):
    expected = bad_input_catalogue(tmp_path)
    for name, kind in expected.items():
        d = prepare((tmp_path / name).read_bytes(), PRE, max_pixels=10_000_000)
        if kind is None:
            assert d.error is None, (name, d.error)
            assert d.pixels.shape == (64, 64, 3) and d.pixels.dtype == np.uint8
            assert d.width > 0 and d.height > 0
        else:
            assert d.pixels is None and d.width is None, name
            assert d.error.startswith(f"{kind}: "), (name, d.error)


def test_error_messages_say_why():
    good = jpeg_bytes(photo(np.random.default_rng(0), 80, 80))
    assert "truncated" in prepare(good[: len(good) // 2], PRE).error
    assert prepare(b"", PRE).error == "empty: the file is empty (0 bytes)"
    big = io.BytesIO()
    Image.new("L", (3000, 2000)).save(big, "PNG")
    err = prepare(big.getvalue(), PRE, max_pixels=1_000_000).error
    assert err.startswith("too_large: 3000x2000 is 6,000,000 pixels, over the limit of 1,000,000")


def test_exif_orientation_is_applied_and_reported_upright():
    rng = np.random.default_rng(1)
    arr = photo(rng, 60, 100)  # stored landscape, orientation 6 = rotate 90° clockwise to display
    img, (w, h) = open_rgb(exif_rotated_jpeg(arr))
    assert (w, h) == (60, 100) and img.size == (60, 100)
    plain, _ = open_rgb(jpeg_bytes(arr, quality=95))
    expected = np.asarray(plain.transpose(Image.Transpose.ROTATE_270))
    assert np.abs(np.asarray(img).astype(int) - expected).mean() < 1.0


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    img, _ = open_rgb(buf.getvalue())
    out = np.asarray(img)[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert abs(int(out[32, 32]) - int(arr[32, 32]) // 257) <= 1


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((5, 5)) == (255, 255, 255)
    opaque = Image.new("RGBA", (10, 10), (0, 0, 255, 255))
    assert to_rgb(opaque).getpixel((5, 5)) == (0, 0, 255)


def test_animated_gif_uses_first_frame():
    data = animated_gif(np.random.default_rng(3))
    img, size = open_rgb(data)
    first = Image.open(io.BytesIO(data))
    first.seek(0)
    assert size == first.size
    assert np.array_equal(np.asarray(img), np.asarray(first.convert("RGB")))


@pytest.mark.parametrize("mode", ["shorter", "squash"])
def test_pixels_match_torchvision_transforms(mode):
    """Without draft mode, our pixels are torchvision's Resize/CenterCrop on PIL, exactly."""
    pre = Preprocess(size=48, resize_size=56, resize_mode=mode, interpolation="bicubic")
    data = jpeg_bytes(photo(np.random.default_rng(4), 150, 230))
    ours = prepare(data, pre, draft=False).pixels
    if mode == "shorter":
        tf = T.Compose([T.Resize(56, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(48)])
    else:
        tf = T.Resize((48, 48), interpolation=T.InterpolationMode.BICUBIC)
    theirs = np.asarray(tf(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.array_equal(ours, theirs)


def test_draft_decodes_large_jpeg_smaller_and_close():
    arr = photo(np.random.default_rng(5), 1200, 1600)
    data = jpeg_bytes(arr)
    pre = Preprocess(size=224, resize_size=256)
    img, size = open_rgb(data, draft=pre.draft_request)
    assert size == (1600, 1200)  # the reported size is the original
    assert img.size == (800, 600)  # decoded at 1/2 scale, still >= DRAFT_MARGIN x the 256 resize side
    full = prepare(data, pre, draft=False).pixels.astype(int)
    drafted = prepare(data, pre, draft=True).pixels.astype(int)
    assert np.abs(full - drafted).mean() < 3.0


def test_draft_never_goes_below_the_resize_size():
    pre = Preprocess(size=224, resize_size=256)
    data = jpeg_bytes(photo(np.random.default_rng(6), 520, 700))
    img, _ = open_rgb(data, draft=pre.draft_request)
    assert min(img.size) >= 256 * DRAFT_MARGIN


def test_preprocess_validation_and_round_trip():
    with pytest.raises(BundleError, match="resize_mode"):
        Preprocess(resize_mode="stretch")
    with pytest.raises(BundleError, match="std must be positive"):
        Preprocess(std=(0.2, 0.0, 0.2))
    with pytest.raises(BundleError, match="unknown keys"):
        Preprocess.from_dict({"size": 10, "resize_size": 12, "colour": 1})
    pre = Preprocess(size=100, resize_size=120, interpolation="bicubic", mean=(0.5, 0.5, 0.5))
    assert Preprocess.from_dict(pre.to_dict()) == pre


def test_normalisation_matches_to_tensor_and_normalize():
    from mlcls.tag.engine import Normaliser

    pre = Preprocess(size=32, resize_size=32)
    pixels = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    ours = Normaliser(pre, torch.device("cpu"))(pixels)
    norm = T.Normalize(pre.mean, pre.std)
    theirs = torch.stack([norm(T.functional.to_tensor(p.numpy())) for p in pixels])
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("size", [(230, 150), (150, 230), (513, 384), (300, 300)])
def test_fast_resize_is_the_centre_crop_within_one_level(size):
    """The fast mode resamples only the crop's window: the same image as resize-then-crop, to one level."""
    pre = Preprocess(size=48, resize_size=56)
    img = Image.fromarray(photo(np.random.default_rng(11), size[1], size[0]))
    exact = np.asarray(resize_crop(img, pre)).astype(int)
    fast = np.asarray(resize_crop(img, pre, fast=True)).astype(int)
    assert fast.shape == exact.shape == (48, 48, 3)
    assert np.abs(fast - exact).max() <= 1
    assert (fast != exact).mean() < 0.05

