"""Training augmentation as tensors on the device, made so that every label stays true.

Multi-label images can hold a labelled object anywhere, edges included: a
random crop can cut it out while its label stays, teaching the model to
call an absent object present. So nothing here removes image content:
the whole frame is kept, mildly shrunk (zoom out, never in), shifted inside
the slack that leaves, flipped where asked, and jittered in brightness and contrast.
All geometry is one `grid_sample` per batch (reflection padding fills the
margin), so a CPU spends its time on the model, not on a Python loop.

Pixels are decoded once (`mlcls.train.image_cache`) and stored as squares
of `stored` px; the model sees `size` px. With the `squash` resize mode the
two are equal; with `shorter` the model's input is the centre `size`
square, exactly what tagging crops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Augment:
    """Shrink-and-shift, flips and brightness/contrast jitter of a normalised (N, 3, H, W) batch.

    `scale` is the range of the content's side as a share of the frame
    (at most 1: zooming in would crop); `jitter` the largest relative
    change of brightness and of contrast.
    """

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.85, 1.0), hflip: bool = False,
                 vflip: bool = False, jitter: float = 0.1) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be within (0, 1], not {scale}")
        self.size, self.scale, self.hflip, self.vflip, self.jitter = size, scale, hflip, vflip, jitter

    def __call__(self, x: torch.Tensor, gen: torch.Generator, size: int | None = None) -> torch.Tensor:
        """The augmented batch at `size` px (default: the model's size) showing the same view of each image."""
        n, side = x.shape[0], x.shape[-1]
        out_size = size or self.size
        u = torch.rand(n, 7, generator=gen)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        base = self.size / side  # the model's view as a share of the stored square (1 for squash)
        shift_x, shift_y = (2 * u[:, 1] - 1) * (1 - s), (2 * u[:, 2] - 1) * (1 - s)
        fx = torch.where(u[:, 3] < 0.5, -1.0, 1.0) if self.hflip else torch.ones(n)
        fy = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if self.vflip else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = base * fx / s, -base * shift_x / s
        theta[:, 1, 1], theta[:, 1, 2] = base * fy / s, -base * shift_y / s
        grid = F.affine_grid(theta.to(x.device), [n, 3, out_size, out_size], align_corners=False)
        x = shrink(x, round(side * out_size / self.size))  # antialiased first: grid_sample alone would alias
        out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
        return self._colour(out, u[:, 5], u[:, 6])

    def _colour(self, x: torch.Tensor, ub: torch.Tensor, uc: torch.Tensor) -> torch.Tensor:
        """Contrast about each image's mean, then brightness, both within ±`jitter` (in normalised units)."""
        if self.jitter <= 0:
            return x
        shape = (-1, 1, 1, 1)
        contrast = (1 + self.jitter * (2 * uc - 1)).to(x.device, x.dtype).view(shape)
        brightness = (self.jitter * (2 * ub - 1) / 0.226).to(x.device, x.dtype).view(shape)  # 0.226: ImageNet's std
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * contrast + mean + brightness


def centre(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` square of an (N, 3, H, W) batch (the whole batch when it is that size already)."""
    h, w = x.shape[2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top:top + size, left:left + size]


def shrink(x: torch.Tensor, side: int) -> torch.Tensor:
    """An (N, 3, H, W) batch resized to `side` px square with antialiasing (unchanged if it is that size)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
