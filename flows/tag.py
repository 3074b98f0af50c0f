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
from dataclasses import asdict
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from flows.logs import route_library_logs
from mlcls import progress
from mlcls.output import parts
from mlcls.tag import job
from mlcls.tag.plan import RunPlan, Shard

SUMMARY_ARTIFACT = "tag-images-summary"
FAILED_ARTIFACT = "tag-images-failed"
FAILED_IMAGES_SHOWN = 1000
SHARD_DEPLOYMENT = "tag-shard/tag-shard"
PROGRESS_LOG_SECONDS = 15.0


@task(name="plan", cache_policy=NONE, retries=1, retry_delay_seconds=5)
def plan_task(source: str | list[str], out: str, model: str | None, options: dict[str, Any], run_id: str,
              storage_options: dict[str, Any] | None) -> RunPlan:
    """List the source, subtract what the output holds, write shard manifests."""
    logger = get_run_logger()
    opts = job.TagOptions.from_dict(options)
    bundle = job.open_run(out, model, opts, storage_options)
    plan = job.plan_run(source, out, bundle, opts, run_id, storage_options)
    logger.info("listed %d images: %d already tagged by %s, %d new in %d shards%s%s", plan.listed, plan.done,
                bundle.model_id, plan.new, len(plan.shards),
                f" ({plan.skipped} non-image files skipped)" if plan.skipped else "",
                f" ({plan.duplicates} repeated URIs listed once)" if plan.duplicates else "")
    return plan


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
    shards_per_run: int = 1,
    max_attempts: int = 3,
) -> dict[str, Any]:
    """Tag every new or changed image of `source` into the Parquet dataset at `out`.

    `model` is a bundle path or URL (default: the embedded demo bundle).
    Images whose rows are `read` errors are always tagged again; with
    `retry_errors`, those with `decode`, `empty` or `too_large` rows too.
    With `fan_out="none"` shards run one after another in this process; with
    `"deployment"` they become flow runs of `shard_deployment`
    (`shards_per_run` shards each) for workers on any machine to pull, and
    runs that fail or crash are submitted again up to `max_attempts` times
    (fan-out needs an output every worker can reach, such as S3). A shard
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
    plan = plan_task(source, out, model, options.to_dict(), run_id, storage_options)
    if fan_out == "deployment" and plan.shards:
        from flows.fanout import fan_out as fan_out_shards

        results, failed = fan_out_shards(plan.shards, deployment=shard_deployment, model=model, out=out,
                                         options=options.to_dict(), run_id=run_id, storage_options=storage_options,
                                         shards_per_run=shards_per_run, max_attempts=max_attempts)
    else:
        results, failed = _run_here(plan, model, out, options, run_id, storage_options)
    bundle = job.get_bundle(model, storage_options)
    summary = job.summarize(plan, results, source=job.describe_source(source), out=out,
                                 model_id=bundle.model_id, seconds=time.perf_counter() - started,
                                 failed_shards=failed)
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


def _run_here(plan: RunPlan, model: str | None, out: str, options: job.TagOptions, run_id: str,
              storage_options: dict[str, Any] | None) -> tuple[list[job.ShardResult], list[str]]:
    """Shards one after another on this process's device."""
    logger = get_run_logger()
    results, failed = [], []
    for shard in plan.shards:
        state = tag_shard_task(shard, model, out, options.to_dict(), run_id, storage_options, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            failed.append(shard.id)
            logger.error("shard %s failed after retries: %s", shard.id, state.message)
    return results, failed


@flow(name="tag-shard", log_prints=False)
def tag_shard(
    shards: list[dict[str, Any]],
    out: str,
    run_id: str,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    device_slot: str | None = None,
) -> list[dict[str, Any]]:
    """Tag shards planned by a `tag-images` run (its fan-out), one after another.

    Holds the global concurrency limit `device_slot` (default
    `mlcls-device-<host>-<gpu>`) while it works, so two runs never share a
    GPU even when several workers serve one box; create that limit with
    `prefect gcl create ... --limit 1` (without it, no limit applies). Each
    shard's result is written next to the data, where the parent reads it.
    """
    route_library_logs()
    opts = job.TagOptions.from_dict(options)
    slot = device_slot or default_device_slot(opts.device)
    results = []
    with concurrency(slot, occupy=1, strict=False):
        for raw in shards:
            shard = Shard(**raw)
            result = tag_shard_task(shard, model, out, opts.to_dict(), run_id, storage_options)
            job.save_shard_result(out, run_id, result, storage_options)
            results.append(asdict(result))
    return results


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


def failed_images_artifact(out: str, run_id: str, storage_options: dict[str, Any] | None) -> None:
    """List the images this run could not tag (read back from the output, capped) in the UI."""
    rows, total = parts.read_errors(out, run_id, FAILED_IMAGES_SHOWN, storage_options)
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
    ]
    rows += [{"item": f"error: {kind}", "value": n} for kind, n in summary.error_kinds.items()]
    rows += [{"item": f"label: {label}", "value": n} for label, n in summary.label_counts.items()]
    return rows


def summary_markdown(summary: job.RunSummary) -> str:
    lines = [f"**{summary.images}** images from `{summary.source}` tagged by `{summary.model}` into "
             f"`{summary.out}`: {summary.tagged} tagged, {summary.errors} errors, "
             f"{summary.images_per_second:.1f} images/s."]
    if summary.error_sample:
        lines.append("\nFailed files (first few):\n")
        lines += [f"- `{uri}`: {error}" for uri, error in summary.error_sample[:10]]
    return "\n".join(lines)
