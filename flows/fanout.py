"""Fan a run out to warm slot runs of the `tag-shard` deployment, and watch them.

Prefect is the distributed engine: the parent submits `slots` flow runs of a
deployment in a work pool (by default one per online worker of that pool),
and whichever worker (on whichever machine) pulls one runs it. Each slot run
is a single process that tags shard after shard (slot `i` of `n` takes shards
`i, i + n, ...` as the planner publishes them, `mlcls/tag/stream.py`), so the
process start, the model and the decode pool are paid once per slot, not per
shard, and the first shards are tagged while the listing goes on.

The parent plans here, publishing each shard as soon as its manifest is
written; submits a slot's run when the slot's first shard exists; watches
states and submits a slot again when its run failed or crashed, a bounded
number of times. A redone slot skips the shards whose results are recorded
and tags the rest: a shard's part file is named by its content, so a shard
killed half-way is written again in place, never twice.

A run whose machine died stays `Running` until Prefect marks it `Crashed`;
`flows/setup.py` creates the automation that does so from missing flow-run
heartbeats (Prefect's documented zombie detection). A run a worker claimed
but never started (`Pending` for STUCK_PENDING_SECONDS) is marked `Crashed`
here, and submitted again like any other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from mlcls import progress
from mlcls.errors import MlclsError
from mlcls.tag import job, stream
from mlcls.tag.plan import Shard

RETRY_STATES = {"FAILED", "CRASHED", "CANCELLED"}
STUCK_PENDING_SECONDS = 600.0
RUNS_ARTIFACT = "tag-images-shard-runs"
WORKER_LABEL = "prefect.worker.name"


@dataclass
class Slot:
    """One slot of the run (shards `index`, `index + slots`, ...) and the history of its flow runs."""

    index: int
    shards: list[Shard] = field(default_factory=list)
    tagged: int = 0  # how many of `shards` have a recorded result
    attempt: int = 0
    flow_run_id: Any = None
    state: str = "PENDING"
    worker: str = ""
    history: list[str] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)
    queued_at: datetime | None = None

    def row(self) -> dict[str, Any]:
        """One line of the shard-runs table artifact."""
        return {"slot": self.index, "shards": len(self.shards), "images": sum(s.count for s in self.shards),
                "state": self.state, "worker": self.worker, "attempts": self.attempt + 1,
                "earlier": " ".join(self.history), "flow_run": str(self.flow_run_id)}


def fan_out(shards: Iterable[Shard], *, deployment: str, model: str | None, out: str, options: dict[str, Any],
            run_id: str, storage_options: dict[str, Any] | None, slots: int = 0, max_attempts: int = 3,
            poll_seconds: float = 3.0) -> tuple[list[job.ShardResult], list[str]]:
    """Tag `shards` (consumed as they come) in slot runs of `deployment`; return results and failed shard ids.

    `slots` = 0: one slot per online worker of the deployment's pool (at least one).
    """
    slots = slots or online_workers(deployment)
    common = {"model": model, "out": out, "options": options, "run_id": run_id,
              "storage_options": storage_options, "slots": slots}
    table: list[Slot] = []
    results: dict[str, job.ShardResult] = {}
    logger = get_run_logger()
    watch = _Watch(table, max_attempts, lambda s: _submit(s, deployment, common, run_id),
                   lambda s: results.update(_collect(s, out, run_id, storage_options)))
    last_poll, error = time.monotonic(), None
    stream.clear(out, run_id, storage_options)
    with get_client(sync_client=True) as client:
        try:
            for seq, shard in enumerate(shards):
                stream.publish(out, run_id, seq, shard, storage_options)
                if seq < slots:
                    table.append(Slot(seq))
                    _submit(table[-1], deployment, common, run_id)
                table[seq % slots].shards.append(shard)
                if time.monotonic() - last_poll > poll_seconds:
                    watch.poll(client)
                    last_poll = time.monotonic()
        except BaseException as err:
            error = str(err) or type(err).__name__
            raise
        finally:  # the slots stop after what was published, even when the planner failed
            count = sum(len(s.shards) for s in table)
            stream.publish_end(out, run_id, count, error, storage_options)
        logger.info("%d shards published to %d slot runs of %s", count, len(table), deployment)
        artifact = create_progress_artifact(0.0, description=f"shards done of {count} (fanned out)")
        while not watch.finished():
            time.sleep(poll_seconds)
            watch.poll(client)
            update_progress_artifact(artifact, 100.0 * len(results) / max(1, count))
    create_table_artifact(key=RUNS_ARTIFACT, table=[s.row() for s in table],
                          description=f"{len(table)} tag-shard slot runs of {deployment}")
    every = [sh for s in table for sh in s.shards]
    results.update(job.load_shard_results(out, run_id, [sh.id for sh in every if sh.id not in results],
                                          storage_options))
    failed = [sh.id for sh in every if sh.id not in results]
    if not failed:
        stream.clear(out, run_id, storage_options)
    return [results[sh.id] for sh in every if sh.id in results], failed


def online_workers(deployment: str) -> int:
    """How many workers of the deployment's pool are online now (at least 1): one slot each."""
    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
        if not pool:
            return 1
        workers = client.read_workers_for_work_pool(pool)
    return max(1, sum(1 for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"))


def check_deployment(name: str) -> None:
    """Fail before submitting anything when the shard deployment does not exist."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise MlclsError(f"deployment {name!r} not found on the Prefect API; deploy it first "
                             "(prefect deploy --prefect-file deployments/prefect.yaml --all) or pass "
                             "shard_deployment=<flow>/<deployment>") from None


class _Watch:
    """The parent's view of its slot runs: states from the API, re-submission, completion."""

    def __init__(self, slots: list[Slot], max_attempts: int, resubmit, on_progress) -> None:
        self.slots, self.max_attempts = slots, max_attempts
        self.resubmit, self.on_progress = resubmit, on_progress
        self.done: set[int] = set()
        self.failed: set[int] = set()
        self.logger = get_run_logger()

    def finished(self) -> bool:
        return len(self.done) + len(self.failed) == len(self.slots)

    def poll(self, client: SyncPrefectClient) -> None:
        active = [s for s in self.slots if s.index not in self.done | self.failed]
        runs = {r.id: r for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[s.flow_run_id for s in active])))}
        for s in active:
            self.on_progress(s)
            run = runs.get(s.flow_run_id)
            if run is not None and self._stuck(s, run):
                client.set_flow_run_state(run.id, Crashed(message="claimed by a worker that never started it"),
                                          force=True)
                run = client.read_flow_run(run.id)
            self._update(s, run)

    def _stuck(self, s: Slot, run: FlowRun) -> bool:
        """A run a worker claimed (Pending) but never started: that worker died before launching it."""
        return (s.state == "PENDING" and run.state is not None and run.state.type.value == "PENDING"
                and time.monotonic() - s.since > STUCK_PENDING_SECONDS)

    def _update(self, s: Slot, run: FlowRun | None) -> None:
        state = run.state.type.value if run and run.state else "PENDING"
        s.worker = (run.labels or {}).get(WORKER_LABEL, s.worker) if run else s.worker
        if state != s.state:
            self.logger.info("slot %d (attempt %d): %s -> %s on %s", s.index, s.attempt + 1, s.state, state,
                             s.worker or "?")
            s.state, s.since = state, time.monotonic()
        if state == "COMPLETED":
            self.on_progress(s)
            self.done.add(s.index)
        elif state in RETRY_STATES:
            s.history.append(f"{state.lower()}@{s.worker or '?'}")
            if s.attempt + 1 < self.max_attempts:
                self.logger.warning("slot %d %s after %d of its %d shards; submitting it again (attempt %d of %d)",
                                    s.index, state.lower(), s.tagged, len(s.shards), s.attempt + 2,
                                    self.max_attempts)
                s.attempt += 1
                self.resubmit(s)
            else:
                self.logger.error("slot %d %s %d times; giving up on its %d untagged shards", s.index,
                                  state.lower(), self.max_attempts, len(s.shards) - s.tagged)
                self.failed.add(s.index)


