"""The tagging job as steps: open, plan, tag each shard, finish.

Each step is a plain function with small, serialisable inputs and outputs,
so `flows/` can wrap each in a Prefect task (retries, logs, artifacts) and
`tag()` can run them all in-process where there is no Prefect (a notebook, a
GPU box with only torch, the benchmarks). Models, engines and decode pools
are cached per process: many shards pay their start-up once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mlcls import progress
from mlcls.bundle import Bundle, load_bundle, resolve_model
from mlcls.errors import OptionError
from mlcls.images.decode import DEFAULT_MAX_PIXELS
from mlcls.images.gpu import GpuJpegDecoder, resizes_on_device
from mlcls.output.commit import CommitResult, adopt, commit_parts, ensure_table
from mlcls.output.parts import ProbsMode, build_table, file_metadata, part_name, schema, write_part
from mlcls.output.table import check_output
from mlcls.storage import StorageOptions, join, list_dir, read_file, url_to_fs, write_atomic
from mlcls.tag.compiling import check_compiler, parse_compile, should_compile
from mlcls.tag.engine import PRECISIONS, Engine, Pending, get_engine, has_engine, resolve_device
from mlcls.tag.loader import POOLS, Loader, default_decode_workers, default_pool
from mlcls.tag.plan import RunPlan, Shard, iter_shards, read_shard, remove_manifests, run_dir
from mlcls.tag.threads import ThreadBalance, user_pinned_threads

_ERROR_SAMPLE = 20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagOptions:
    """Knobs of a tagging run; every field has a default that works."""

    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None
    io_workers: int | None = None
    shard_size: int = 5000
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True
    probs: str = "all"
    precision: str = "auto"
    compile: str = "auto"  # auto, on or off (`mlcls.tag.compiling.should_compile`); booleans mean on/off
    gpu_decode: float = 1.0
    retry_errors: bool = False  # tag again files with decode/empty/too_large error rows (`read` rows always are)
    decode_pool: str = "auto"  # threads, processes, dataloader; auto: `mlcls.tag.loader.default_pool`

    def validate(self) -> TagOptions:
        """Raise `OptionError` for a value that cannot work; return self."""
        for name in ("batch_size", "shard_size", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        for name in ("workers", "io_workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if not isinstance(self.gpu_decode, (int, float)) or not 0.0 <= self.gpu_decode <= 1.0:
            raise OptionError(f"--gpu-decode must be a share between 0 and 1, not {self.gpu_decode!r}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        try:
            object.__setattr__(self, "compile", parse_compile(self.compile))
        except ValueError as err:
            raise OptionError(str(err)) from None
        if self.decode_pool not in ("auto", *POOLS):
            raise OptionError(f"decode pool {self.decode_pool!r}: use auto or one of {', '.join(POOLS)}")
        if not isinstance(self.retry_errors, bool):
            raise OptionError(f"--retry-errors is on or off, not {self.retry_errors!r}")
        ProbsMode.parse(self.probs)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TagOptions:
        d = d or {}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise OptionError(f"unknown tagging options: {', '.join(sorted(unknown))}")
        return cls(**d).validate()


@dataclass
class ShardResult:
    """What one shard did; small, so a Prefect task can return it."""

    shard: str
    images: int = 0
    tagged: int = 0
    errors: int = 0
    seconds: float = 0.0
    part: str = ""
    label_counts: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_sample: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RunSummary:
    """The whole run, as shown to the user and written to `_mlcls/runs/<run id>/summary.json`."""

    run_id: str
    source: str
    out: str
    model: str
    listed: int = 0
    already_done: int = 0
    new: int = 0
    images: int = 0
    tagged: int = 0
    errors: int = 0
    shards: int = 0
    failed_shards: list[str] = field(default_factory=list)
    version: int | None = None  # the output table's version that holds this run's rows
    superseded: int = 0  # older rows of re-tagged images that left the table's current version
    seconds: float = 0.0
    tag_seconds: float = 0.0
    label_counts: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_sample: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Steady-state rate: images over the time spent in shards (start-up excluded)."""
        return self.images / self.tag_seconds if self.tag_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d


