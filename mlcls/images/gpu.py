"""JPEG decoding on the GPU (nvJPEG through torchvision) for CUDA runs.

On a GPU box the CPU's job shrinks to reading bytes and peeking at JPEG
headers; decoding, resizing and cropping happen on the device, batched.
Anything nvJPEG should not take (see `mlcls.images.decode.plain_jpeg_size`)
or fails to decode goes through the CPU path (`decode_or_fallback`), which
also writes the error rows, so behaviour per image is the same either way.
Resizing uses torchvision's antialiased tensor resize, which
is close to, not bit-identical with, PIL's (see bench/RESULTS.md for drift).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mlcls.images.decode import Decoded
from mlcls.images.load import LoadConfig, decode_one
from mlcls.images.preprocess import Preprocess

warnings.filterwarnings("ignore", message=r".*TorchCodec.*")  # torchvision >= 0.29 marks decode_jpeg deprecated


class GpuJpegDecoder:
    """Batched nvJPEG decode, then the bundle's resize and crop on the device; uint8 (S, S, 3) out."""

    def __init__(self, pre: Preprocess, device: torch.device) -> None:
        self.pre = pre
        self.device = device
        self.interpolation = InterpolationMode(pre.interpolation)

    def decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """One tensor per input, or None where the GPU could not decode it (the caller falls back)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the whole batch: retry one by one
            images = []
            for t in tensors:
                try:
                    images.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
        return [None if img is None else self.resize_crop(img) for img in images]

    def decode_or_fallback(self, items: list[Decoded], cpu: LoadConfig) -> list[tuple[Decoded, torch.Tensor | None]]:
        """Each item (a `Decoded` holding JPEG bytes) with its (S, S, 3) pixels on the device.

        A JPEG nvJPEG cannot decode is decoded by the CPU path with `cpu`: it
        gets pixels (copied to the device) or its error row, as it would have
        without a GPU. The returned `Decoded` holds no bytes and no pixels.
        """
        out: list[tuple[Decoded, torch.Tensor | None]] = []
        for d, img in zip(items, self.decode([d.jpeg for d in items]), strict=True):
            if img is None:
                d = decode_one(d.jpeg, cpu)
                if d.pixels is not None:
                    img = torch.from_numpy(np.ascontiguousarray(d.pixels)).to(self.device)
                    d.pixels = None
            d.jpeg = None
            out.append((d, img))
        return out

    def resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 to (S, S, 3) uint8 with the bundle's resize and centre crop."""
        pre = self.pre
        if pre.resize_mode == "squash":
            out = TF.resize(img, [pre.size, pre.size], interpolation=self.interpolation, antialias=True)
        else:
            out = TF.center_crop(TF.resize(img, pre.resize_size, interpolation=self.interpolation, antialias=True),
                                 pre.size)
        return out.permute(1, 2, 0)