def _submit(s: Slot, deployment: str, common: dict[str, Any], run_id: str) -> None:
    """Create the slot's flow run; a re-submission keeps the first one's place in the queue."""
    s.queued_at = s.queued_at or datetime.now(UTC)
    run = run_deployment(
        deployment,
        parameters={"slot": s.index, **common},
        timeout=0,
        scheduled_time=s.queued_at,
        idempotency_key=f"{run_id}:{s.index}:{s.attempt}",
        flow_run_name=f"tag-shard-{run_id[:8]}-slot{s.index}" + (f"-retry{s.attempt}" if s.attempt else ""),
    )
    s.flow_run_id, s.state, s.worker, s.since = run.id, "SCHEDULED", "", time.monotonic()


def _collect(s: Slot, out: str, run_id: str, storage_options: dict[str, Any] | None) -> dict[str, job.ShardResult]:
    """The slot's newly recorded results (it tags in order), told to local listeners (the CLI's bar)."""
    found: dict[str, job.ShardResult] = {}
    while s.tagged < len(s.shards):
        got = job.load_shard_results(out, run_id, [s.shards[s.tagged].id], storage_options)
        if not got:
            break
        found.update(got)
        s.tagged += 1
    for result in found.values():
        progress.emit(progress.Event("images", count=result.images, errors=result.errors, shard=result.shard))
    return found
