"""Batched multi-label inference on one device.

An `Engine` holds a bundle's model on a device and turns a batch of uint8
pixels into per-class probabilities: normalise on the device, channels-last,
autocast on CUDA, sigmoid. `get_engine` builds one per process and bundle, so a run of many
shards pays model load and warm-up once.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from mlcls.bundle import Bundle
from mlcls.errors import OptionError
from mlcls.images.preprocess import Preprocess

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`; a clear error otherwise."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise OptionError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    raise OptionError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` is bf16/fp16 on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Normaliser:
    """(N, H, W, 3) uint8 batches to normalised (N, 3, H, W) float32 on `device`.

    Normalising on the device moves uint8 over the bus (a quarter of the
    bytes of float32), and permuting NHWC gives channels-last NCHW without a copy.
    """

    def __init__(self, pre: Preprocess, device: torch.device) -> None:
        mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale, self.shift, self.device = 1.0 / (255.0 * std), -mean / std, device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return x * self.scale + self.shift


class Engine:
    """A bundle's model on a device: uint8 batches in, probabilities out."""

    def __init__(self, bundle: Bundle, device: torch.device, *, precision: str = "auto",
                 channels_last: bool = True, compile: bool = False, batch_size: int | None = None) -> None:
        self.bundle = bundle
        self.device = device
        self.pad_to = batch_size if compile else None
        self.amp_dtype = resolve_precision(precision, device)
        model = bundle.build_model().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model, dynamic=batch_size is None) if compile else model
        self.normalise = Normaliser(bundle.preprocess, device)
        self.thresholds = np.asarray(bundle.thresholds, dtype=np.float32)
        self._lock = threading.Lock()

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        if self.pad_to and n < self.pad_to:  # one shape for the compiled graph: pad, then drop the padding
            pad = torch.zeros((self.pad_to - n, *pixels.shape[1:]), dtype=pixels.dtype, device=pixels.device)
            pixels = torch.cat([pixels, pad])
        x = self.normalise(pixels)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.model(x)[:n].float()

    def probs(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, H, W, 3) uint8 to (N, C) float32 probabilities (sigmoid, one per class)."""
        if pixels.shape[0] == 0:
            return np.zeros((0, len(self.bundle.classes)), dtype=np.float32)
        with self._lock:  # one forward at a time per model: two threads would only fight
            out = torch.sigmoid(self.logits(pixels))
        return out.cpu().numpy()

    def labels(self, probs: np.ndarray) -> list[list[str]]:
        """Label sets by per-class thresholds; an empty set is a valid answer."""
        classes = self.bundle.classes
        return [[classes[j] for j in np.flatnonzero(row)] for row in probs >= self.thresholds]


def get_engine(bundle: Bundle, device: str = "auto", **options: Any) -> Engine:
    """The process-wide engine for this bundle, device and options (built on first use)."""
    resolved = resolve_device(device)
    key = (bundle.digest, str(resolved), tuple(sorted(options.items())))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = Engine(bundle, resolved, **options)
        return engine


def clear_engines() -> None:
    """Drop cached engines (tests, or a long-lived process switching models)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()
