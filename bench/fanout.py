"""Fan-out on one machine: the same images tagged in-process and fanned out to one and two warm workers.

    python bench/fanout.py --images 480 --shard-size 40

Starts its own `prefect server` (temporary PREFECT_HOME), the `mlcls-gpu`
pool and the `tag-shard` deployment of deployments/prefect.yaml, then for
each mode tags the same folder into a fresh output:

- `no-prefect`: `mlcls tag SRC --out OUT --no-prefect` (the plain in-process job);
- `fan-out xW`: W process workers (`prefect worker start --pool mlcls-gpu --limit 1`)
  and `mlcls tag SRC --out OUT --fan-out deployment --slots W`.

Reports the command's wall time and, for the fan-outs, the per-shard overhead
on a warm worker (from one shard's last batch to the next shard's first batch,
logged by each slot run) and how many engines each slot run's process built.
With `--before TREE` (an export of an older commit), the same fan-outs run
that checkout's code too (one flow run, so one process, per shard). Output is
checked: one row per image in each mode.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from bench.corpus import build_corpus  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def _server(home: Path) -> tuple[dict[str, str], subprocess.Popen]:
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PYTHONPATH": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "mlcls"}
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                  home / "server.log", ROOT)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return env, proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"prefect server did not start:\n{(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall, done.stdout


def _online_workers(env: dict[str, str]) -> int:
    r = httpx.post(f"{env['PREFECT_API_URL']}/work_pools/mlcls-gpu/workers/filter", json={}, timeout=10)
    return sum(1 for w in r.json() if w.get("status") == "ONLINE")


def _slot_lines(env: dict[str, str], since: float) -> list[str]:
    """The closing lines of the slot runs that ended after `since` (epoch seconds)."""
    r = httpx.post(f"{env['PREFECT_API_URL']}/logs/filter", timeout=30,
                   json={"logs": {"level": {"ge_": 20}}, "limit": 200, "sort": "TIMESTAMP_DESC"})
    from datetime import datetime

    return [log["message"] for log in r.json() if "engines built in this process" in log["message"]
            and datetime.fromisoformat(log["timestamp"]).timestamp() >= since]


def _gaps(lines: list[str]) -> tuple[list[float], list[int], list[int]]:
    """Median gaps, engine builds and shards tagged per slot run."""
    medians, builds, shards = [], [], []
    for line in lines:
        m = re.search(r"(\d+) shards tagged.*engines built in this process: (\d+); between shards "
                      r"(?:.*overhead ([\d.]+) s)?", line)
        if m:
            shards.append(int(m.group(1)))
            builds.append(int(m.group(2)))
            if m.group(3):
                medians.append(float(m.group(3)))
    return medians, builds, shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--shard-size", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="fan-out widths to measure")
    parser.add_argument("--before", default=None, metavar="TREE",
                        help="also fan out with the code of this checkout (one flow run per shard: "
                             "--shards-per-run 1), on the same server, for the before/after")
    args = parser.parse_args()
    corpus = Path(tempfile.gettempdir()) / f"mlcls-bench-fanout-{args.images}"
    build_corpus(str(corpus), args.images)
    work = Path(tempfile.mkdtemp(prefix="mlcls-bench-fanout-"))
    env, server = _server(work / "home")
    workers: list[subprocess.Popen] = []
    common = ["--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size), "-q"]
    results = []
    trees = [("after", ROOT, ["--slots"])] + ([("before", Path(args.before), None)] if args.before else [])
    try:
        _run([str(BIN / "prefect"), "--no-prompt", "work-pool", "create", "mlcls-gpu", "--type", "process"], env)
        out = work / "no-prefect"
        wall, _ = _run([str(BIN / "mlcls"), "tag", str(corpus), "--out", str(out), "--no-prefect", *common], env)
        results.append(("no-prefect (in-process)", wall, None, None, None, out))
        for label, tree, slots in trees:
            tree_env = {**env, "PYTHONPATH": str(tree)}
            _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                  str(tree / "deployments/prefect.yaml"), "--name", "tag-shard"], tree_env)
            for proc in workers:
                _stop(proc)
            workers = []
            while _online_workers(env):
                time.sleep(1)
            for width in args.workers:
                for w in range(len(workers), width):
                    workers.append(_start([str(BIN / "prefect"), "worker", "start", "--pool", "mlcls-gpu", "--name",
                                           f"{label}-w{w}", "--limit", "1"], tree_env, work / f"{label}-w{w}.log",
                                          work))
                while _online_workers(env) < width:
                    time.sleep(1)
                out = work / f"{label}-fan-out-{width}"
                since = time.time()
                how = [*slots, str(width)] if slots else ["--shards-per-run", "1"]
                wall, _ = _run([str(BIN / "mlcls"), "tag", str(corpus), "--out", str(out), "--fan-out",
                                "deployment", *how, *common], tree_env)
                results.append((f"{label}: fan-out to {width}", wall, *_gaps(_slot_lines(env, since)), out))
    finally:
        for proc in [*workers, server]:
            _stop(proc)
    _report(args, results)
    if os.environ.get("MLCLS_BENCH_KEEP") is None:
        shutil.rmtree(work, ignore_errors=True)


def _report(args: argparse.Namespace, results: list) -> None:
    """The table; 'implied overhead' = (workers x wall - in-process wall) / shards, for both designs alike."""
    shards = -(-args.images // args.shard_size)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n{args.images} images, {shards} shards of {args.shard_size}, batch {args.batch_size}; "
          f"load {' '.join(load)}")
    print(f"{'mode':<24} {'wall s':>7} {'vs in-process':>13} {'implied overhead s/shard':>24} "
          f"{'measured overhead s (per slot)':>30} {'engines/slot':>12} {'shards/slot':>12}")
    base = results[0][1]
    for name, wall, medians, builds, per_slot, out in results:
        rows = pl.read_delta(str(out))
        assert rows.height == args.images == rows["uri"].n_unique(), f"{name}: {rows.height} rows"
        width = int(name.rsplit(" ", 1)[1]) if "fan-out" in name else 1
        implied = f"{(width * wall - base) / shards:.2f}" if "fan-out" in name else "-"
        overhead = " ".join(f"{m:.2f}" for m in medians) if medians else "-"
        print(f"{name:<24} {wall:7.1f} {base / wall:13.2f} {implied:>24} {overhead:>30} "
              f"{' '.join(map(str, builds or [])) or '-':>12} {' '.join(map(str, per_slot or [])) or '-':>12}")


if __name__ == "__main__":
    main()
