"""The `tag-images` and `tag-shard` flows: the library's job steps as Prefect tasks.

Thin by design: every step is a call into `mlcls.tag.job`. Prefect adds
what it is for: typed parameters, retries per shard, logs, artifacts, the
run in the UI, and (with `fan_out="deployment"`) the distribution of shards
to workers on any number of machines (see `flows/fanout.py`). Tasks take and
return small values (a shard's id and manifest URL, a per-shard summary);
models and clients stay in the per-process caches of the library, never in
task inputs.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from flows.logs import route_library_logs
from mlcls import progress
from mlcls.output import table
from mlcls.tag import job, stream
from mlcls.tag.plan import RunPlan, Shard

SUMMARY_ARTIFACT = "tag-images-summary"
FAILED_ARTIFACT = "tag-images-failed"
FAILED_IMAGES_SHOWN = 1000
SHARD_DEPLOYMENT = "tag-shard/tag-shard"
PROGRESS_LOG_SECONDS = 15.0


@task(name="open", cache_policy=NONE, retries=1, retry_delay_seconds=5)
def open_task(out: str, model: str | None, options: dict[str, Any], storage_options: dict[str, Any] | None) -> str:
    """Check options, bundle and output before any work; return the model id."""
    return job.open_run(out, model, job.TagOptions.from_dict(options), storage_options).model_id


def log_plan(plan: RunPlan, model_id: str) -> None:
    get_run_logger().info(
        "listed %d images: %d already tagged by %s, %d new in %d shards%s%s", plan.listed, plan.done, model_id,
        plan.new, len(plan.shards), f" ({plan.skipped} non-image files skipped)" if plan.skipped else "",
        f" ({plan.duplicates} repeated URIs listed once)" if plan.duplicates else "")


@task(name="tag-shard", task_run_name="tag-shard-{shard.id}", cache_policy=NONE, retries=2,
      retry_delay_seconds=10)
def tag_shard_task(shard: Shard, model: str | None, out: str, options: dict[str, Any], run_id: str,
                   storage_options: dict[str, Any] | None) -> job.ShardResult:
    """Tag one shard and write its part file. Unreadable images are rows, not failures."""
    logger = get_run_logger()
    with _progress_logs(logger, shard):
        result = job.tag_shard(shard, model=model, out=out, options=job.TagOptions.from_dict(options),
                                    run_id=run_id, storage_options=storage_options)
    rate = result.images / result.seconds if result.seconds else 0.0
    logger.info("shard %s: %d images, %d errors, %.1f s, %.1f images/s -> %s", shard.id, result.images,
                result.errors, result.seconds, rate, result.part)
    for uri, error in result.error_sample:
        logger.warning("could not tag %s: %s", uri, error)
    return result


@task(name="commit", cache_policy=NONE, retries=3, retry_delay_seconds=5)
def commit_task(out: str, run_id: str, results: list[job.ShardResult],
                storage_options: dict[str, Any] | None) -> job.CommitResult:
    """Add the run's parts to the output's Delta table in one commit; a retry after a landed commit does nothing."""
    committed = job.commit_run(out, run_id, results, storage_options)
    get_run_logger().info("output table version %s: %d part files added, %d superseded rows left it",
                          committed.version, committed.added, committed.superseded)
    return committed


@flow(name="tag-images", log_prints=False)
def tag_images(
    source: str | list[str],
    out: str,
    model: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    shard_size: int = 5000,
    workers: int | None = None,
    max_pixels: int = job.DEFAULT_MAX_PIXELS,
    probs: str = "all",
    precision: str = "auto",
    draft: bool = True,
    gpu_decode: float = 1.0,
    compile: str | bool = "auto",
    retry_errors: bool = False,
    storage_options: dict[str, Any] | None = None,
    fan_out: Literal["none", "deployment"] = "none",
    shard_deployment: str = SHARD_DEPLOYMENT,
    slots: int = 0,
    max_attempts: int = 3,
) -> dict[str, Any]:
    """Tag every new or changed image of `source` into the Parquet dataset at `out`.

    `model` is a bundle path or URL (default: the embedded demo bundle).
    Images whose rows are `read` errors are always tagged again; with
    `retry_errors`, those with `decode`, `empty` or `too_large` rows too.
    Shards are tagged as the listing produces them. With `fan_out="none"`
    they run one after another in this process; with `"deployment"` they go to
    `slots` long-lived flow runs of `shard_deployment` (0: one per online
    worker of its pool) for workers on any machine to pull, each tagging shard
    after shard in one warm process; slot runs that fail or crash are
    submitted again up to `max_attempts` times and redo only their untagged
    shards (fan-out needs an output every worker can reach, such as S3). A shard
    that still fails does not stop the others; the run fails at the end,
    naming it. Returns the run summary.
    """
    started = time.perf_counter()
    route_library_logs()
    logger = get_run_logger()
    options = job.TagOptions(batch_size=batch_size, device=device, shard_size=shard_size, workers=workers,
                                  max_pixels=max_pixels, probs=probs, precision=precision, draft=draft,
                                  gpu_decode=gpu_decode, compile=compile, retry_errors=retry_errors).validate()
    run_id = flow_run.get_id() or job.new_run_id()
    model_id = open_task(out, model, options.to_dict(), storage_options)
    if fan_out == "deployment":
        from flows.fanout import check_deployment

        check_deployment(shard_deployment)
    bundle = job.get_bundle(model, storage_options)
    plan, shards = job.stream_run(source, out, bundle, options, run_id, storage_options)
    if fan_out == "deployment":
        from flows.fanout import fan_out as fan_out_shards

        results, failed = fan_out_shards(shards, deployment=shard_deployment, model=model, out=out,
                                         options=options.to_dict(), run_id=run_id, storage_options=storage_options,
                                         slots=slots, max_attempts=max_attempts)
    else:
        results, failed = _run_here(shards, model, out, options, run_id, storage_options)
    committed = commit_task(out, run_id, results, storage_options)
    log_plan(plan, model_id)
    summary = job.summarize(plan, results, source=job.describe_source(source), out=out,
                                 model_id=model_id, seconds=time.perf_counter() - started,
                                 failed_shards=failed, committed=committed)
    job.finish_run(summary, storage_options)
    if plan.shards:
        create_table_artifact(key=SUMMARY_ARTIFACT, table=summary_table(summary),
                              description=summary_markdown(summary))
    if summary.errors:
        failed_images_artifact(out, run_id, storage_options)
    logger.info("%d new images: %d tagged, %d errors, %.1f images/s", summary.new, summary.tagged,
                summary.errors, summary.images_per_second)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(plan.shards)} shards failed ({', '.join(failed[:5])}); "
                           "their images are not in the output; run again to retry them")
    return summary.to_dict()


def _run_here(shards: Iterable[Shard], model: str | None, out: str, options: job.TagOptions, run_id: str,
              storage_options: dict[str, Any] | None) -> tuple[list[job.ShardResult], list[str]]:
    """Shards one after another on this process's device, as the planner cuts them."""
    logger = get_run_logger()
    results, failed = [], []
    for shard in shards:
        state = tag_shard_task(shard, model, out, options.to_dict(), run_id, storage_options, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            failed.append(shard.id)
            logger.error("shard %s failed after retries: %s", shard.id, state.message)
    return results, failed


@flow(name="tag-shard", log_prints=False)
def tag_shard(
    out: str,
    run_id: str,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    slot: int = 0,
    slots: int = 1,
    shards: list[dict[str, Any]] | None = None,
    device_slot: str | None = None,
) -> dict[str, Any]:
    """Tag slot `slot` of `slots` of a `tag-images` run (its fan-out): shard after shard, in this process.

    Follows the run's published shards (`mlcls/tag/stream.py`) until its
    planner ends, or tags the given `shards`. Skips shards whose results are
    recorded (a redone slot tags only what its crashed run left), writes each
    shard's result next to the data, where the parent reads it, and fails at
    the end if a shard failed, so that the parent submits the slot again.
    The model, engine and decode pool are built once for all of them.
    Holds the global concurrency limit `device_slot` (default
    `mlcls-device-<host>-<gpu>`) while it works, so two runs never share a
    GPU even when several workers serve one box; create that limit with
    `prefect gcl create ... --limit 1` (without it, no limit applies).
    """
    route_library_logs()
    logger = get_run_logger()
    opts = job.TagOptions.from_dict(options)
    todo = ([Shard(**raw) for raw in shards] if shards is not None
            else stream.follow(out, run_id, slot, slots, storage_options))
    timing = _ShardTiming()
    done, skipped, failed = 0, 0, []
    with concurrency(device_slot or default_device_slot(opts.device), occupy=1, strict=False), timing:
        for shard in todo:
            if job.load_shard_results(out, run_id, [shard.id], storage_options):
                skipped += 1
                continue
            state = tag_shard_task(shard, model, out, opts.to_dict(), run_id, storage_options, return_state=True)
            if not state.is_completed():
                failed.append(shard.id)
                continue
            job.save_shard_result(out, run_id, state.result(), storage_options)
            done += 1
    logger.info("slot %d of %d: %d shards tagged, %d already done; engines built in this process: %d; "
                "between shards %s", slot, slots, done, skipped, job.engines_built(), timing.describe())
    if failed:
        raise RuntimeError(f"{len(failed)} shards failed ({', '.join(failed[:5])}); the slot is redone")
    return {"slot": slot, "tagged": done, "skipped": skipped, "engines_built": job.engines_built(),
            "gaps": timing.gaps, "overhead": timing.overhead()}


class _ShardTiming:
    """Per-shard overhead on a warm process: from one shard's last batch to the next shard's first batch.

    Measured between `images` events, each sent when a batch is done: a gap
    holds the next shard's first batch as well, so the median time between
    batches within a shard is reported beside it and taken off.
    """

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.batches: list[float] = []
        self.last: tuple[str | None, float] | None = None  # (shard, when its latest batch was done)
        self.lock = threading.Lock()

    def __call__(self, event: progress.Event) -> None:
        if event.kind != "images":
            return
        now = time.perf_counter()
        with self.lock:
            if self.last is not None:
                (self.batches if self.last[0] == event.shard else self.gaps).append(round(now - self.last[1], 3))
            self.last = (event.shard, now)

    def overhead(self) -> float | None:
        """Median gap between shards less the median batch: the time no batch was being worked on."""
        if not self.gaps:
            return None
        return max(0.0, _median(self.gaps) - (_median(self.batches) if self.batches else 0.0))

    def describe(self) -> str:
        if not self.gaps:
            return "n/a"
        return (f"median {_median(self.gaps):.2f} s (max {max(self.gaps):.2f} s over {len(self.gaps)} gaps) "
                f"of which a batch {_median(self.batches) if self.batches else 0.0:.2f} s: overhead "
                f"{self.overhead():.2f} s")

    def __enter__(self) -> _ShardTiming:
        self.unsubscribe = progress.subscribe(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


def default_device_slot(device: str) -> str:
    """One name per accelerator: host and first visible GPU (or `cpu`)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    kind = "cpu" if device == "cpu" else f"gpu{gpu}"
    return f"mlcls-device-{socket.gethostname()}-{kind}"


class _progress_logs:
    """Log a shard's progress (images done, images/s) every PROGRESS_LOG_SECONDS while it runs."""

    def __init__(self, logger: Any, shard: Shard) -> None:
        self.logger, self.shard = logger, shard
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.lock = threading.Lock()

    def __call__(self, event: progress.Event) -> None:
        if event.kind != "images" or event.shard != self.shard.id:
            return
        with self.lock:
            self.done += event.count
            now = time.perf_counter()
            if now - self.last >= PROGRESS_LOG_SECONDS:
                self.last = now
                self.logger.info("shard %s: %d/%d images, %.1f images/s", self.shard.id, self.done,
                                 self.shard.count, self.done / (now - self.started))

    def __enter__(self) -> _progress_logs:
        self.unsubscribe = progress.subscribe(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def failed_images_artifact(out: str, run_id: str, storage_options: dict[str, Any] | None) -> None:
    """List the images this run could not tag (read back from the output, capped) in the UI."""
    rows, total = table.read_errors(out, run_id, FAILED_IMAGES_SHOWN, storage_options)
    more = f" (the first {len(rows)}; all are rows with an `error` in the dataset)" if total > len(rows) else ""
    create_table_artifact(key=FAILED_ARTIFACT, table=[{"uri": u, "error": e} for u, e in rows],
                          description=f"**{total}** images could not be tagged{more}.")


def summary_table(summary: job.RunSummary) -> list[dict[str, Any]]:
    """Rows for the UI: totals first, then one row per label."""
    rows: list[dict[str, Any]] = [
        {"item": "images", "value": summary.images},
        {"item": "tagged", "value": summary.tagged},
        {"item": "errors", "value": summary.errors},
        {"item": "already tagged (skipped)", "value": summary.already_done},
        {"item": "images/s", "value": round(summary.images_per_second, 1)},
        {"item": "output table version", "value": summary.version},
        {"item": "superseded rows (re-tagged images)", "value": summary.superseded},
    ]
    rows += [{"item": f"error: {kind}", "value": n} for kind, n in summary.error_kinds.items()]
    rows += [{"item": f"label: {label}", "value": n} for label, n in summary.label_counts.items()]
    return rows


def summary_markdown(summary: job.RunSummary) -> str:
    lines = [f"**{summary.images}** images from `{summary.source}` tagged by `{summary.model}` into "
             f"`{summary.out}`: {summary.tagged} tagged, {summary.errors} errors, "
             f"{summary.images_per_second:.1f} images/s; Delta table version {summary.version}."]
    if summary.error_sample:
        lines.append("\nFailed files (first few):\n")
        lines += [f"- `{uri}`: {error}" for uri, error in summary.error_sample[:10]]
    return "\n".join(lines)
