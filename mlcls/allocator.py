"""Keep the memory torch frees for the next batch, instead of handing it back to the kernel.

glibc's malloc serves large blocks with `mmap` and unmaps them on `free`
(its threshold adapts, up to 32 MB), and trims the heap's free top past
twice that. A CNN's activations are such blocks: every training step and
every inference batch gets fresh pages from the kernel, which faults them in
and zeroes them one 4 KB page at a time. On a 2-core AVX2 EPYC VM
(bench/RESULTS.md, issue 11, "the allocator"): ~55,000 minor faults per
resnet18 training step (batch 64, 128 px); `mlcls tag` with
mobilenet_v3_large ran at 38 img/s with glibc's defaults and 84 with the
pages kept, and whole `mlcls train` runs took 320-329 s instead of 337-359.

`keep_freed_memory` raises glibc's mmap and trim thresholds (`mallopt`, what
the `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` variables do at start-up),
so freed blocks are reused: the same effect as preloading jemalloc or
tcmalloc, which PyTorch's CPU tuning guide advises, with nothing to install.
The cost is memory the process keeps after its peak (peak RSS +29 % when
tagging, +13 % when training, in the measurements above). It is process-wide,
so it stays out of the way of a user's own choice: it does nothing where the
user set those variables, `GLIBC_TUNABLES` or a preloaded allocator, where
the C library is not glibc, or with `MLCLS_MALLOC=system` (or `off`). Processes forked
later (decode workers) inherit it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
KEEP_UP_TO = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap is kept
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_SYSTEM = ("system", "off", "0", "false", "no")
_KEEP = ("", "keep", "auto", "on", "1", "true", "yes")


def _choice() -> str:
    """`MLCLS_MALLOC` as given, trimmed and lower-case ("" when unset)."""
    return os.environ.get("MLCLS_MALLOC", "").strip().lower()


def prefer_huge_pages() -> bool:
    """Have torch's CPU allocator ask for transparent huge pages for blocks of 2 MB and more; whether it will.

    torch reads `THP_MEM_ALLOC_ENABLE` at the process's first tensor, so
    `import mlcls` calls this before anything is allocated (a process that
    made tensors before importing mlcls keeps torch's default). With the
    kept heap above, a batch's activations are few large blocks reused
    batch after batch; 2 MB pages cut their TLB misses. On a 2-core AVX2 EPYC
    (THP `madvise`, bench/RESULTS.md, issue 11, "huge pages"):
    mobilenet_v3_large model only 177-182 -> 211-213 img/s, end to end
    +3.6 % where the model sets the pace (ImageNet-like JPEGs) and level
    where decoding does, resnet50 level, a resnet18 training step 2-3 %
    faster, peak RSS unchanged. A value the user set stands;
    `MLCLS_MALLOC=system` (or off) leaves it unset.
    """
    if _choice() in _SYSTEM:
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def why_not_keep() -> str | None:
    """Why this process's allocator is left as it is, or None where `keep_freed_memory` applies."""
    choice = _choice()
    if choice in _SYSTEM:
        return f"MLCLS_MALLOC={choice}"
    if choice not in _KEEP:  # a typo must not pass for a choice: say what is read and what it does
        log.warning("MLCLS_MALLOC=%s is not one of %s; keeping freed memory (the default)", choice,
                    "/".join(_SYSTEM[:2] + _KEEP[1:2]))
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    user = [name for name in _USER_SETTINGS if name in os.environ]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        user.append("LD_PRELOAD")
    return f"set by the user ({', '.join(user)})" if user else None


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (once per process); whether this process now does.

    Cached: later calls cost a lookup. Two first calls at once would both
    set the same values, which is harmless.
    """
    reason = why_not_keep()
    if reason:
        log.debug("allocator left as it is: %s", reason)
        return False
    try:
        libc = ctypes.CDLL(None)
        done = libc.mallopt(M_MMAP_THRESHOLD, KEEP_UP_TO) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO) == 1
    except (OSError, AttributeError) as err:  # no mallopt: nothing to tune
        log.debug("allocator left as it is: %s", err)
        return False
    log.debug("allocator %s freed blocks up to %d MiB for reuse", "keeps" if done else "could not keep",
              KEEP_UP_TO >> 20)
    return done
