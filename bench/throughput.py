"""Throughput benchmark: decode only, model only, mlcls end to end, and a plain torch baseline.

    python bench/throughput.py --arch resnet50 --images 1000
    python bench/throughput.py --arch mobilenet_v3_large --images 1000 --variants fp32 draft compile
    python bench/throughput.py --images 1000 --simulate-device 40     # the pipeline's overlap, no model

Every measurement runs in its own process (so each reports its own peak
RSS) over the same corpus (bench/corpus.py), model, input size and batch
size. Rates are steady-state: images after the first batch over the time
after it; start-up (model load, compile, worker start) is reported apart.
Results are printed and appended to bench/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

OUT = os.environ.get("MLCLS_BENCH_DIR", os.path.join(ROOT, "bench", "out"))
VARIANTS = {  # name: TagOptions overrides ("_env": environment for the child instead)
    "fp32": {"draft": False, "precision": "fp32"},
    "draft": {"draft": True, "precision": "fp32"},
    "compile": {"draft": True, "precision": "fp32", "compile": "on"},
    "auto-compile": {"compile": "on"},  # the default with the compile forced: bf16 where the CPU has it
    "gpu-compile": {"draft": True, "precision": "auto", "gpu_decode": 1.0, "compile": "on"},
    "bf16": {"draft": True, "precision": "bf16"},
    "gpu-decode": {"draft": True, "precision": "auto", "gpu_decode": 1.0},
    "gpu-decode-fp32": {"draft": True, "precision": "fp32", "gpu_decode": 1.0},
    "cpu-decode": {"draft": True, "precision": "auto", "gpu_decode": 0.0},
    "hybrid-0.3": {"draft": True, "precision": "auto", "gpu_decode": 0.3},
    "hybrid-0.5": {"draft": True, "precision": "auto", "gpu_decode": 0.5},
    "auto": {},
    "auto-threads": {"decode_pool": "threads"},
    # the default with torch's threads pinned to the cores (OMP_NUM_THREADS): no thread-split probe, as before it
    "auto-all-threads": {"_env": {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}},
    "auto-dataloader": {"decode_pool": "dataloader"},
    # the default with glibc's allocator as it comes (`mlcls.allocator` off): what mlcls ran before it
    "auto-system-malloc": {"_env": {"MLCLS_MALLOC": "system"}},
    # the default without torch's huge pages (`mlcls.allocator.prefer_huge_pages`): what mlcls ran before it
    "auto-no-thp": {"_env": {"THP_MEM_ALLOC_ENABLE": "0"}},
    "draft-threads": {"draft": True, "precision": "fp32", "decode_pool": "threads"},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine() -> dict:
    import torch
    from machine import cpu_name

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def bench_bundle(arch: str, classes: int = 80) -> str:
    """A random-init bundle for `arch` at 224 px (cached)."""
    from mlcls.bundle import create_bundle, load_bundle
    from mlcls.errors import BundleError
    from mlcls.images.preprocess import Preprocess

    path = os.path.join(OUT, "bundles", f"{arch}-{classes}")
    try:
        load_bundle(path)
    except BundleError:
        import torch

        torch.manual_seed(0)
        create_bundle(path, name=f"bench-{arch}", arch=arch, classes=[f"class{i:03d}" for i in range(classes)],
                      preprocess=Preprocess(size=224, resize_size=256))
    return path


# ---------------------------------------------------------------- child modes


class FirstBatchClock:
    """Steady-state timing: starts at the first finished batch, counts the images after it."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.cpu0 = 0.0
        self.images = 0

    def tick(self, n: int) -> None:
        if self.t0 is None:
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        else:
            self.images += n

    def rate(self) -> tuple[int, float]:
        seconds = time.perf_counter() - (self.t0 or time.perf_counter())
        return self.images, seconds

    def main_cpu_us(self) -> float:
        """CPU time of this process (all its threads, not its workers) per image since the clock started:
        on a GPU box the process that feeds the device is the one that can run out of cores."""
        return (time.process_time() - self.cpu0) / max(1, self.images) * 1e6


# Batches run before the model-only clock starts: with freed blocks kept (`mlcls.allocator`) the heap grows over
# the first few batches until freed blocks fit the next ones (resnet50, 4 timed batches after 3: 14.2 img/s model
# only against 18.1 end to end, bench/RESULTS.md).
WARM_BATCHES = 6


