"""What the feeding process pays per image to take decoded work from the decode processes.

    python bench/transport.py                      # this checkout, ImageNet-like JPEGs, 1 decode process
    python bench/transport.py --root ../base       # the same from another checkout (an A/B: run both)
    python bench/transport.py --corpus-kind mixed  # 320-1600 px, some PNG (decoded in the workers)
    python bench/transport.py --corpus-kind photos --images 200   # 12 MP phone photos, a few MB each

On a GPU box one process reads the decode processes' results, decodes JPEGs
on the GPU and drives the model: at 8,000 images/s it has 125 µs of CPU an
image. This measures that process's CPU per image (all its threads, from
`time.process_time`) and its main thread's alone, with no model and no GPU:
`bytes` hands plain JPEGs back for GPU decode (a CPU-only stand-in decoder
is configured, never called), `pixels` decodes them in the workers. Rates
are over whole passes of the corpus after one warm-up pass; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(HERE), help="the checkout whose mlcls is measured")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--corpus-kind", default="imagenet", choices=["imagenet", "mixed", "photos"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["bytes", "pixels"], choices=["bytes", "pixels"])
    a = ap.parse_args()
    sys.path[:0] = [a.root, HERE]
    import torch
    from corpus import build_corpus

    from mlcls.images.gpu import GpuJpegDecoder
    from mlcls.images.preprocess import Preprocess
    from mlcls.sources import FileRecord
    from mlcls.tag.loader import Loader

    out = os.environ.get("MLCLS_BENCH_DIR", os.path.join(os.path.dirname(HERE), "bench", "out"))  # as throughput.py
    name = f"corpus-{a.images}" if a.corpus_kind == "mixed" else f"corpus-{a.corpus_kind}-{a.images}"
    folder = os.path.join(out, name)
    paths = build_corpus(folder, a.images, kind=a.corpus_kind)
    records = [FileRecord(uri=p, size=os.path.getsize(p)) for p in paths]
    pre = Preprocess()
    for mode in a.modes:
        gpu = GpuJpegDecoder(pre, torch.device("cpu"), backend="torchvision") if mode == "bytes" else None
        loader = Loader(pre, decode_workers=a.workers, gpu_decoder=gpu, processes=True)
        rows = []
        for _ in range(a.passes + 1):
            cpu, main, wall, n = time.process_time(), time.thread_time(), time.perf_counter(), 0
            for batch in loader.batches(records, 64):
                n += len(batch.records)
            rows.append(((time.process_time() - cpu) / n * 1e6, (time.thread_time() - main) / n * 1e6,
                         n / (time.perf_counter() - wall)))
        try:
            loader.close(wait=True)
        except TypeError:  # a checkout from before `close(wait=)`
            loader._pool.shutdown(wait=True, cancel_futures=True)
        med = [statistics.median(r[k] for r in rows[1:]) for k in range(3)]
        print(f"{a.root} {a.corpus_kind} {mode}: feeding process CPU {med[0]:.0f} µs/image (main thread {med[1]:.0f}), "
              f"{med[2]:.0f} images/s with {a.workers} decode process(es)", flush=True)


if __name__ == "__main__":
    main()
