"""JPEG decoding on the GPU for CUDA runs: nvImageCodec, batched, with torchvision's nvJPEG as fallback.

On a GPU box the CPU's job shrinks to reading bytes and peeking at JPEG
headers; decoding, resizing and cropping happen on the device, batched.
nvImageCodec (`pip install mlcls[gpu]`, imported lazily) drives the
A100/H100/H200 hardware JPEG engine and CUDA decoders over a whole batch,
and gives None for a file it cannot decode instead of failing the batch.
Where it is not installed, torchvision's `decode_jpeg(device="cuda")`
stands in (deprecated, and it fails a whole batch on one bad file).

Anything the GPU should not take (see `mlcls.images.decode.plain_jpeg_size`)
or fails to decode goes through the CPU path (`decode_or_fallback`), which
also writes the error rows, so behaviour per image is the same either way.
Images of the same size are resized as one call, and a batch is rounded as
one; torchvision's antialiased tensor resize is close to, not bit-identical
with, PIL's (bench/RESULTS.md).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mlcls.images.decode import Decoded
from mlcls.images.load import LoadConfig, decode_one
from mlcls.images.preprocess import Preprocess

warnings.filterwarnings("ignore", message=r".*TorchCodec.*")  # torchvision >= 0.29 marks decode_jpeg deprecated
log = logging.getLogger(__name__)

# The bundle interpolations torchvision's tensor resize can do, as the CPU path's PIL does them: PIL's
# nearest picks the pixel torch calls nearest-exact. Lanczos, box and hamming have no tensor resize
# (ValueError / NotImplementedError): bundles that ask for them decode on the CPU (`resizes_on_device`).
DEVICE_INTERPOLATION = {"nearest": InterpolationMode.NEAREST_EXACT, "bilinear": InterpolationMode.BILINEAR,
                        "bicubic": InterpolationMode.BICUBIC}


def resizes_on_device(pre: Preprocess) -> bool:
    """Whether the GPU path can resize as this bundle's preprocessing asks (else its images decode on the CPU)."""
    return pre.interpolation in DEVICE_INTERPOLATION


