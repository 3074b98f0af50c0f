"""The `tag-images` flow: the library's job steps as Prefect tasks.

Thin by design: every step is a call into `mlcls.pipeline`. Prefect adds
what it is for: typed parameters, retries per shard, logs, a summary
artifact, and the run in the UI. Tasks take and return small values (a
shard's id and manifest URL, a per-shard summary); models and clients stay in
the per-process caches of the library, never in task inputs.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from mlcls import pipeline
from mlcls.shards import Plan, Shard

SUMMARY_ARTIFACT = "tag-images-summary"


@task(name="plan", cache_policy=NONE, retries=1, retry_delay_seconds=5)
def plan_task(source: str | list[str], out: str, model: str | None, options: dict[str, Any], run_id: str,
              storage_options: dict[str, Any] | None) -> Plan:
    """List the source, subtract what the output holds, write shard manifests."""
    logger = get_run_logger()
    opts = pipeline.TagOptions.from_dict(options)
    bundle = pipeline.open_run(out, model, opts, storage_options)
    plan = pipeline.plan_run(source, out, bundle, opts, run_id, storage_options)
    logger.info("listed %d images: %d already tagged by %s, %d new in %d shards%s", plan.listed, plan.done,
                bundle.model_id, plan.new, len(plan.shards),
                f" ({plan.skipped} non-image files skipped)" if plan.skipped else "")
    return plan


@task(name="tag-shard", task_run_name="tag-shard-{shard.id}", cache_policy=NONE, retries=2,
      retry_delay_seconds=10)
def tag_shard_task(shard: Shard, model: str | None, out: str, options: dict[str, Any], run_id: str,
                   storage_options: dict[str, Any] | None) -> pipeline.ShardResult:
    """Tag one shard and write its part file. Unreadable images are rows, not failures."""
    logger = get_run_logger()
    result = pipeline.tag_shard(shard, model=model, out=out, options=pipeline.TagOptions.from_dict(options),
                                run_id=run_id, storage_options=storage_options)
    rate = result.images / result.seconds if result.seconds else 0.0
    logger.info("shard %s: %d images, %d errors, %.1f s, %.1f images/s -> %s", shard.id, result.images,
                result.errors, result.seconds, rate, result.part)
    for uri, error in result.error_sample[:5]:
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
    max_pixels: int = pipeline.DEFAULT_MAX_PIXELS,
    probs: str = "all",
    precision: str = "auto",
    draft: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tag every new or changed image of `source` into the Parquet dataset at `out`.

    `model` is a bundle path or URL (default: the embedded demo bundle).
    Shards run one after another on this process's device; a failed shard is
    retried, and if it still fails the others finish and the run fails at the
    end, naming it. Returns the run summary.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    options = pipeline.TagOptions(batch_size=batch_size, device=device, shard_size=shard_size, workers=workers,
                                  max_pixels=max_pixels, probs=probs, precision=precision, draft=draft).validate()
    run_id = flow_run.get_id() or pipeline.new_run_id()
    plan = plan_task(source, out, model, options.to_dict(), run_id, storage_options)
    results, failed = [], []
    for shard in plan.shards:
        state = tag_shard_task(shard, model, out, options.to_dict(), run_id, storage_options, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            failed.append(shard.id)
            logger.error("shard %s failed after retries: %s", shard.id, state.message)
    bundle = pipeline.get_bundle(model, storage_options)
    summary = pipeline.summarize(plan, results, source=pipeline.describe_source(source), out=out,
                                 model_id=bundle.model_id, seconds=time.perf_counter() - started,
                                 failed_shards=failed)
    pipeline.finish_run(summary, storage_options)
    if plan.shards:
        create_table_artifact(key=SUMMARY_ARTIFACT, table=summary_table(summary),
                              description=summary_markdown(summary))
    logger.info("%d new images: %d tagged, %d errors, %.1f images/s", summary.new, summary.tagged,
                summary.errors, summary.images_per_second)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(plan.shards)} shards failed ({', '.join(failed[:5])}); "
                           "their images are not in the output; run again to retry them")
    return summary.to_dict()


def summary_table(summary: pipeline.RunSummary) -> list[dict[str, Any]]:
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


def summary_markdown(summary: pipeline.RunSummary) -> str:
    lines = [f"**{summary.images}** images from `{summary.source}` tagged by `{summary.model}` into "
             f"`{summary.out}`: {summary.tagged} tagged, {summary.errors} errors, "
             f"{summary.images_per_second:.1f} images/s."]
    if summary.error_sample:
        lines.append("\nFailed files (first few):\n")
        lines += [f"- `{uri}`: {error}" for uri, error in summary.error_sample[:10]]
    return "\n".join(lines)
