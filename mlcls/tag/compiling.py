"""When `torch.compile` pays for itself, and where its work is kept between processes.

Compiling costs tens of seconds once per process and shape; it gains a
share of each later batch. `--compile auto` (the default) compiles only when
the planned work is long enough to win that back, with per-device figures
measured in bench/RESULTS.md. The Inductor cache lives under the user's
cache directory, so a nightly run, and every fanned-out worker on the same
machine, pays the full compile once and later ones load its graphs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CompileCost:
    """What compiling costs and gains on one kind of device (measured, bench/RESULTS.md)."""

    seconds: float  # a cold compile (empty cache), the case auto plans for
    saving: float  # share of each batch's time the compiled model saves (0.2: 20% faster)


# Measured with bench/throughput.py (model only, fp32 on CPU, bf16 on CUDA): the CPU row is mobilenet_v3_large
# and resnet50 on a 2-core AVX-512 Xeon, the CUDA row ResNet-50 on one H100. The smaller gain of the two models
# is kept, so auto errs towards not compiling.
COSTS = {
    "cpu": CompileCost(seconds=60.0, saving=0.10),
    "cuda": CompileCost(seconds=25.0, saving=0.35),
}


def cache_dir() -> str:
    """`$MLCLS_CACHE` or `$XDG_CACHE_HOME/mlcls` or `~/.cache/mlcls`, then `inductor`."""
    base = os.environ.get("MLCLS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlcls")
    return os.path.join(base, "inductor")


def use_compile_cache() -> str:
    """Point Inductor's on-disk cache (FX graphs, kernels, AOT autograd) at `cache_dir()`, unless the user chose one.

    torch's default is a folder under /tmp, which a reboot or a fresh
    container empties; this one survives, so later processes skip most of
    the compile.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir())
    path = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    os.makedirs(path, exist_ok=True)
    return path


def parse_compile(value: object) -> str:
    """`auto`, `on` or `off`; booleans as on/off (the option was a flag before)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in COMPILE_MODES:
        return value.lower()
    raise ValueError(f"--compile must be auto, on or off, not {value!r}")


def should_compile(mode: str, device_type: str, images: int, model_rate: float | None = None) -> bool:
    """Whether to compile for `images` planned images in this process.

    `auto` compiles when the time it saves, images / rate × saving, beats
    the compile. The rate is the eager model's images/s if known; else a
    conservative figure per device (a CPU rate of 50/s, a GPU's 5,000/s).
    """
    mode = parse_compile(mode)
    if mode != "auto":
        return mode == "on"
    cost = COSTS.get(device_type)
    if cost is None or images <= 0:
        return False
    rate = model_rate or (5000.0 if device_type == "cuda" else 50.0)
    return images / rate * cost.saving > cost.seconds


def break_even_images(device_type: str, model_rate: float | None = None) -> int:
    """The planned images from which `auto` compiles (for docs and messages)."""
    cost = COSTS[device_type]
    rate = model_rate or (5000.0 if device_type == "cuda" else 50.0)
    return int(cost.seconds * rate / cost.saving) + 1