def nvimgcodec_decoder(device: torch.device) -> Any | None:
    """An nvImageCodec decoder on `device`, or None where the package is not installed or cannot decode
    JPEGs on the GPU (then torchvision's nvJPEG decoder stands in).

    On a CPU device it is nvImageCodec's CPU backend: the same calls,
    parameters and hand-over as on a GPU, which is how the tests run this
    path on machines without one.
    """
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    options = ":fancy_upsampling=1"  # the chroma interpolation libjpeg (and so PIL, the CPU path) uses
    if device.type != "cuda":
        cpu_only = getattr(nvimgcodec, "NVIMGCODEC_DEVICE_CPU_ONLY", None)
        return None if cpu_only is None else nvimgcodec.Decoder(
            device_id=cpu_only, options=options, backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
    if not decodes_jpeg_on_gpu(nvimgcodec, device):
        log.warning("nvImageCodec is installed but decodes no JPEG on %s (is libnvjpeg installed? "
                    "pip install 'mlcls[gpu]' brings nvidia-nvjpeg); using torchvision's nvJPEG decoder", device)
        return None
    return nvimgcodec.Decoder(device_id=device.index or 0, options=options)


def decodes_jpeg_on_gpu(nvimgcodec: Any, device: torch.device) -> bool:
    """Whether nvImageCodec decodes a small JPEG with one of its GPU backends.

    Without libnvjpeg (a separate wheel) nvImageCodec registers no GPU JPEG
    decoder, prints an error at import, and then decodes every JPEG with its
    CPU backend, in the thread that feeds the GPU: correct pixels at a
    fraction of the speed, and nothing a caller sees. A decoder limited to
    the GPU backends returns None for the probe instead.
    """
    kinds = [nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY,
             nvimgcodec.BackendKind.HYBRID_CPU_GPU]
    try:
        probe = nvimgcodec.Decoder(device_id=device.index or 0, backends=[nvimgcodec.Backend(k) for k in kinds])
        return probe.decode([probe_jpeg()])[0] is not None
    except Exception as err:  # noqa: BLE001 - any failure means the same: no GPU JPEG decode here
        log.debug("nvImageCodec GPU probe failed: %s", err)
        return False


def _rgb(nvimgcodec: Any) -> Any:
    """Interleaved RGB output: `ColorSpec.SRGB` in nvImageCodec 0.9, `ColorSpec.RGB` in 0.6."""
    return getattr(nvimgcodec.ColorSpec, "SRGB", None) or nvimgcodec.ColorSpec.RGB


def _as_tensor(img: Any, nvimgcodec: Any) -> torch.Tensor:
    """A decoded nvImageCodec image as a tensor without a copy.

    Device images go through DLPack. The CPU backend's images (a CPU device)
    go through the array interface: their DLPack export asks the CUDA
    runtime, which a machine without a GPU does not have.
    """
    if img.buffer_kind == nvimgcodec.ImageBufferKind.STRIDED_HOST:
        return torch.from_numpy(np.asarray(img))
    return torch.from_dlpack(img)


def probe_jpeg(side: int = 64) -> bytes:
    """A small baseline JPEG (4:2:0, what the GPU decoders take) made in memory."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 80, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class GpuJpegDecoder:
    """Batched JPEG decode on the device, then the bundle's resize and crop; uint8 (S, S, 3) out."""

    def __init__(self, pre: Preprocess, device: torch.device, *, backend: str = "auto") -> None:
        self.pre = pre
        self.device = device
        if not resizes_on_device(pre):
            raise ValueError(f"{pre.interpolation} resize has no GPU implementation: decode on the CPU")
        self.interpolation = DEVICE_INTERPOLATION[pre.interpolation]
        self._nv = nvimgcodec_decoder(device) if backend in ("auto", "nvimgcodec") else None
        if backend == "nvimgcodec" and self._nv is None:
            raise ImportError("nvImageCodec is not installed, or cannot decode JPEGs on this GPU: "
                              "pip install 'mlcls[gpu]'")
        self.backend = "nvimgcodec" if self._nv is not None else "torchvision"
        self._first = FirstWarning()
        self._nv_failing = BatchFailures(self._first)
        self._sits_out = False  # this batch skips nvImageCodec (`next_batch`)
        log.info("GPU JPEG decode on %s with %s", device, self.backend)

    def decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """One (S, S, 3) tensor per input, or None where the GPU could not decode it (the caller falls back).

        On CUDA the host first waits for the work queued on the current stream
        (the last batch's stacks and resizes; the model runs on its own
        streams): nvJPEG's hardware engine writes its outputs before queued
        work has run (meta-pytorch/torchcodec#1634, H100) and torchvision's
        decoder does not wait for the caller's stream (pytorch/vision#9606),
        so either could overwrite freed memory the last resize still reads.
        """
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        images = self._decode_nvimgcodec_or_none(datas) if self._nv is not None else self._decode_torchvision(datas)
        return self.resize_crop_batch(images)

    def next_batch(self) -> None:
        """Count one batch handed to the device, JPEGs in it or not: a rest lasts that many batches even
        when the decode workers, told by `wants_jpegs`, send none meanwhile. The loader calls it once a
        batch; a caller that never does (a one-off `decode`) never rests the decoder."""
        self._sits_out = self._nv is not None and self._nv_failing.resting()

    def wants_jpegs(self) -> bool:
        """Whether decode workers should leave plain JPEGs as bytes for this decoder now: not while
        nvImageCodec rests, so that the worker pool, not the thread that feeds the device, decodes them."""
        return self._nv is None or not self._nv_failing.rests

    def _decode_nvimgcodec_or_none(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """nvImageCodec's images, or all None (the CPU path) where it fails the batch or this batch sits out."""
        if self._sits_out:
            return [None] * len(datas)
        try:
            images = self._decode_nvimgcodec(datas)
        except Exception as err:  # noqa: BLE001 - a library error fails none of the images: all take the CPU path
            self._nv_failing.failed(len(datas), err)
            return [None] * len(datas)
        self._nv_failing.succeeded()
        return images

    def _decode_nvimgcodec(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        from nvidia import nvimgcodec

        params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=_rgb(nvimgcodec))
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        decoded = self._nv.decode(datas, params=params, cuda_stream=stream)
        out: list[torch.Tensor | None] = []
        for img in decoded:  # (H, W, 3) uint8 on the device, shared through DLPack, ordered on `stream`
            t = None if img is None else _as_tensor(img, nvimgcodec)
            out.append(t.permute(2, 0, 1) if t is not None and t.ndim == 3 and t.shape[2] == 3 else None)
        return out

    def _decode_torchvision(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the whole batch: retry one by one
            images: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    images.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
            return images

    def resize_crop_batch(self, images: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 images to (S, S, 3) uint8, the same pixels as `resize_crop` one by one.

        Images that share a size are resized as one call. A mixed-size batch
        (a photo collection: about one size an image) costs two kernels an
        image here (to float, resize) and one rounding pass for the whole
        batch, against five an image through `resize_crop` (stack, to
        float, resize, round, cast): on a GPU the feeding thread's launches,
        not the device, bound such batches. Results are bit-identical:
        rounding and the cast commute with the crop and the stack.
        """
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            if img is not None:
                groups[tuple(img.shape)].append(i)
        done: list[int] = []
        parts: list[torch.Tensor] = []
        for shape, idx in groups.items():
            try:
                src = images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])  # type: ignore[index,misc]
                parts.append(self._resample(src.float()))
            except torch.OutOfMemoryError:  # these take the CPU path; the model's batch halves on its own OOM
                self._say_short_of_memory(f"resizing {len(idx)} image(s) of {shape[1]}x{shape[2]} px")
                continue
            except RuntimeError as err:  # a scale the antialiased CUDA kernel refuses: these take the CPU path
                log.debug("GPU resize refused %d image(s) of shape %s: %s", len(idx), shape, err)
                continue
            done.extend(idx)
        out: list[torch.Tensor | None] = [None] * len(images)
        for i, img in zip(done, self._finish(parts), strict=True):
            out[i] = img
        return out

    def _finish(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The resampled float parts as (S, S, 3) uint8 images: rounded as one batch, or part by part where
        the batch's copy does not fit in the device's memory."""
        if not parts:
            return []
        try:
            return list(_to_uint8(torch.cat(parts) if len(parts) > 1 else parts[0]).movedim(-3, -1))
        except torch.OutOfMemoryError:
            self._say_short_of_memory(f"rounding a batch of {sum(len(p) for p in parts)} resized images")
            return [img for p in parts for img in _to_uint8(p).movedim(-3, -1)]

    def _say_short_of_memory(self, doing: str) -> None:
        log.log(self._first.level("out of memory"), "out of memory on %s %s: carrying on (such images decode on "
                "the CPU, or round in parts; said once)", self.device, doing)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
                    img = torch.from_numpy(np.array(d.pixels, order="C")).to(self.device)  # own, writable copy
                    d.pixels = None
            d.jpeg = None
            out.append((d, img))
        return out

    def resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        """(3, H, W) or (N, 3, H, W) uint8 to (S, S, 3) or (N, S, S, 3) with the bundle's resize and crop."""
        batched = img.ndim == 4
        out = _to_uint8(self._resample((img if batched else img[None]).float())).movedim(-3, -1)
        return out if batched else out[0]

    def _resample(self, img: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float to (N, 3, S, S) float, unrounded: the bundle's antialiased resize, then its crop."""
        pre = self.pre
        if pre.resize_mode == "squash":
            return TF.resize(img, [pre.size, pre.size], interpolation=self.interpolation, antialias=True)
        return TF.center_crop(TF.resize(img, pre.resize_size, interpolation=self.interpolation, antialias=True),
                              pre.size)


class FirstWarning:
    """The log level for a kind of trouble: warning the first time it is said, debug after. A run short
    of device memory, or beside a faulty decoder, would otherwise say it every batch."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def level(self, kind: str) -> int:
        first = kind not in self._said
        self._said.add(kind)
        return logging.WARNING if first else logging.DEBUG


class BatchFailures:
    """When nvImageCodec fails whole batches (a library or driver fault, not a bad file: those come back
    as None one by one), what to say and when to stop asking it.

    The first failure and the first rest are said at warning level, later ones at debug: a run
    that fails every batch would otherwise say it a million times. After
    `give_up` failures in a row the decoder rests for `rest` batches (the
    decode workers decode their JPEGs meanwhile, `GpuJpegDecoder.wants_jpegs`)
    and then tries one again. A failed retry doubles the next rest, up to
    `longest`; a success brings it back to `rest`. So a fault that passes
    (memory short for a moment) costs a few batches, and one that stays costs
    a retry ever more rarely: each retry also sends the batches already in
    flight with JPEG bytes through the CPU path in the thread that feeds the
    device, the slow place to decode.
    """

    def __init__(self, first: FirstWarning, give_up: int = 3, rest: int = 64, longest: int = 4096) -> None:
        self.give_up, self.rest, self.longest, self._first = give_up, rest, longest, first
        self.in_row = self.total = self.resting_left = 0
        self._next_rest = rest

    @property
    def rests(self) -> bool:
        """Whether the decoder is resting now (counts nothing)."""
        return self.resting_left > 0

    def resting(self) -> bool:
        """Whether to skip the GPU decoder for this batch (counts the batch down)."""
        if self.resting_left:
            self.resting_left -= 1
            return True
        return False

    def failed(self, size: int, err: Exception) -> None:
        """Count a failed batch of `size`; say so (see the class) and rest after `give_up` in a row."""
        self.in_row += 1
        self.total += 1
        log.log(self._first.level("nvImageCodec failed"), "nvImageCodec failed a batch of %d JPEGs (%s): "
                "decoding them on the CPU", size, err)
        if self.in_row >= self.give_up:
            log.log(self._first.level("nvImageCodec rests"), "nvImageCodec failed %d batches in a row (%d in all): "
                    "the next %d batches decode on the CPU, then it is tried again", self.in_row, self.total,
                    self._next_rest)
            self.resting_left = self._next_rest
            self._next_rest = min(self.longest, 2 * self._next_rest)

    def succeeded(self) -> None:
        """A batch decoded: the next failure starts a new row, and a rest is `rest` batches again."""
        self.in_row = 0
        self._next_rest = self.rest


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Resampled float pixels to uint8 as torchvision's uint8 resize ends: round, and clamp where bicubic
    overshoots (a no-op for bilinear and nearest, whose outputs stay within [0, 255])."""
    return img.round_().clamp_(0, 255).to(torch.uint8)