def new_run_id() -> str:
    """Sortable by time, unique across machines."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


_BUNDLES: dict[tuple, Bundle] = {}
_LOADERS: dict[tuple, Loader] = {}
_CACHE_LOCK = threading.Lock()


def get_bundle(model: str | None, storage_options: StorageOptions = None) -> Bundle:
    """Load a bundle once per process; reloaded if its files change (size, mtime or etag)."""
    url = resolve_model(model)
    try:
        fs, base = url_to_fs(url, storage_options)
        infos = tuple(sorted((k, str(v)) for p in list_dir(fs, base, detail=True)  # as stored now, not cached
                             for k, v in p.items() if k in ("name", "size", "mtime", "ETag", "LastModified")))
    except (OSError, ValueError):
        infos = ()
    key = (url, infos)
    with _CACHE_LOCK:
        if infos and key in _BUNDLES:
            return _BUNDLES[key]
    bundle = load_bundle(url, storage_options)
    with _CACHE_LOCK:
        _BUNDLES[key] = bundle
    return bundle


def get_loader(bundle: Bundle, options: TagOptions, engine: Engine, *, remote: bool,
               storage_options: StorageOptions = None) -> Loader:
    """One decode pool per process and configuration; remote files get more reads in flight."""
    device_type = engine.device.type
    workers = options.workers or default_decode_workers(device_type)
    io_workers = options.io_workers or (32 if remote else 8)
    wants_gpu = device_type == "cuda" and options.gpu_decode > 0
    gpu = wants_gpu and resizes_on_device(bundle.preprocess)
    pool = default_pool(workers) if options.decode_pool == "auto" else options.decode_pool
    key = (bundle.preprocess, options.batch_size, workers, io_workers, options.max_pixels, options.draft, pool,
           str(engine.device), options.gpu_decode if gpu else 0.0,
           json.dumps(storage_options or {}, sort_keys=True, default=str))
    with _CACHE_LOCK:
        loader = _LOADERS.get(key)
        if loader is None:
            if wants_gpu and not gpu:
                log.warning("the bundle's %s resize has no GPU implementation: its images decode on the CPU",
                            bundle.preprocess.interpolation)
            loader = _LOADERS[key] = Loader(
                bundle.preprocess, decode_workers=workers, io_workers=io_workers, max_pixels=options.max_pixels,
                draft=options.draft, storage_options=storage_options, pin_memory=device_type == "cuda",
                gpu_decoder=GpuJpegDecoder(bundle.preprocess, engine.device) if gpu else None,
                gpu_share=options.gpu_decode, ring_images=max(1024, 4 * options.batch_size),
                processes=pool == "processes", dataloader=pool == "dataloader")
        return loader


def engine_for(bundle: Bundle, options: TagOptions, images: int = 0) -> Engine:
    """The process-wide engine for these options; `--compile auto` compiles when `images` make it pay.

    A compiled engine this process already has is used whatever `images`
    says: its compile is paid. Compiled engines pad every batch to one size.
    """
    device = resolve_device(options.device)
    compiled = dict(precision=options.precision, compile=True, batch_size=options.batch_size)
    if should_compile(options.compile, device.type, images) or (
            options.compile == "auto" and has_engine(bundle, options.device, **compiled)):
        engine = get_engine(bundle, options.device, **compiled)
    else:
        engine = get_engine(bundle, options.device, precision=options.precision, compile=False, batch_size=None)
    with _CACHE_LOCK:
        _ENGINES_SEEN.add(id(engine))
    return engine


_ENGINES_SEEN: set[int] = set()


def engines_built() -> int:
    """How many engines this process has built for shards: a warm worker logs it to show it built one."""
    with _CACHE_LOCK:
        return len(_ENGINES_SEEN)


def open_run(out: str, model: str | None, options: TagOptions,
             storage_options: StorageOptions = None) -> Bundle:
    """Check everything that can be checked before any work: options, bundle, output.

    An output written before mlcls kept a Delta table becomes one here, its
    files committed as they are, so the plan subtracts what it holds; a new
    output starts as an empty table.
    """
    options.validate()
    if options.compile == "on":
        check_compiler(resolve_device(options.device).type)
    bundle = get_bundle(model, storage_options)
    mode = ProbsMode.parse(options.probs)
    check_output(out, bundle.classes, mode, storage_options)
    adopt(out, storage_options)
    ensure_table(out, schema(bundle.classes, mode), storage_options)
    return bundle


def plan_run(source: str | Sequence[str], out: str, bundle: Bundle, options: TagOptions, run_id: str,
             storage_options: StorageOptions = None, limit: int | None = None) -> RunPlan:
    """List and subtract all of it before returning; emits `planned` with the number of images to tag."""
    plan, shards = stream_run(source, out, bundle, options, run_id, storage_options, limit)
    for _ in shards:
        pass
    return plan


def stream_run(source: str | Sequence[str], out: str, bundle: Bundle, options: TagOptions, run_id: str,
               storage_options: StorageOptions = None, limit: int | None = None) -> tuple[RunPlan, Iterator[Shard]]:
    """The plan's running totals, and its shards as the listing produces them (`planned` emitted at the end).

    Consume the iterator while tagging: the first shard starts while a long
    listing goes on, and only the shards' ids and counts are held in memory.
    """
    plan = RunPlan(run_id=run_id)

    def shards() -> Iterator[Shard]:
        yield from iter_shards(source, out, bundle.model_id, plan, shard_size=options.shard_size,
                               storage_options=storage_options, limit=limit, retry_errors=options.retry_errors)
        progress.emit(progress.Event("planned", total=plan.new))

    return plan, shards()


def tag_shard(shard: Shard, *, model: str | None, out: str, options: TagOptions, run_id: str,
              storage_options: StorageOptions = None) -> ShardResult:
    """Tag one shard's files and write its part file; image failures become error rows."""
    started = time.perf_counter()
    bundle = get_bundle(model, storage_options)
    records = read_shard(shard, storage_options)
    engine = engine_for(bundle, options, images=max(len(records), _PLANNED[0]))
    remote = bool(records) and "://" in records[0].uri
    loader = get_loader(bundle, options, engine, remote=remote, storage_options=storage_options)
    probs = np.zeros((len(records), len(bundle.classes)), dtype=np.float32)
    decoded = _infer(records, loader, engine, options.batch_size, probs, shard.id)
    mode = ProbsMode.parse(options.probs)
    meta = file_metadata(model_id=bundle.model_id, digest=bundle.digest, classes=bundle.classes,
                         thresholds=bundle.thresholds, mode=mode)
    table = build_table(records, decoded, probs, classes=bundle.classes, thresholds=engine.thresholds,
                        mode=mode, model_id=bundle.model_id, run_id=run_id,
                        tagged_at=datetime.now(UTC), metadata=meta)
    part = write_part(out, part_name(shard.id, run_id), table, storage_options)
    result = _shard_result(shard, records, decoded, probs >= engine.thresholds, bundle.classes)
    result.part, result.seconds = part, time.perf_counter() - started
    progress.emit(progress.Event("shard_done", count=len(records), errors=result.errors, shard=shard.id))
    return result


