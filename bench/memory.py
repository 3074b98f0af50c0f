"""Peak memory against collection size: listing, planning and writing must stream.

    python bench/memory.py --sizes 2000 20000

Tags a URI list that repeats a small corpus N times (each entry is its own
row) with the demo bundle, in a fresh process per size, and reports the peak
RSS of each. The collection never has to fit in memory: the difference
between sizes should stay within the cost of one shard.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from throughput import OUT, machine  # noqa: E402


def child(uri_list: str, out: str, shard_size: int) -> None:
    from mlcls.tag.job import TagOptions, tag_images

    t = time.perf_counter()
    summary = tag_images(uri_list, out, None, TagOptions(shard_size=shard_size, batch_size=64))
    print(json.dumps({"images": summary.images, "seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--corpus-images", type=int, default=200)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--child", nargs=3, metavar=("LIST", "OUT", "SHARD"))
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return
    from corpus import shapes_corpus

    paths = shapes_corpus(os.path.join(OUT, f"shapes-{a.corpus_images}"), a.corpus_images)
    rows = []
    for n in a.sizes:
        uri_list = os.path.join(OUT, f"uris-{n}.txt")
        with open(uri_list, "w") as f:
            f.writelines(f"{paths[i % len(paths)]}\n" for i in range(n))
        out = os.path.join(OUT, f"memory-{n}")
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", uri_list, out, str(a.shard_size)],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((n, r))
        print(n, r, flush=True)
    lines = [f"\n### Peak memory by collection size, demo bundle, shard size {a.shard_size} "
             f"({datetime.now(UTC):%Y-%m-%d})\n", f"`python bench/memory.py {' '.join(sys.argv[1:])}`\n",
             f"Machine: {machine()['cpu']}, {machine()['cores']} cores\n",
             "| images | images/s | peak RSS MB |", "| ---: | ---: | ---: |"]
    lines += [f"| {n} | {r['images'] / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |" for n, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_record:
        with open(a.results, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
