"""The allocator setting: freed blocks are reused, and a user's own choice is left alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from mlcls import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Run a convolution whose 42 MB output is above glibc's largest automatic mmap threshold a few times, as a
# model's layers do every batch; count the page faults of the last three runs, which kept blocks do not take
# (the first runs grow the heap until freed blocks fit the next request).
PROBE = """
import json, resource, sys
import torch
from mlcls import allocator
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
if sys.argv[1] == "engine":  # building a tagging engine keeps freed blocks on its own
    from mlcls.bundle import demo_bundle_url, load_bundle
    from mlcls.tag.engine import Engine
    Engine(load_bundle(demo_bundle_url()), torch.device("cpu"))
conv, x = torch.nn.Conv2d(3, 64, 3, padding=1), torch.randn(10, 3, 128, 128)
faults = []
with torch.no_grad():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = conv(x)
        del y
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults, "repeat_faults": sum(faults[3:])}))
"""


def _run_json(script: str, *args: str, drop: tuple[str, ...], **env: str) -> dict:
    """Run `script` in a fresh Python without the variables named in `drop` (or starting `MALLOC_`), with `env`
    added; return the JSON object it prints last."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in drop}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(mode: str, **env: str) -> dict:
    # 4 KB pages (THP_MEM_ALLOC_ENABLE=0), so that the faults count blocks mapped anew
    return _run_json(PROBE, mode, drop=("MLCLS_MALLOC",), **{"THP_MEM_ALLOC_ENABLE": "0", **env})


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_a_kept_block_is_reused_without_new_page_faults() -> None:
    kept, system, engine = _probe("keep"), _probe("system"), _probe("engine")
    assert kept["kept"] is True and system["kept"] is False
    assert system["repeat_faults"] > 0  # glibc maps and unmaps the block every time
    assert kept["repeat_faults"] < max(4, system["repeat_faults"] // 10)
    assert engine["repeat_faults"] < max(4, system["repeat_faults"] // 10)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_the_users_own_allocator_settings_win() -> None:
    assert _probe("keep", MLCLS_MALLOC="system")["kept"] is False
    user = _probe("keep", MALLOC_MMAP_THRESHOLD_="131072")
    assert user["kept"] is False and user["repeat_faults"] > 0  # their threshold stands: the block is mapped anew


def test_why_not_keep_names_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLCLS_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    if GLIBC:
        assert allocator.why_not_keep() is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    if GLIBC:
        assert allocator.why_not_keep() == "set by the user (MALLOC_TRIM_THRESHOLD_, LD_PRELOAD)"
    monkeypatch.setenv("MLCLS_MALLOC", "System")
    assert allocator.why_not_keep() == "MLCLS_MALLOC=system"
    monkeypatch.setenv("MLCLS_MALLOC", "off")
    assert allocator.why_not_keep() == "MLCLS_MALLOC=off"


def test_an_unknown_choice_is_said_not_taken_for_one(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLCLS_MALLOC", "sytem")
    with caplog.at_level("WARNING", logger="mlcls.allocator"):
        reason = allocator.why_not_keep()
    assert reason is None or reason == "not glibc"  # the default stands
    assert "MLCLS_MALLOC=sytem is not one of system/off/keep" in caplog.text
    caplog.clear()
    monkeypatch.setenv("MLCLS_MALLOC", "keep")
    with caplog.at_level("WARNING", logger="mlcls.allocator"):
        allocator.why_not_keep()
    assert caplog.text == ""


HUGE = """
import json, os
import mlcls  # before any tensor: torch reads THP_MEM_ALLOC_ENABLE at the first one
import torch
x = torch.ones(64 << 20)  # 256 MB, touched
huge = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kb": huge}))
"""


def _huge(**env: str) -> dict:
    return _run_json(HUGE, drop=("THP_MEM_ALLOC_ENABLE", "MLCLS_MALLOC"), **env)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "none"


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux's memory accounting")
def test_importing_mlcls_asks_torch_for_huge_pages_unless_told_otherwise() -> None:
    default, user, system = _huge(), _huge(THP_MEM_ALLOC_ENABLE="0"), _huge(MLCLS_MALLOC="system")
    assert default["env"] == "1" and user["env"] == "0" and system["env"] is None
    if _thp_mode() == "madvise":  # huge pages only where torch asks for them
        assert default["huge_kb"] >= 64 << 10  # most of the 256 MB block
        assert user["huge_kb"] == 0 and system["huge_kb"] == 0
