"""Scale check for query, stats and compact over a generated output dataset.

    python bench/query_scale.py generate --rows 1000000 --out bench/out/q1m
    python bench/query_scale.py generate --rows 10000000 --parts 100 --out bench/out/q10m
    python bench/query_scale.py measure bench/out/q1m bench/out/q10m
    python bench/query_scale.py readers bench/out/q1m bench/out/q10m

`generate` writes parts through mlcls's own writer (`output.build_table`,
`output.write_part`), so the files have exactly the schema and footer of a
real run: 100 classes by default, class frequencies from common to rare,
per-class thresholds, model-like probabilities (most near 0, positives high),
0.3% error rows of several kinds, and 1% of the images re-tagged by a later
incremental run (a newer row for the same uri). Each run's parts are
committed to the Delta table as `mlcls tag` commits them; the re-tag commit
rewrites the files that held the superseded rows, and `generate` prints
what each commit took.

`measure` runs each command in its own process (wall seconds, and peak RSS
from `resource.getrusage` in a helper that runs nothing else) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mlcls.images.decode import Decoded  # noqa: E402
from mlcls.output.commit import commit_parts  # noqa: E402
from mlcls.output.parts import ProbsMode, build_table, file_metadata, part_name, write_part  # noqa: E402
from mlcls.sources import FileRecord  # noqa: E402

ERROR_KINDS = ("decode: cannot identify image file", "empty: zero bytes", "too_large: 120000000 pixels",
               "read: connection reset")


def class_names(n: int) -> list[str]:
    return [f"c{i:03d}" for i in range(n)]


def model_probs(rng: np.random.Generator, n: int, prevalence: np.ndarray) -> np.ndarray:
    """Sigmoid-like outputs: negatives mostly below 0.1, positives mostly above 0.6, a band in between."""
    positive = rng.random((n, len(prevalence))) < prevalence
    probs = np.where(positive, rng.beta(6, 1.5, positive.shape), rng.beta(0.6, 12, positive.shape))
    return probs.astype(np.float32)


def write_dataset(out: str, *, rows: int, classes: int = 100, parts: int = 10, seed: int = 0,
                  error_share: float = 0.003, retag_share: float = 0.01) -> dict:
    """Write `rows` rows in `parts` part files (plus one re-tag part); return what was written."""
    rng = np.random.default_rng(seed)
    names = class_names(classes)
    prevalence = 0.25 / (1 + np.arange(classes)) ** 0.7
    thresholds = np.round(rng.uniform(0.4, 0.6, classes), 2).astype(np.float32)
    mode = ProbsMode()
    meta = file_metadata(model_id="bench@0123456789ab", digest="0123456789ab", classes=names,
                         thresholds=thresholds, mode=mode)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    per_part = -(-rows // parts)
    retag = rng.choice(rows, size=int(rows * retag_share), replace=False)
    chunks = [np.arange(p * per_part, min(rows, (p + 1) * per_part)) for p in range(parts)] + [np.sort(retag)]
    runs: dict[str, list[str]] = {}
    for p, ids in enumerate(chunks):
        if len(ids) == 0:
            continue
        run = f"run-{p // parts}"
        table = _part_table(rng, ids, names, thresholds, prevalence, mode, meta, error_share,
                            tagged_at=start + timedelta(hours=p), run_id=run)
        runs.setdefault(run, []).append(write_part(out, part_name(f"bench{p:04d}", run), table))
    commits = []
    for run, files in runs.items():
        started = time.perf_counter()
        result = commit_parts(out, run, files)
        commits.append((run, len(files), result.superseded, result.rewritten, round(time.perf_counter() - started, 2)))
    return {"rows": rows, "images": rows, "classes": classes, "parts": len(chunks),
            "commits (run, files, superseded rows, files rewritten, s)": commits}


def _part_table(rng, ids, names, thresholds, prevalence, mode, meta, error_share, *, tagged_at, run_id):
    n = len(ids)
    mtime = datetime(2026, 2, 1, tzinfo=UTC)
    records = [FileRecord(uri=f"s3://photos/2026/{i % 28 + 1:02d}/img_{i:09d}.jpg", size=int(s),
                          etag=f"{i:032x}", mtime=mtime) for i, s in zip(ids, rng.integers(20_000, 900_000, n),
                                                                          strict=True)]
    failed = rng.random(n) < error_share
    kinds = rng.integers(0, len(ERROR_KINDS), n)
    widths, heights = rng.integers(320, 4000, n), rng.integers(240, 3000, n)
    decoded = [Decoded(pixels=None, error=ERROR_KINDS[k]) if f else Decoded(pixels=None, width=int(w), height=int(h))
               for f, k, w, h in zip(failed, kinds, widths, heights, strict=True)]
    probs = model_probs(rng, n, prevalence)
    return build_table(records, decoded, probs, classes=names, thresholds=thresholds, mode=mode,
                       model_id="bench@0123456789ab", run_id=run_id, tagged_at=tagged_at, metadata=meta)


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds and peak RSS (MiB) of `cmd`, run under a fresh helper process that reports its child's."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "one", *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    rss = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    return wall, rss, proc.stdout


def measure(datasets: list[str]) -> None:
    mlcls = [sys.executable, "-m", "mlcls.cli"]
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}; load average {load[0]:.1f} at start")
    print("| dataset | command | wall s | peak RSS MiB |\n| --- | --- | --- | --- |")
    for data in datasets:
        for args in (["stats", data],
                     ["query", data, "--label", "c003", "--not-label", "c001", "--min-prob", "0.9",
                      "--limit", "50", "--format", "csv"],
                     ["query", data, "--label", "c050", "--format", "parquet", "--out", f"{data}-c050.parquet"],
                     ["query", data, "--sql", "select count(*) as n from tags where list_contains(labels, 'c002')"]):
            wall, rss, _ = timed([*mlcls, *args])
            shown = " ".join(a if " " not in a else repr(a) for a in args[:1] + args[2:])
            print(f"| {os.path.basename(data)} | `mlcls {shown}` | {wall:.1f} | {rss} |", flush=True)


def readers(datasets: list[str]) -> None:
    """The table read by others than mlcls: polars' scan_delta and DuckDB over the log's file list."""
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    for data in datasets:
        started = time.perf_counter()
        n = pl.scan_delta(data).filter(pl.col("labels").list.contains("c002")).select(pl.len()).collect().item()
        polars_s = time.perf_counter() - started
        started = time.perf_counter()
        files = DeltaTable(data).file_uris()
        m = duckdb.sql(f"select count(*) from read_parquet({files}) where list_contains(labels, 'c002')").fetchall()
        duck_s = time.perf_counter() - started
        rows, uris = pl.scan_delta(data).select(pl.len(), pl.col("uri").n_unique()).collect().row(0)
        print(f"{os.path.basename(data)}: scan_delta c002 {n:,} in {polars_s:.1f} s; DuckDB {m[0][0]:,} in "
              f"{duck_s:.1f} s; {rows:,} rows, {uris:,} distinct uris")


def one(cmd: list[str]) -> None:
    """Run one command; its peak RSS (MiB) is the last line on standard error."""
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024}", file=sys.stderr)
    sys.exit(proc.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--rows", type=int, default=1_000_000)
    g.add_argument("--classes", type=int, default=100)
    g.add_argument("--parts", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    m = sub.add_parser("measure")
    m.add_argument("datasets", nargs="+")
    r = sub.add_parser("readers")
    r.add_argument("datasets", nargs="+")
    o = sub.add_parser("one")
    o.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.cmd == "generate":
        started = time.perf_counter()
        info = write_dataset(args.out, rows=args.rows, classes=args.classes, parts=args.parts, seed=args.seed)
        print(f"wrote {info} to {args.out} in {time.perf_counter() - started:.1f} s")
    elif args.cmd == "measure":
        measure(args.datasets)
    elif args.cmd == "readers":
        readers(args.datasets)
    else:
        one(args.argv)


if __name__ == "__main__":
    main()
