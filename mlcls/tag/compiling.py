"""When `torch.compile` pays for itself, and where its work is kept between processes.

Compiling costs tens of seconds once per process and shape; it gains a
share of each later batch. `--compile auto` (the default) compiles only on a
GPU (see `COSTS`) and only when the planned work is long enough to win that
back, with figures measured in bench/RESULTS.md. The Inductor cache lives
under the user's cache directory, so a nightly run, and every fanned-out
worker on the same machine, pays the full compile once and later ones load
its graphs.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from mlcls.errors import OptionError

log = logging.getLogger(__name__)
_WARNED: set[str] = set()

COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CompileCost:
    """What compiling costs and gains on one kind of device (measured, bench/RESULTS.md)."""

    cold: float  # seconds to compile with an empty cache
    warm: float  # seconds when an earlier process left its graphs in the cache
    saving: float  # share of each image's end-to-end time the compiled model saves (0.1: 10% faster)


# From bench/RESULTS.md. CUDA (one H100, ResNet-50 bf16): 24 s cold; 12,100 -> 19,061 img/s model only; the warm
# figure is the CPU's ratio (a quarter of the cold compile), not measured there. Auto errs towards not compiling.
# No CPU entry: `auto` runs eager on a CPU. There the compiled model gains little or nothing model only
# (mobilenet_v3_large +7 % on one 2-core AVX2 EPYC, -2 % on another) and a CPU run pays a compile for each thread
# count its balance sets (`Engine.warm_threads`): end to end 63.6 img/s compiled against 66.0 eager, same run.
# `--compile on` still compiles on a CPU, balanced like an eager run (53.6 img/s before, unbalanced). In bf16 on an
# AVX-512 BF16 EPYC the compiled model is 8-13 % faster alone, but end to end resnet50 gained 7 % and
# mobilenet_v3_large lost 12 % (bench/RESULTS.md, issue 11, 2026-12-07): still no CPU entry.
COSTS = {
    "cuda": CompileCost(cold=25.0, warm=8.0, saving=0.35),
}


def compile_options(device_type: str) -> dict[str, object]:
    """Inductor options for a device type: on a CPU, kernels that read torch's thread count when they run.

    Dynamo recompiles a graph when torch's thread count changes (it guards
    on it), and a CPU run changes it per batch (`mlcls.tag.threads`). By
    default Inductor builds a CPU graph's kernels for the count at hand, so
    each count costs a whole compile (24-29 s against 3-4 s for the second
    count, mobilenet_v3_large, 2-core EPYC, bench/RESULTS.md); kernels that
    read the count at run time are one build that every count reuses from
    Inductor's cache, at the same speed.
    """
    if device_type != "cpu":
        return {}
    import torch._inductor.config as inductor

    return {"cpp.dynamic_threads": True} if hasattr(inductor.cpp, "dynamic_threads") else {}


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


def cache_is_warm() -> bool:
    """Whether an earlier process left compiled graphs in the cache (`use_compile_cache`'s folder)."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir()
    try:
        return any(os.scandir(os.path.join(path, "fxgraph")))
    except OSError:
        return False


def missing_compiler(device_type: str) -> str | None:
    """What `torch.compile` would lack here, or None.

    Inductor builds its CPU kernels with the system's C++ compiler (`$CXX`,
    else g++) and Triton its CUDA launcher with the C compiler (`$CC`, else
    gcc); a slim container has neither, and the compile would then fail at
    the first batch (`InvalidCxxCompiler`), taking the shard with it.
    """
    env, names, what = (("CXX", ("g++", "c++", "clang++"), "C++") if device_type == "cpu"
                        else ("CC", ("gcc", "cc", "clang"), "C"))
    chosen = os.environ.get(env)
    if any(shutil.which(name) for name in ([chosen] if chosen else names)):
        return None
    return f"no {what} compiler ({chosen or names[0]}) on PATH, which torch.compile needs on {device_type}"


def check_compiler(device_type: str, option: str = "--compile on", instead: str = "use --compile off") -> None:
    """Fail fast, in one line, where the option that asks for a compile could not compile."""
    missing = missing_compiler(device_type)
    if missing:
        raise OptionError(f"{option}: {missing}; install one (e.g. apt-get install g++) or {instead}")


def should_compile(mode: str, device_type: str, images: int, model_rate: float | None = None,
                   warm: bool | None = None) -> bool:
    """Whether to compile for `images` planned images in this process.

    `auto` compiles when the time it saves, images / rate × saving, beats
    the compile (cold, or warm where the cache holds earlier graphs), and
    only where the compiler it needs is present (`missing_compiler`): a run
    that could only fail runs eager. Devices without figures in `COSTS` (the
    CPU) run eager under `auto`. The rate is the eager model's images/s if
    known; else a conservative 5,000/s on a GPU.
    """
    mode = parse_compile(mode)
    if mode == "on":
        check_compiler(device_type)
        return True
    if mode == "off" or device_type not in COSTS or images <= 0:
        return False
    if images < break_even_images(device_type, model_rate, warm):
        return False
    missing = missing_compiler(device_type)
    if missing and device_type not in _WARNED:
        _WARNED.add(device_type)
        log.warning("--compile auto: %s; running eager (install it to compile long runs)", missing)
    return missing is None


def break_even_images(device_type: str, model_rate: float | None = None, warm: bool | None = None) -> int:
    """The planned images from which `auto` compiles (for docs and messages)."""
    cost = COSTS[device_type]
    rate = model_rate or 5000.0
    seconds = cost.warm if (cache_is_warm() if warm is None else warm) else cost.cold
    return int(seconds * rate / cost.saving) + 1
