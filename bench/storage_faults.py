"""Tagging S3 to S3 while the store fails a share of its requests: what faults cost in time, and nothing else.

    python bench/storage_faults.py                      # 300 images, 0%, 10% and 20% faults
    python bench/storage_faults.py --images 500 --rates 0 0.05 0.1 0.2 0.3

Starts a moto S3 server on 127.0.0.1, uploads `--images` small JPEGs (and a
few hostile files that are error rows in any run) to a source bucket, tags
them once directly against moto (the reference), then once per rate through
the fault-injecting proxy of the test suite (`tests/helpers/faults.py`: 503
SlowDown, 500 InternalError, connection resets, bodies cut short, in equal
shares), each into its own output prefix, with the embedded demo bundle and
no Prefect (`mlcls.tag_images`). Prints a Markdown table: requests, faults
injected, wall time, and whether the output (uri, labels, error of every
stored row) equals the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import cpu_name  # noqa: E402
from tests.helpers.faults import fault_proxy  # noqa: E402
from tests.helpers.images import bad_input_catalogue, write_images  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402

HOSTILE = ("truncated.jpg", "zero-byte.jpg", "text-named.jpg")


def rows(out: str, storage_options: dict) -> list[tuple]:
    """(uri, labels, error) of every stored row, sorted: what must not depend on the faults."""
    from mlcls.output.reader import OutputTable

    df = OutputTable.open(out, storage_options).scan().select("uri", "labels", "error").collect()
    return sorted((r["uri"], tuple(r["labels"] or ()), r["error"]) for r in df.iter_rows(named=True))


def upload(endpoint: str, n: int, bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    fs.mkdir("out")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "src"
        write_images(folder, n)
        bad_input_catalogue(Path(tmp) / "bad")
        for name in HOSTILE:
            (folder / name).write_bytes((Path(tmp) / "bad" / name).read_bytes())
        fs.put(str(folder) + "/", f"{bucket}/photos/", recursive=True)


def tag(source: str, out: str, storage_options: dict, shard_size: int) -> float:
    from mlcls.tag.job import TagOptions, tag_images

    started = time.perf_counter()
    summary = tag_images(source, out, None, TagOptions(shard_size=shard_size), storage_options=storage_options)
    if summary.failed_shards:
        raise SystemExit(f"{out}: shards failed: {summary.failed_shards}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        upload(endpoint, args.images, "src")
        direct = {"endpoint_url": endpoint}
        source = "s3://src/photos"
        reference_seconds = tag(source, "s3://out/reference", direct, args.shard_size)
        reference = rows("s3://out/reference", direct)
        print(f"{len(reference)} images ({args.images} photos, {len(HOSTILE)} hostile files), shards of "
              f"{args.shard_size}, demo bundle, CPU; reference run straight to moto: {reference_seconds:.1f} s\n")
        print("| faults | requests | faults injected | wall s | images/s | output equals the fault-free run |")
        print("| ---: | ---: | --- | ---: | ---: | --- |")
        for rate in args.rates:
            with fault_proxy(endpoint, rate=rate, seed=args.seed) as proxy:
                out = f"s3://out/rate-{rate:g}"
                seconds = tag(source, out, {"endpoint_url": proxy.url}, args.shard_size)
            same = rows(out, direct) == reference
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(proxy.injected.items())) or "none"
            print(f"| {rate:.0%} | {proxy.requests} | {sum(proxy.injected.values())} ({kinds}) | {seconds:.1f} | "
                  f"{len(reference) / seconds:.1f} | {'yes' if same else 'NO'} |")
    finally:
        server.stop()
    print(f"\n{cpu_name()}, "
          f"{datetime.now(UTC).strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
