"""Batched multi-label inference on one device.

An `Engine` holds a bundle's model on a device and turns a batch of uint8
pixels into per-class probabilities: normalise on the device, autocast where
the hardware computes bf16 natively, sigmoid on the device. `get_engine`
builds one per process and bundle, so a run of many shards pays model load
and warm-up once.

`submit` returns before the batch is done on CUDA (copies and forward are
queued on their own streams, ordered with events), so the caller can prepare
the next batch while the device works; `Pending.result` waits. On the CPU
there is nothing to overlap with inside one process, and it runs at once.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlcls.allocator import keep_freed_memory
from mlcls.bundle import Bundle
from mlcls.errors import OptionError
from mlcls.images.preprocess import Preprocess
from mlcls.tag.threads import Split

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matmuls; elsewhere bf16 autocast is ~10x slower
log = logging.getLogger(__name__)
_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`; a clear error otherwise."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise OptionError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        # an explicit index: the engine's streams, nvImageCodec's device and the cache keys name the same GPU
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    raise OptionError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX-512 BF16), read from /proc/cpuinfo's flags.

    Checked at run time, not at install: the same wheel runs on machines
    with and without these units, and on those without, bf16 is emulated
    and much slower than fp32 (bench/RESULTS.md).
    """
    flags = cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text, or "" where there is none (macOS, some containers)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> list[str]:
    """The first CPU's feature flags in /proc/cpuinfo's text (`flags` on x86, `Features` on Arm)."""
    return next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                 if line.startswith(("flags", "Features")) and ":" in line), [])


