"""The tagging path imports where only torch, pyarrow and Pillow are installed (the lent GPU machine).

That machine has no registry and takes at most 64 MiB of wheels a call, so
deltalake and polars never reach it; `bench/gpu_device.sh` tags shards there
without the table. An import of either on the tagging path would fail every
row of a device session that cannot be repeated; `bench/devsim` makes them
unimportable here, as there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench' / 'devsim'}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks():
    proc = _run("-c", "import polars")
    assert proc.returncode != 0 and "not on the GPU machine" in proc.stderr


def test_the_tagging_path_and_the_bench_children_import_without_the_table_layer():
    code = ("import mlcls.tag.job, mlcls.tag.plan, mlcls.images.gpu, mlcls.tag.engine\n"
            "import sys; sys.path.insert(0, 'bench'); import throughput\n"
            "assert not throughput.has_table_layer()\n")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_device_scripts_gpu_tests_collect_there():
    proc = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-m", "gpu",
                "tests/tag/test_engine.py", "tests/images/test_gpu.py")
    assert proc.returncode == 0, proc.stdout[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    match = re.match(r"(\d+)/\d+ tests collected \(\d+ deselected\) in ", summary)
    assert match and int(match.group(1)) >= 5, summary  # no collection error, and the GPU tests are there