def child_model(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from mlcls.bundle import load_bundle
    from mlcls.tag.engine import Engine, resolve_device

    bundle = load_bundle(a.bundle)
    t = time.perf_counter()
    engine = Engine(bundle, resolve_device(a.device), precision=a.precision, compile=a.compile,
                    channels_last=not a.nchw, batch_size=a.batch_size)
    size = bundle.preprocess.size
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (a.batch_size, size, size, 3), dtype=np.uint8))
    if engine.device.type == "cuda":
        x = x.pin_memory()
    for _ in range(WARM_BATCHES):
        engine.probs(x)
    startup = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.iters):
        engine.probs(x)
    seconds = time.perf_counter() - t
    return {"images": a.iters * a.batch_size, "seconds": seconds, "startup": startup}


def child_decode(a: argparse.Namespace) -> dict:
    import torch

    from mlcls.bundle import load_bundle
    from mlcls.images.gpu import GpuJpegDecoder
    from mlcls.sources import iter_source
    from mlcls.tag.engine import resolve_device
    from mlcls.tag.loader import Loader

    bundle = load_bundle(a.bundle)
    device = resolve_device(a.device)
    records = list(iter_source(a.corpus))
    decoder = GpuJpegDecoder(bundle.preprocess, device) if a.gpu_decode else None
    loader = Loader(bundle.preprocess, decode_workers=a.workers, io_workers=8, draft=a.draft, gpu_decoder=decoder,
                    pin_memory=device.type == "cuda", processes=True if a.processes else None,
                    dataloader=a.loader == "dataloader",  # the DataLoader arm: mlcls's own DataLoader mode
                    consumer_decodes=False)  # the workers' rate alone: this loop would otherwise decode too
    clock = FirstBatchClock()
    errors = 0
    for batch in loader.batches(records, a.batch_size):
        order, _ = loader.device_pixels(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        errors += len(batch.records) - len(order)
        clock.tick(len(batch.records))
    images, seconds = clock.rate()
    return {"images": images, "seconds": seconds, "errors": errors, "main_cpu_us": clock.main_cpu_us()}


def simulate_device(ms: float) -> None:
    """Replace the model by a stand-in that takes `ms` per batch and leaves the CPU free.

    With it, end to end can be compared with min(stand-in rate, decode rate):
    a pipeline that overlaps reading, decoding and compute reaches that
    minimum; one that serialises them does not, on any machine. On a CPU the
    stand-in sleeps; on CUDA it spins the GPU for `ms` on the stream the
    forward pass runs on (`torch.cuda._sleep`, its cycles per ms measured
    once), so the host is as free as with a real model's queued kernels.
    """
    import torch

    from mlcls.tag.engine import Engine

    cycles_per_ms: list[float] = []

    def logits(self: Engine, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.is_cuda:
            if not cycles_per_ms:
                cycles_per_ms.append(gpu_cycles_per_ms(pixels.device))
            torch.cuda._sleep(int(ms * cycles_per_ms[0]))
        else:
            time.sleep(ms / 1000)
        return torch.zeros((pixels.shape[0], len(self.bundle.classes)), device=pixels.device)

    Engine.logits = logits


def gpu_cycles_per_ms(device) -> float:
    """How many `torch.cuda._sleep` cycles take a millisecond on `device` (timed with CUDA events)."""
    import torch

    cycles = 10_000_000
    with torch.cuda.device(device):
        torch.cuda._sleep(cycles)  # clocks up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / start.elapsed_time(end)


def child_mlcls(a: argparse.Namespace) -> dict:
    from mlcls import progress
    from mlcls.tag import job

    if a.simulate_device:
        simulate_device(a.simulate_device)

    options = job.TagOptions(batch_size=a.batch_size, device=a.device, shard_size=a.shard_size,
                                  workers=a.workers, **json.loads(a.options))
    table = has_table_layer()
    t = time.perf_counter()
    if table:
        bundle = job.open_run(a.out, a.bundle, options)
    else:
        bundle = job.get_bundle(a.bundle)
        options.validate()
    job.engine_for(bundle, options, images=len(os.listdir(a.corpus)))  # model load and compile: start-up
    clock = FirstBatchClock()
    unsubscribe = progress.subscribe(lambda e: clock.tick(e.count) if e.kind == "images" else None)
    if table:
        summary = job.tag_images(a.corpus, a.out, a.bundle, options)
        errors, total = summary.errors, summary.images
    else:
        errors, total = tag_parts_only(a, bundle, options)
    unsubscribe()
    images, seconds = clock.rate()
    return {"images": images, "seconds": seconds, "startup": time.perf_counter() - t - seconds,
            "errors": errors, "total": total, "table": table, "main_cpu_us": clock.main_cpu_us()}


def has_table_layer() -> bool:
    """Whether deltalake and polars import: the lent GPU machine has neither, and no registry to fetch them."""
    try:
        import deltalake  # noqa: F401
        import polars  # noqa: F401
    except ImportError:
        return False
    return True


def tag_parts_only(a: argparse.Namespace, bundle, options) -> tuple[int, int]:
    """The job's shards without its table: cut the listing, `tag_shard` each, no subtraction, no commit.

    The rate clock runs from the first batch to the last image, so it never
    held the table's open, subtraction or commit; what this leaves out is
    start-up and a commit of one version (bench/RESULTS.md times both).
    """
    from mlcls.sources import iter_source
    from mlcls.tag import job, plan

    run_id = job.new_run_id()
    records = list(iter_source(a.corpus))
    errors = 0
    for i in range(0, len(records), options.shard_size):
        manifest = plan.records_table(records[i:i + options.shard_size])
        shard = plan.write_shard(a.out, run_id, bundle.model_id, manifest)
        errors += job.tag_shard(shard, model=a.bundle, out=a.out, options=options, run_id=run_id).errors
    return errors, len(records)


def child_baseline(a: argparse.Namespace) -> dict:
    """What a user writes without mlcls: Dataset, DataLoader, eager model, pyarrow rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from mlcls.bundle import load_bundle
    from mlcls.sources import iter_source

    bundle = load_bundle(a.bundle)
    pre = bundle.preprocess
    tf = T.Compose([T.Resize(pre.resize_size), T.CenterCrop(pre.size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    paths = [r.uri for r in iter_source(a.corpus)]

    class Folder(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            return tf(Image.open(paths[i]).convert("RGB")), i

    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = bundle.build_model().to(device).eval()
    loader = DataLoader(Folder(), batch_size=a.batch_size, num_workers=a.workers, pin_memory=device.type == "cuda")
    clock = FirstBatchClock()
    uris, probs = [], []
    with torch.no_grad():
        for x, idx in loader:
            p = torch.sigmoid(model(x.to(device))).cpu()
            uris += [paths[i] for i in idx.tolist()]
            probs += p.tolist()
            clock.tick(len(idx))
    images, seconds = clock.rate()
    pq.write_table(pa.table({"uri": uris, "probs": probs}), os.path.join(a.out, "baseline.parquet"))
    return {"images": images, "seconds": seconds}


def child_nvjpeg(a: argparse.Namespace) -> dict:
    """Where GPU decoding spends its time, JPEGs already in memory: the pipeline's decoder (nvImageCodec
    where installed, size-grouped resizes) for the row; torchvision's `decode_jpeg` beside it, split into
    decode and a resize per image."""
    import glob

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from mlcls.bundle import load_bundle
    from mlcls.images.gpu import GpuJpegDecoder

    device = torch.device("cuda")
    decoder = GpuJpegDecoder(load_bundle(a.bundle).preprocess, device)
    paths = sorted(glob.glob(os.path.join(a.corpus, "*.jpg")))[:2048]
    datas = []
    for path in paths:
        with open(path, "rb") as f:
            datas.append(f.read())
    bs = a.batch_size
    batches = [datas[i:i + bs] for i in range(0, len(datas), bs)]
    decoder.decode(batches[0])  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    failed = sum(img is None for batch in batches for img in decoder.decode(batch))
    torch.cuda.synchronize()
    t_pipeline = time.perf_counter() - t

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decode_jpeg(tensors[:bs], mode=ImageReadMode.RGB, device=device)
    torch.cuda.synchronize()
    t = time.perf_counter()
    decoded = [decode_jpeg(tensors[i:i + bs], mode=ImageReadMode.RGB, device=device)
               for i in range(0, len(tensors), bs)]
    torch.cuda.synchronize()
    t_decode = time.perf_counter() - t
    megapixels = sum(img.shape[1] * img.shape[2] for batch in decoded for img in batch) / 1e6
    t = time.perf_counter()
    for batch in decoded:
        torch.stack([decoder.resize_crop(img) for img in batch])
    torch.cuda.synchronize()
    t_resize = time.perf_counter() - t
    return {"images": len(datas), "seconds": t_pipeline, "backend": decoder.backend, "failed": failed,
            "torchvision_decode_s": t_decode, "torchvision_resize_s": t_resize, "megapixels": megapixels}


CHILDREN = {"nvjpeg": child_nvjpeg, "model": child_model, "decode": child_decode, "mlcls": child_mlcls,
            "baseline": child_baseline}


def run_child(mode: str, env: dict[str, str] | None = None, **kw) -> dict:
    args = [sys.executable, os.path.abspath(__file__), "--child", mode]
    for k, v in kw.items():
        if isinstance(v, bool):
            if v:
                args.append(f"--{k.replace('_', '-')}")
        elif v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["rate"] = result["images"] / result["seconds"] if result.get("seconds") else 0.0
    print(f"  {mode}: {result['rate']:.1f} images/s ({json.dumps(result)})", flush=True)
    return result


# ---------------------------------------------------------------- driver


def compare_probs(out_dir: str, baseline_dir: str, classes: int) -> float:
    import numpy as np
    import pyarrow.parquet as pq

    ours = pq.read_table(out_dir).to_pydict()
    theirs = pq.read_table(os.path.join(baseline_dir, "baseline.parquet")).to_pydict()
    base = dict(zip(theirs["uri"], theirs["probs"], strict=True))
    diffs = [np.abs(np.array(list(p.values())) - np.array(base[u])).max()
             for u, p, e in zip(ours["uri"], ours["probs"], ours["error"], strict=True) if e is None and u in base]
    return float(max(diffs)) if diffs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="decode workers (mlcls) and DataLoader workers")
    p.add_argument("--variants", nargs="*", default=["fp32", "draft"], choices=list(VARIANTS))
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["model", "decode", "baseline", "mlcls", "nchw", "no-draft"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--corpus-kind", choices=["mixed", "imagenet"], default="mixed",
                   help="mixed: 320-1600 px, some PNG and grey (default); imagenet: ~500 px JPEGs of ~110 KB")
    p.add_argument("--rounds", type=int, default=1, help="run every measurement this many times, interleaved; "
                   "report medians (use 3 or more on a shared machine)")
    p.add_argument("--decode-ab", type=int, default=0, metavar="ROUNDS",
                   help="only the decode A/B: mlcls's pool (threads, processes) against torch's DataLoader, "
                        "1 and all cores' workers, ROUNDS interleaved rounds, medians")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--simulate-device", type=float, default=0.0, metavar="MS",
                   help="a stand-in model taking MS per batch, CPU left free: measures the pipeline's overlap")
    # child-only
    p.add_argument("--child", choices=list(CHILDREN))
    p.add_argument("--bundle")
    p.add_argument("--corpus")
    p.add_argument("--out")
    p.add_argument("--options", default="{}")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--nchw", action="store_true")
    p.add_argument("--draft", action="store_true")
    p.add_argument("--gpu-decode", action="store_true")
    p.add_argument("--loader", choices=["mlcls", "dataloader"], default="mlcls")
    p.add_argument("--processes", action="store_true", help="mlcls decode pool as processes whatever the count")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"), help="where to append the table")
    p.add_argument("--shard-size", type=int, default=100_000)
    a = p.parse_args()
    if a.child:
        result = CHILDREN[a.child](a)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    drive(a)


def drive(a: argparse.Namespace) -> None:
    from corpus import build_corpus

    info = machine()
    if a.simulate_device:  # the stand-in replaces the model: no model-only or baseline rows
        a.skip = [*a.skip, "model", "baseline"]
    workers = a.workers or max(1, (os.cpu_count() or 2) // 2)
    name = f"corpus-{a.images}" if a.corpus_kind == "mixed" else f"corpus-{a.corpus_kind}-{a.images}"
    corpus = os.path.join(OUT, name)
    t = time.perf_counter()
    build_corpus(corpus, a.images, kind=a.corpus_kind)
    size_kb = sum(e.stat().st_size for e in os.scandir(corpus)) / a.images / 1024
    print(f"corpus: {a.images} {a.corpus_kind} images in {corpus}, {size_kb:.0f} KB each on average "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    bundle = bench_bundle(a.arch)
    if a.decode_ab:
        return decode_ab(a, info, corpus, bundle)
    import statistics

    common = {"bundle": bundle, "batch_size": a.batch_size, "device": a.device}
    rounds = [measure(a, common, corpus, bundle, workers) for _ in range(a.rounds)]
    rows = merge_rounds([r for r, _ in rounds])
    effs = [efficiency(a, r, workers) for r, _ in rounds]
    extra: dict[str, float] = {}
    for key in effs[0]:
        values = sorted(e[key] for e in effs if key in e)
        spread = f" (median of {len(values)} rounds: {values[0]:.2f}-{values[-1]:.2f})" if len(values) > 1 else ""
        extra[key + spread] = statistics.median(values)
    for _, agreement in rounds[:1]:
        extra.update(agreement)
    report(a, info, rows, extra)


def merge_rounds(rounds: list[list[tuple[str, dict]]]) -> list[tuple[str, dict]]:
    """One row per measurement: the median rate over the rounds (each round runs every measurement once)."""
    import statistics

    merged = []
    for name, first in rounds[0]:
        runs = [r for rows in rounds for n, r in rows if n == name and "error" not in r]
        if not runs:
            merged.append((name, first))
            continue
        rates = [r["rate"] for r in runs]
        label = f"{name} (median of {len(rates)}: {min(rates):.1f}-{max(rates):.1f})" if len(rates) > 1 else name
        merged.append((label, {**runs[0], "rate": statistics.median(rates)}))
    return merged


def measure(a: argparse.Namespace, common: dict, corpus: str, bundle: str,
            workers: int) -> tuple[list[tuple[str, dict]], dict[str, float]]:
    """One round: every measurement once, in the same order, so rounds interleave under changing load."""
    import shutil

    print(f"round, load average {loadavg()}", flush=True)
    rows: list[tuple[str, dict]] = []
    if "model" not in a.skip:
        if "nchw" not in a.skip:
            rows.append(("model only, eager NCHW fp32", run_child("model", **common, iters=a.iters, nchw=True)))
        rows.append(("model only, channels_last fp32", run_child("model", **common, iters=a.iters)))
        if "compile" in a.variants:
            precision = "bf16" if a.device == "cuda" else "fp32"
            rows.append((f"model only, compile {precision}", run_child("model", **common, iters=a.iters, compile=True,
                                                                      precision=precision)))
        if "auto-compile" in a.variants:
            rows.append(("model only, compile auto", run_child("model", **common, iters=a.iters, compile=True,
                                                               precision="auto")))
        if "auto" in a.variants:  # the efficiency of the default needs the model at the default's precision
            rows.append(("model only, channels_last auto", run_child("model", **common, iters=a.iters,
                                                                     precision="auto")))
        if "bf16" in a.variants or "gpu-decode" in a.variants:
            rows.append(("model only, bf16 channels_last", run_child("model", **common, iters=a.iters,
                                                                     precision="bf16")))
    if "decode" not in a.skip:
        for draft in (False, True) if "no-draft" not in a.skip else (True,):
            kind = "processes" if workers >= 4 else "threads"
            rows.append((f"decode+preprocess, {workers} {kind}, draft {'on' if draft else 'off'}",
                         run_child("decode", bundle=bundle, corpus=corpus, batch_size=a.batch_size,
                                   workers=workers, draft=draft, device=a.device)))
        if "gpu-decode" in a.variants and a.device != "cpu":  # nvJPEG alone, on CUDA only
            rows.append(("GPU decode + resize only, the pipeline's decoder (2048 JPEGs in memory)",
                         run_child("nvjpeg", bundle=bundle, corpus=corpus, batch_size=a.batch_size)))
            rows.append((f"decode+preprocess on the GPU (nvJPEG), {workers} workers for the rest",
                         run_child("decode", bundle=bundle, corpus=corpus, batch_size=a.batch_size,
                                   workers=workers, draft=True, device=a.device, gpu_decode=True)))
    if a.simulate_device:
        simulated(a, rows, common, corpus, workers)
        return rows, {}
    if "decode" not in a.skip and "model" not in a.skip:
        rows.append(("decode+preprocess, 1 thread, draft on", run_child(
            "decode", bundle=bundle, corpus=corpus, batch_size=a.batch_size, workers=1, draft=True, device=a.device)))
    base_dir = os.path.join(OUT, "run-baseline")
    if "baseline" not in a.skip:
        shutil.rmtree(base_dir, ignore_errors=True)
        os.makedirs(base_dir)
        rows.append((f"baseline (DataLoader, {os.cpu_count()} workers)",
                     # torch's defaults, as a user's script has them (it loads the model through mlcls.bundle,
                     # whose import would otherwise ask for huge pages)
                     run_child("baseline", {"THP_MEM_ALLOC_ENABLE": "0"}, **common, corpus=corpus, out=base_dir,
                               workers=os.cpu_count())))
    agreement = {}
    if "mlcls" not in a.skip:
        for name in a.variants:
            out = os.path.join(OUT, f"run-{name}")
            shutil.rmtree(out, ignore_errors=True)
            options = dict(VARIANTS[name])
            env = options.pop("_env", None)
            r = run_child("mlcls", env, **common, corpus=corpus, out=out, workers=a.workers,
                          options=json.dumps(options))
            rows.append((f"mlcls end to end, {name}", r))
            if name == "fp32" and "baseline" not in a.skip and "error" not in r:
                agreement["max |p - baseline| (fp32, no draft)"] = compare_probs(out, base_dir, 80)
    return rows, agreement


def decode_ab(a: argparse.Namespace, info: dict, corpus: str, bundle: str) -> None:
    """Decode-only rates of the two worker pools, interleaved so that load from elsewhere hits both alike."""
    import statistics

    cores = os.cpu_count() or 1
    arms = {}
    for w in sorted({1, cores}):
        arms[f"mlcls pool, {w} thread(s)"] = {"workers": w}
        arms[f"mlcls pool, {w} process(es) + shared-memory ring"] = {"workers": w, "processes": True}
        arms[f"DataLoader, {w} worker(s)"] = {"workers": w, "loader": "dataloader"}
    got: dict[str, list[dict]] = {k: [] for k in arms}
    names = list(arms)
    for k in range(a.decode_ab):
        print(f"round {k + 1}, load average {loadavg()}", flush=True)
        for name in names[k % len(names):] + names[:k % len(names)]:  # a new order each round: load drifts
            kw = arms[name]
            got[name].append(run_child("decode", bundle=bundle, corpus=corpus, batch_size=a.batch_size,
                                       draft=True, device=a.device, **kw))
    rows = []
    for name, runs in got.items():
        rates = [r["rate"] for r in runs if "error" not in r]
        rows.append((f"decode+preprocess, {name} (median of {len(rates)})",
                     {**(runs[-1] if rates else {"error": "failed"}), "rate": statistics.median(rates) if rates else 0,
                      "images": 1, "seconds": 1}))
    report(a, info, rows, {})


def stand_in_batches(images: int, batch_size: int, shard_size: int) -> int:
    """How many batches a run over `images` makes: each shard ends with a short batch, which the stand-in
    (fixed time a batch, as a GPU's forward pass nearly is) spends the whole MS on."""
    return sum(math.ceil(min(shard_size, images - start) / batch_size) for start in range(0, images, shard_size))


def simulated(a: argparse.Namespace, rows: list[tuple[str, dict]], common: dict, corpus: str, workers: int) -> None:
    """End to end with the stand-in model.

    The stand-in's own rate is taken over the batches the run makes, counted as the end-to-end clock counts
    them (the images after the first batch, over the batches after it): batch / MS for a corpus of whole
    batches, less where short batches take the whole MS (600 images in batches of 64: 536 images in 9 batches).
    """
    batches = stand_in_batches(a.images, a.batch_size, a.shard_size)
    counted = a.images - min(a.images, a.batch_size)
    seconds = max(1, batches - 1) * a.simulate_device / 1000
    rows.append((f"stand-in model only ({a.simulate_device:g} ms a batch, {batches} batches)",
                 {"images": counted, "seconds": seconds, "peak_rss_mb": 0.0, "rate": counted / seconds}))
    out = os.path.join(OUT, "run-simulated")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    rows.append(("mlcls end to end, stand-in model", run_child(
        "mlcls", **common, corpus=corpus, out=out, workers=a.workers, simulate_device=a.simulate_device,
        options=json.dumps(VARIANTS["draft"]))))


def efficiency(a: argparse.Namespace, rows: list[tuple[str, dict]], workers: int) -> dict[str, float]:
    """End to end over what the pipeline could reach in the same run.

    Stand-in model: limit = min(stand-in rate, decode rate). Real model on a
    CPU, where decode and model share the cores: limit = cores / (cores /
    model rate + 1 / decode rate per core), the rate if no core ever waited.
    """
    rate = {name: r.get("rate", 0.0) for name, r in rows if "error" not in r}
    decode = rate.get(f"decode+preprocess, {workers} {'processes' if workers >= 4 else 'threads'}, draft on", 0.0)
    out: dict[str, float] = {}
    if a.simulate_device:
        stand_in = next((v for name, v in rate.items() if name.startswith("stand-in model only")), 0.0)
        limit = min(stand_in, decode)
        e2e = rate.get("mlcls end to end, stand-in model", 0.0)
        if limit and e2e:
            out["pipeline efficiency, stand-in model: e2e / min(stand-in, decode)"] = e2e / limit
        return out
    per_core = rate.get("decode+preprocess, 1 thread, draft on", 0.0)
    cores = os.cpu_count() or 1
    # each end-to-end row against the limit at its own precision and compile setting: fp32 for `draft`, the
    # resolved one for `auto`, the compiled model for `compile`
    compiled = next((name for name in rate if name in ("model only, compile fp32", "model only, compile bf16")), "")
    for variant, model_row in (("draft", "model only, channels_last fp32"), ("auto", "model only, channels_last auto"),
                               ("compile", compiled), ("auto-compile", "model only, compile auto")):
        model = rate.get(model_row, 0.0)
        e2e = {name: r for name, r in rate.items() if name == f"mlcls end to end, {variant}"}
        if not (per_core and model and e2e):
            continue
        limit = cores / (cores / model + 1 / per_core)
        out[f"CPU pipeline limit with '{model_row}', images/s: cores / (cores / model + 1 / decode per core)"] = limit
        for name, r in e2e.items():
            out[f"efficiency of '{name}' against that limit"] = r / limit
    return out


def report(a: argparse.Namespace, info: dict, rows: list[tuple[str, dict]], extra: dict) -> None:
    rate = {name: r.get("rate", 0.0) for name, r in rows}
    base = next((v for k, v in rate.items() if k.startswith("baseline")), 0.0)
    model = next((v for k, v in rate.items() if k.startswith("model only, channels_last")), 0.0)
    lines = ["| measurement | images/s | × baseline | × model-only (channels_last) | start-up s | peak RSS MB "
             "| main process CPU µs/image |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
            continue
        x_base = f"{r['rate'] / base:.2f}" if base else ""
        x_model = f"{r['rate'] / model:.2f}" if model else ""
        startup = f"{r['startup']:.1f}" if "startup" in r else ""
        cpu = f"{r['main_cpu_us']:.0f}" if "main_cpu_us" in r else ""
        lines.append(f"| {name} | {r['rate']:.1f} | {x_base} | {x_model} | {startup} | {r['peak_rss_mb']:.0f} "
                     f"| {cpu} |")
    for k, v in extra.items():
        lines.append(f"\n{k}: {v:.2e}" if k.startswith("max |p") else f"\n{k}: {v:.2f}")
    if any(r.get("table") is False for _, r in rows):
        lines.append("\nmlcls rows: shards tagged to Parquet parts without the Delta table (no deltalake or polars "
                     "on this machine): no subtraction, no commit; the rate clock never held either.")
    cmd = "python bench/throughput.py " + " ".join(sys.argv[1:])
    header = (f"\n### {a.arch}, {a.images} images, batch {a.batch_size}, device {a.device} "
              f"({datetime.now(UTC):%Y-%m-%d})\n\n`{cmd}`\n\nMachine: {info['cpu']}, "
              f"GPU {info['gpu']}, torch {info['torch']} ({info['threads']} threads); load average at the end "
              f"{loadavg()} (1, 5, 15 min)\n\n")
    text = header + "\n".join(lines) + "\n"
    print(text, flush=True)
    if not a.no_record:
        with open(a.results, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
