"""Training augmentation as tensors on the device: random resized crop and flips in one resample.

Pixels are decoded once (`mlcls.train.image_cache`) and stored as squares a little
larger than the model input; each batch is cropped, flipped and resampled
by one `grid_sample` call, so a CPU spends its time on the model rather than
on a Python loop of crops, and a GPU does it all without a host round trip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Augment:
    """Random resized crop and flips of a normalised (N, 3, H, W) batch, as one batched resample.

    Each image gets a crop of `scale` of its area and aspect ratio in
    `ratio`, placed at random, flipped by negating the sampling grid, and
    resampled (bilinear) to `size`: one `grid_sample` call on the device
    instead of a Python loop of crops on the CPU.
    """

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), vflip: bool = False) -> None:
        self.size, self.scale, self.vflip = size, scale, vflip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        u = torch.rand(n, 6, generator=gen)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        ratio = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[:, 1])
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width and height as fractions of the side
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)
        fx = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        fy = torch.where(u[:, 5] < 0.5, -1.0, 1.0) if self.vflip else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * fx, cx
        theta[:, 1, 1], theta[:, 1, 2] = h * fy, cy
        grid = F.affine_grid(theta.to(x.device), [n, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def centre(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` square of an (N, 3, H, W) batch."""
    h, w = x.shape[2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top:top + size, left:left + size]