def resolve_precision(precision: str, device: torch.device, cpuinfo: str | None = None) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` is bf16 (fp16 where bf16 is missing) on CUDA, bf16 on a CPU with
    native bf16 (`cpu_has_fast_bf16`) and fp32 on other CPUs. bf16 keeps
    >= 99.5% of label decisions of fp32 on the drift check (bench/RESULTS.md).
    """
    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto" and device.type != "cuda":
        return torch.bfloat16 if cpu_has_fast_bf16(cpuinfo) else None
    if precision == "fp32":
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


class Pending:
    """A submitted batch's probabilities; `result` waits for the device only when they are needed."""

    def __init__(self, probs: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        self._probs, self._done = probs, done

    def result(self) -> np.ndarray:
        """(N, C) float32 probabilities on the host."""
        if self._done is not None:
            self._done.synchronize()
        return self._probs.numpy()


class _Parts(Pending):
    """A batch split after an out-of-memory error: its parts stay in flight until the result is read."""

    def __init__(self, parts: list[Pending]) -> None:
        self._parts = parts

    def result(self) -> np.ndarray:
        return np.concatenate([p.result() for p in self._parts])


class _Streams:
    """One CUDA stream each for host-to-device copies, the forward pass and the copy of probabilities back.

    Work is ordered with events, so batch k+1's pixels travel while batch k
    runs and batch k-1's probabilities come back; the host waits only in
    `Pending.result`.
    """

    def __init__(self, device: torch.device) -> None:
        self.h2d, self.compute, self.d2h = (torch.cuda.Stream(device) for _ in range(3))


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """The eval-mode `model` with each batch norm that follows a convolution folded into its weights.

    In eval mode a batch norm is an affine map per channel, so it can be
    folded into the convolution before it: the same function (float
    rounding apart) with one pass over the activations fewer per layer.
    torch's FX pass (`torch.fx.experimental.optimization.fuse`) traces the
    model and folds what it finds. On a 2-core AVX2 EPYC, model only, fp32,
    channels-last: mobilenet_v3_large 155 -> 200 img/s (its many thin
    layers are memory-bound; end to end 87 -> 97), resnet50 16.8 -> 17.1
    (bench/RESULTS.md, issue 11, "batch norm folded"). A model FX cannot
    trace runs as it is.
    """
    from torch.fx.experimental.optimization import fuse

    if model.training or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        return fuse(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure: the model as it is, which is correct
        log.debug("batch norm left unfolded (%s cannot be traced: %s)", type(model).__name__, err)
        return model


class Engine:
    """A bundle's model on a device: uint8 batches in, probabilities out."""

    def __init__(self, bundle: Bundle, device: torch.device, *, precision: str = "auto",
                 channels_last: bool = True, compile: bool = False, batch_size: int | None = None) -> None:
        keep_freed_memory()  # each batch reuses the last one's pages (`mlcls.allocator`)
        self.bundle = bundle
        self.device = device
        self.compiled = compile
        self.pad_to = batch_size if compile else None
        self.amp_dtype = resolve_precision(precision, device)
        model = fold_batchnorm(bundle.build_model()).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile:
            from mlcls.tag.compiling import compile_options, use_compile_cache

            use_compile_cache()
            model = torch.compile(model, dynamic=batch_size is None, options=compile_options(device.type))
        self.model = model
        self.normalise = Normaliser(bundle.preprocess, device)
        self.thresholds = np.asarray(bundle.thresholds, dtype=np.float32)
        self.max_batch: int | None = None  # set by a CUDA out-of-memory error: batches are split to this size
        self.base_threads = torch.get_num_threads()  # what a shard's thread balance gives back (`threads.py`)
        self.threads_chosen: dict[int, Split] = {}  # decode threads -> the split the probe chose
        self._streams = _Streams(device) if device.type == "cuda" else None
        self._lock = threading.Lock()
        self._warm_threads: set[int] = set()  # thread counts a compiled CPU engine has its graph for

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
        return self.submit(pixels).result()

    def warm_threads(self, counts: set[int]) -> None:
        """Give a compiled CPU engine its graph for each of these torch thread counts before a shard runs.

        Dynamo recompiles at the first batch under a new thread count (3-4 s
        with `compiling.compile_options`); in a shard whose thread balance
        probes its splits that batch would be timed as the lean split's cost, and the
        balance would keep all threads (bench/RESULTS.md, issue 11). Eager
        engines and counts already seen cost nothing.
        """
        todo = sorted(counts - self._warm_threads) if self.compiled and self.device.type == "cpu" else []
        if not todo:
            return
        size = self.bundle.preprocess.size
        pixels = torch.zeros((self.pad_to or 1, size, size, 3), dtype=torch.uint8)
        saved = torch.get_num_threads()
        with self._lock:
            try:
                for n in todo:
                    torch.set_num_threads(n)
                    self.logits(pixels)
                    self._warm_threads.add(n)
            finally:
                torch.set_num_threads(saved)
        log.debug("compiled graph ready for %s torch thread(s)", ", ".join(map(str, todo)))

    def submit(self, pixels: torch.Tensor) -> Pending:
        """Start the forward pass of (N, H, W, 3) uint8 `pixels` (host or device); see `Pending`."""
        if pixels.shape[0] == 0:
            return Pending(torch.zeros((0, len(self.bundle.classes)), dtype=torch.float32))
        with self._lock:  # one forward at a time per model: two threads would only fight
            while True:
                try:
                    return self._submit_split(pixels)
                except torch.OutOfMemoryError:
                    if not self._halve(pixels.shape[0]):
                        raise

    def _halve(self, n: int) -> bool:
        """Use batches half the size from now on and say so once (the run goes on); False at one image."""
        current = min(n, self.max_batch or n)
        if current <= 1:
            return False
        if self.max_batch is None:
            log.warning("out of memory on %s with batches of %d images: carrying on with batches of %d "
                        "(set --batch-size to choose)", self.device, current, current // 2)
        self.max_batch = current // 2
        if self.pad_to:
            self.pad_to = self.max_batch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def _submit_split(self, pixels: torch.Tensor) -> Pending:
        step = self.max_batch or pixels.shape[0]
        if step >= pixels.shape[0]:
            return self._submit_one(pixels)
        return _Parts([self._submit_one(pixels[i:i + step]) for i in range(0, pixels.shape[0], step)])

    def _submit_one(self, pixels: torch.Tensor) -> Pending:
        if self._streams is None:
            return Pending(torch.sigmoid(self.logits(pixels)).cpu())
        s = self._streams
        s.h2d.wait_stream(torch.cuda.current_stream(self.device))  # pixels decoded on the device are ready
        with torch.cuda.stream(s.h2d):
            x = pixels.to(self.device, non_blocking=True)
        s.compute.wait_stream(s.h2d)
        x.record_stream(s.compute)
        with torch.cuda.stream(s.compute):
            probs = torch.sigmoid(self.logits(x))
        s.d2h.wait_stream(s.compute)
        probs.record_stream(s.d2h)
        with torch.cuda.stream(s.d2h):
            host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)  # torch's host cache reuses these
            host.copy_(probs, non_blocking=True)
            done = torch.cuda.Event(blocking=True)  # `result` sleeps in the wait, leaving the core to decoding
            done.record(s.d2h)
        return Pending(host, done)

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


def has_engine(bundle: Bundle, device: str = "auto", **options: Any) -> bool:
    """Whether `get_engine` with these arguments would return an engine already built."""
    key = (bundle.digest, str(resolve_device(device)), tuple(sorted(options.items())))
    with _ENGINES_LOCK:
        return key in _ENGINES


def clear_engines() -> None:
    """Drop cached engines (tests, or a long-lived process switching models)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()
