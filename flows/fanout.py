"""Fan shards out as flow runs of the `tag-shard` deployment, and wait for them.

Prefect is the distributed engine: each group of shards becomes a flow run
of a deployment in a work pool, and whichever worker (on whichever machine)
pulls it does the work. The parent only submits, watches states and
re-submits what failed or crashed, a bounded number of times. Re-submitting is
always safe: a shard's part file is named by its content, so a second run of
the same shard overwrites its own part instead of adding rows.

A run whose machine died stays `Running` until Prefect marks it `Crashed`;
`flows/setup.py` creates the automation that does so from missing flow-run
heartbeats (Prefect's documented zombie detection). A run a worker claimed
but never started (`Pending` for STUCK_PENDING_SECONDS) is marked `Crashed`
here, and submitted again like any other.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
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
from mlcls.tag import job
from mlcls.tag.plan import Shard

RETRY_STATES = {"FAILED", "CRASHED", "CANCELLED"}
STUCK_PENDING_SECONDS = 600.0
RUNS_ARTIFACT = "tag-images-shard-runs"
WORKER_LABEL = "prefect.worker.name"


@dataclass
class Group:
    """Shards that travel together in one flow run, and that run's history."""

    index: int
    shards: list[Shard]
    attempt: int = 0
    flow_run_id: Any = None
    state: str = "PENDING"
    worker: str = ""
    history: list[str] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)
    queued_at: datetime | None = None

    def row(self) -> dict[str, Any]:
        """One line of the shard-runs table artifact."""
        return {"group": self.index, "shards": " ".join(s.id for s in self.shards),
                "images": sum(s.count for s in self.shards), "state": self.state, "worker": self.worker,
                "attempts": self.attempt + 1, "earlier": " ".join(self.history), "flow_run": str(self.flow_run_id)}


def fan_out(shards: list[Shard], *, deployment: str, model: str | None, out: str, options: dict[str, Any],
            run_id: str, storage_options: dict[str, Any] | None, shards_per_run: int = 1, max_attempts: int = 3,
            poll_seconds: float = 3.0) -> tuple[list[job.ShardResult], list[str]]:
    """Run every shard through `deployment`; return the shards' results and the ids of those that failed."""
    check_deployment(deployment)
    groups = [Group(i, shards[k:k + shards_per_run]) for i, k in enumerate(range(0, len(shards), shards_per_run))]
    common = {"model": model, "out": out, "options": options, "run_id": run_id, "storage_options": storage_options}
    for g in groups:
        _submit(g, deployment, common, run_id)
    results: dict[str, job.ShardResult] = {}
    watch = _Watch(groups, max_attempts, lambda g: _submit(g, deployment, common, run_id),
                   lambda g: results.update(_report_done(g, out, run_id, storage_options)))
    artifact = create_progress_artifact(0.0, description=f"shards done of {len(shards)} (fanned out)")
    with get_client(sync_client=True) as client:
        while not watch.finished():
            time.sleep(poll_seconds)
            watch.poll(client)
            update_progress_artifact(artifact, 100.0 * watch.shards_done() / max(1, len(shards)))
    create_table_artifact(key=RUNS_ARTIFACT, table=[g.row() for g in groups],
                          description=f"{len(groups)} tag-shard flow runs of {deployment}")
    missing = [s.id for s in shards if s.id not in results]  # groups given up on may have finished some
    results.update(job.load_shard_results(out, run_id, missing, storage_options))
    return [results[s.id] for s in shards if s.id in results], [s.id for s in shards if s.id not in results]


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
    """The parent's view of its groups: states from the API, re-submission, completion."""

    def __init__(self, groups: list[Group], max_attempts: int, resubmit, on_done) -> None:
        self.groups, self.max_attempts = groups, max_attempts
        self.resubmit, self.on_done = resubmit, on_done
        self.done: set[int] = set()
        self.failed: set[int] = set()
        self.logger = get_run_logger()

    def finished(self) -> bool:
        return len(self.done) + len(self.failed) == len(self.groups)

    def shards_done(self) -> int:
        return sum(len(self.groups[i].shards) for i in self.done)

    def poll(self, client: SyncPrefectClient) -> None:
        active = [g for g in self.groups if g.index not in self.done | self.failed]
        runs = {r.id: r for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[g.flow_run_id for g in active])))}
        for g in active:
            run = runs.get(g.flow_run_id)
            if run is not None and self._stuck(g, run):
                client.set_flow_run_state(run.id, Crashed(message="claimed by a worker that never started it"),
                                          force=True)
                run = client.read_flow_run(run.id)
            self._update(g, run)

    def _stuck(self, g: Group, run: FlowRun) -> bool:
        """A run a worker claimed (Pending) but never started: that worker died before launching it."""
        return (g.state == "PENDING" and run.state is not None and run.state.type.value == "PENDING"
                and time.monotonic() - g.since > STUCK_PENDING_SECONDS)

    def _update(self, g: Group, run: FlowRun | None) -> None:
        state = run.state.type.value if run and run.state else "PENDING"
        g.worker = (run.labels or {}).get(WORKER_LABEL, g.worker) if run else g.worker
        if state != g.state:
            self.logger.info("shard group %d (attempt %d): %s -> %s on %s", g.index, g.attempt + 1, g.state, state,
                             g.worker or "?")
            g.state, g.since = state, time.monotonic()
        if state == "COMPLETED":
            self.done.add(g.index)
            self.on_done(g)
        elif state in RETRY_STATES:
            g.history.append(f"{state.lower()}@{g.worker or '?'}")
            if g.attempt + 1 < self.max_attempts:
                self.logger.warning("shard group %d %s; submitting it again (attempt %d of %d)", g.index,
                                    state.lower(), g.attempt + 2, self.max_attempts)
                g.attempt += 1
                self.resubmit(g)
            else:
                self.logger.error("shard group %d %s %d times; giving up on it", g.index, state.lower(),
                                  self.max_attempts)
                self.failed.add(g.index)


def _submit(g: Group, deployment: str, common: dict[str, Any], run_id: str) -> None:
    """Create the group's flow run; a re-submission keeps the first one's place in the queue."""
    g.queued_at = g.queued_at or datetime.now(UTC)
    run = run_deployment(
        deployment,
        parameters={"shards": [asdict(s) for s in g.shards], **common},
        timeout=0,
        scheduled_time=g.queued_at,
        idempotency_key=f"{run_id}:{g.index}:{g.attempt}",
        flow_run_name=f"tag-shard-{g.shards[0].id}" + (f"-retry{g.attempt}" if g.attempt else ""),
    )
    g.flow_run_id, g.state, g.worker, g.since = run.id, "SCHEDULED", "", time.monotonic()


def _report_done(g: Group, out: str, run_id: str,
                 storage_options: dict[str, Any] | None) -> dict[str, job.ShardResult]:
    """Read a finished group's results and tell local listeners (the CLI's progress bar) what it tagged."""
    found = job.load_shard_results(out, run_id, [s.id for s in g.shards], storage_options)
    for result in found.values():
        progress.emit(progress.Event("images", count=result.images, errors=result.errors, shard=result.shard))
    return found
