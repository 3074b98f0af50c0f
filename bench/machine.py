"""The machine a bench figure was measured on, named the same way by every bench.

CPUs differ between sessions (AVX2 only, or AVX-512 with AMX bf16), and
a figure without its machine cannot be compared with another: each bench
prints and records `cpu_name()` beside its numbers.
"""

from __future__ import annotations

import os
import platform

ISA_FLAGS = (("amx_bf16", "AMX bf16"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_name(cpuinfo: str | None = None) -> str:
    """`model name` from /proc/cpuinfo with its widest vector units, e.g. 'AMD EPYC (AVX2; 2 cores)'."""
    from mlcls.tag.engine import cpu_flags, read_cpuinfo

    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "")
    flags = cpu_flags(cpuinfo)
    isa = [name for flag, name in ISA_FLAGS if flag in flags]
    return f"{model or platform.processor() or platform.machine()} ({', '.join(isa) or 'no AVX2'}; " \
           f"{os.cpu_count()} cores)"