def _infer(records: list, loader: Loader, engine: Engine, batch_size: int, probs: np.ndarray,
           shard_id: str) -> list:
    """Decode and run the shard's batches, filling `probs` in place; returns every record's decode result."""
    decoded: list = []
    in_flight: list[tuple[list[int], Pending]] = []  # one batch on the device while the next is prepared
    balance = thread_balance(engine, loader, -(-len(records) // batch_size))
    try:
        for index, batch in enumerate(loader.batches(records, batch_size, window=balance.window)):
            start = len(decoded)
            order, pixels = loader.device_pixels(batch, engine.device)
            with balance.batch(index, len(order), batch.ahead):
                in_flight.append(([start + i for i in order], engine.submit(pixels)))
            if len(in_flight) > 1:
                _collect(probs, *in_flight.pop(0))
            decoded.extend(batch.decoded)  # after device_pixels: a GPU decode failure is replaced by the CPU's
            failed = len(batch.decoded) - len(order)
            progress.emit(progress.Event("images", count=len(batch.decoded), errors=failed, shard=shard_id))
        for rows, pending in in_flight:
            _collect(probs, rows, pending)
    finally:
        balance.close()
    return decoded


def thread_balance(engine: Engine, loader: Loader, batches: int) -> ThreadBalance:
    """Probe torch's threads beside the decode threads on a CPU engine (`threads.py`); elsewhere leave them."""
    if engine.device.type != "cpu" or loader.processes or loader.dataloader \
            or user_pinned_threads():
        return ThreadBalance.off()
    balance = ThreadBalance(engine.threads_chosen, engine.base_threads, loader.decode_workers,
                            loader.decode_clock, batches, pause=loader.decode_paused)
    engine.warm_threads(balance.thread_counts())  # a compiled engine's graphs, before the probe times them
    return balance


_PLANNED = [0]  # images the last plan in this process counted: the work `--compile auto` weighs


def _note_planned(event: progress.Event) -> None:
    if event.kind == "planned":
        _PLANNED[0] = event.total


progress.subscribe(_note_planned)


def _collect(probs: np.ndarray, rows: list[int], pending: Pending) -> None:
    if rows:
        probs[rows] = pending.result()


def _shard_result(shard: Shard, records, decoded, hits: np.ndarray, classes) -> ShardResult:
    ok = np.array([d.error is None for d in decoded], dtype=bool)
    counts = hits[ok].sum(axis=0) if ok.any() else np.zeros(len(classes), dtype=int)
    errors = [(r.uri, d.error) for r, d in zip(records, decoded, strict=True) if d.error]
    return ShardResult(
        shard=shard.id, images=len(records), tagged=int(ok.sum()), errors=len(errors),
        label_counts={c: int(n) for c, n in zip(classes, counts, strict=True)},
        error_kinds=dict(Counter(e.split(":", 1)[0] for _, e in errors)),
        error_sample=errors[:_ERROR_SAMPLE],
    )


def save_shard_result(out: str, run_id: str, result: ShardResult, storage_options: StorageOptions = None) -> None:
    """Record a shard's result next to the data, where a fan-out parent on any machine can read it."""
    fs, base = url_to_fs(run_dir(out, run_id), storage_options)
    write_atomic(fs, join(base, "results", f"{result.shard}.json"), json.dumps(asdict(result)).encode())


def load_shard_results(out: str, run_id: str, shard_ids: Sequence[str],
                       storage_options: StorageOptions = None) -> dict[str, ShardResult]:
    """The recorded results of these shards (missing ones are left out); each checked as JSON when read."""
    fs, base = url_to_fs(run_dir(out, run_id), storage_options)
    found = {}
    for sid in shard_ids:
        try:
            d = read_file(fs, join(base, "results", f"{sid}.json"), json.loads)
        except FileNotFoundError:
            continue
        d["error_sample"] = [tuple(e) for e in d.get("error_sample", [])]
        found[sid] = ShardResult(**d)
    return found


def summarize(plan: RunPlan, results: Sequence[ShardResult], *, source: str, out: str, model_id: str,
              seconds: float, failed_shards: Sequence[str] = (), committed: CommitResult | None = None) -> RunSummary:
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for r in results:
        labels.update(r.label_counts)
        kinds.update(r.error_kinds)
    return RunSummary(
        run_id=plan.run_id, source=source, out=out, model=model_id, listed=plan.listed,
        already_done=plan.done, new=plan.new, images=sum(r.images for r in results),
        tagged=sum(r.tagged for r in results), errors=sum(r.errors for r in results),
        shards=len(plan.shards), failed_shards=list(failed_shards), seconds=seconds,
        tag_seconds=sum(r.seconds for r in results), label_counts=dict(labels.most_common()),
        error_kinds=dict(kinds), error_sample=[e for r in results for e in r.error_sample][:_ERROR_SAMPLE],
        version=committed.version if committed else None, superseded=committed.superseded if committed else 0,
    )


def commit_run(out: str, run_id: str, results: Sequence[ShardResult],
               storage_options: StorageOptions = None) -> CommitResult:
    """Add the shards' parts to the output table in one commit (a retried commit that had landed does nothing)."""
    return commit_parts(out, run_id, [r.part for r in results if r.part], storage_options)


def finish_run(summary: RunSummary, storage_options: StorageOptions = None) -> None:
    """Write the run's summary next to the data and drop its shard manifests (nothing for an empty run)."""
    if summary.shards == 0:
        return
    fs, base = url_to_fs(run_dir(summary.out, summary.run_id), storage_options)
    write_atomic(fs, join(base, "summary.json"), json.dumps(summary.to_dict(), indent=2).encode())
    if not summary.failed_shards:
        remove_manifests(summary.out, summary.run_id, storage_options)


def tag_images(source: str | Sequence[str], out: str, model: str | None = None, options: TagOptions | None = None,
        storage_options: StorageOptions = None, run_id: str | None = None) -> RunSummary:
    """The whole job in this process, without Prefect: the same steps the flow runs."""
    started = time.perf_counter()
    options = options or TagOptions()
    run_id = run_id or new_run_id()
    bundle = open_run(out, model, options, storage_options)
    plan, shards = stream_run(source, out, bundle, options, run_id, storage_options)
    results = [tag_shard(s, model=model, out=out, options=options, run_id=run_id,
                         storage_options=storage_options) for s in shards]
    committed = commit_run(out, run_id, results, storage_options)
    summary = summarize(plan, results, source=describe_source(source), out=out, model_id=bundle.model_id,
                        seconds=time.perf_counter() - started, committed=committed)
    finish_run(summary, storage_options)
    return summary


def describe_source(source: str | Sequence[str]) -> str:
    if isinstance(source, str):
        return source
    digest = hashlib.sha1("\n".join(source).encode()).hexdigest()[:8]
    return f"<{len(source)} URIs {digest}>"
