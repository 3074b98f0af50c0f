"""Fan-out end to end: a real `prefect server`, deployments from deployments/prefect.yaml, two process
workers, source and output on a moto S3 server; one worker is killed with SIGKILL mid-slot, after it
tagged a shard and before it tagged all of its own.

The slowest test of the suite (about two minutes): most of it is Prefect marking the killed worker's
run Crashed from its missing heartbeats (the automation of flows/setup.py, here with a 45 s window).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import polars as pl
import pytest

from tests.helpers.images import write_images
from tests.helpers.net import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHARD_DEPLOYMENT = "tag-shard/tag-shard"


class Processes:
    """Background processes, each in its own session so a kill reaches its children too."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def kill_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def log(self, name: str, tail: int = 3000) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-tail:]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Processes]]:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the env that reaches it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    procs = Processes(home)
    server = procs.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port)], {**os.environ, **env})
    try:
        deadline = time.monotonic() + 180
        while not _healthy(api):
            assert server.poll() is None, f"prefect server exited:\n{procs.log('server')}"
            assert time.monotonic() < deadline, f"prefect server not healthy in 180 s:\n{procs.log('server')}"
            time.sleep(1)
        yield env, procs
    finally:
        procs.kill_all()


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}" \
                                 f"\n{done.stderr[-3000:]}"
    return done.stdout


def _set_up_server(env: dict[str, str]) -> None:
    """What the README's 'Running at scale' says to do once: pools and the zombie automation."""
    prefect = str(BIN / "prefect")
    setup = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for cmd in ([prefect, "--no-prompt", "work-pool", "create", "mlcls-gpu", "--type", "process"],
                         [prefect, "--no-prompt", "work-pool", "create", "mlcls-control", "--type", "process"],
                         [sys.executable, "-m", "flows.setup", "--within", "45"])]
    for p in setup:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]


def _deploy(env: dict[str, str]) -> None:
    deployed = _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                     "--all"], env)
    assert "tag-shard/tag-shard" in deployed and "tag-images/nightly" in deployed, deployed[-3000:]


def _start_worker(procs: Processes, name: str, env: dict[str, str], cwd: Path) -> None:
    """A process worker with one slot, run from a folder without the project: flows come from the package."""
    procs.start(name, [str(BIN / "prefect"), "worker", "start", "--pool", "mlcls-gpu", "--name", name, "--limit", "1"],
                env, cwd=cwd)


def _shard_runs(client) -> list:
    from prefect.client.schemas.filters import FlowRunFilter

    deployment = client.read_deployment_by_name(SHARD_DEPLOYMENT)
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment.id]}))


def _worker(run) -> str:
    return (run.labels or {}).get("prefect.worker.name", "")


def _kill_mid_slot(procs: Processes, client, parent: subprocess.Popen, victim: str, s3, runs_dir: str) -> object:
    """SIGKILL `victim` (worker and its slot run's process) once its slot run has tagged a shard."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and parent.poll() is None:
        running = [r for r in _shard_runs(client) if _worker(r) == victim and r.state and r.state.is_running()]
        if running and _slot_results(s3, runs_dir, running[0].parameters["slot"]):
            procs.kill(victim)
            return client.read_flow_run(running[0].id)
        time.sleep(0.2)
    pytest.fail(f"{victim} never tagged a shard of its slot; parent rc={parent.poll()}\n{procs.log('parent')}")


def _slot_results(s3, runs_dir: str, slot: int, slots: int = 2) -> list[str]:
    """The shards of slot `slot` (published as stream/<seq>.json) whose results are recorded."""
    s3.invalidate_cache()
    streams = [p for p in s3.glob(f"{runs_dir}/*/stream/*.json") if not p.endswith("end.json")]
    mine = {json.loads(s3.cat(p))["id"] for p in streams if int(p.rsplit("/", 1)[1][:-5]) % slots == slot}
    results = {p.rsplit("/", 1)[1][:-5] for p in s3.glob(f"{runs_dir}/*/results/*.json")}
    return sorted(mine & results)


def test_fan_out_to_two_workers_survives_a_killed_worker(tmp_path, tiny_bundle, s3, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server_env, procs = prefect_server
    env = {**os.environ, **server_env}
    src, out, models = s3.buckets["src"], s3.buckets["out"], s3.buckets["models"]
    for p in write_images(tmp_path / "local", 25, seed=11):
        s3.put(str(p), f"{src}/photos/{p.name}")
    s3.pipe(f"{src}/photos/broken.jpg", b"not a jpeg at all")
    s3.put(tiny_bundle + "/", f"{models}/tiny/", recursive=True)
    _set_up_server(env)
    for name in ("worker-a", "worker-b"):
        _start_worker(procs, name, env, tmp_path)
    _deploy(env)

    parent = procs.start("parent", [str(BIN / "mlcls"), "tag", f"s3://{src}/photos", "--out", f"s3://{out}/tags",
                                    "--model", f"s3://{models}/tiny", "--shard-size", "2", "--batch-size", "2",
                                    "--fan-out", "deployment", "-q"], env)
    with temporary_settings({PREFECT_API_URL: server_env["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:
        victim = _kill_mid_slot(procs, client, parent, "worker-b", s3, f"{out}/tags/_mlcls/runs")
        _start_worker(procs, "worker-b", env, tmp_path)  # the machine comes back
        assert parent.wait(timeout=300) == 0, procs.log("parent")
        runs = _shard_runs(client)
        _print_table(runs)
        _assert_runs(client, runs, victim)
        _assert_cron_scheduled(client)
        _assert_artifacts(client)
    _assert_output(s3, src, out, n_images=26)
    assert "tagged 25 of 26 new images" in procs.log("parent"), procs.log("parent")

    # the next night: three new images in the bucket; only they are tagged
    for p in write_images(tmp_path / "new", 3, seed=12, prefix="new"):
        s3.put(str(p), f"{src}/photos/{p.name}")
    again = _run([str(BIN / "mlcls"), "tag", f"s3://{src}/photos", "--out", f"s3://{out}/tags", "--model",
                  f"s3://{models}/tiny", "--shard-size", "4", "--fan-out", "deployment", "-q"], env, timeout=300)
    assert "tagged 3 of 3 new images" in again and "26 already tagged" in again, again
    _assert_output(s3, src, out, n_images=29)


def _assert_runs(client, runs: list, victim) -> None:
    completed = [r for r in runs if r.state.is_completed()]
    workers = {_worker(r) for r in completed}
    # worker-a's slot run completes there; the killed run's redo goes to whichever worker is free first
    assert "worker-a" in workers and workers <= {"worker-a", "worker-b"}, workers
    crashed = client.read_flow_run(victim.id)
    assert crashed.state.type.value == "CRASHED", f"the killed run must end Crashed, not {crashed.state}"
    redo = [r for r in completed if r.parameters["slot"] == victim.parameters["slot"]]
    assert len(redo) == 1 and redo[0].id != victim.id, "the killed run's slot is run again, once"
    assert sorted(r.parameters["slot"] for r in completed) == [0, 1]  # each slot completed exactly once
    warm = [_slot_log(client, r) for r in completed if r.id != redo[0].id]
    assert len(warm) == 1 and warm[0][0] >= 6 and warm[0][1] == 1, \
        f"the slot run that was never killed tagged its 6-7 shards with one engine build: {warm}"
    tagged, builds = _slot_log(client, redo[0])
    assert builds == 1 and 1 <= tagged < 7  # the redo tags only what the killed run left


def _slot_log(client, run) -> tuple[int, int]:
    """(shards tagged, engines built) from a slot run's closing log line."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    found = [re.search(r"(\d+) shards tagged, \d+ already done; engines built in this process: (\d+)", log.message)
             for log in logs]
    found = [m for m in found if m]
    assert found, f"no closing line in the logs of {run.name}: {[log.message for log in logs][-10:]}"
    return int(found[-1].group(1)), int(found[-1].group(2))


def _assert_artifacts(client) -> None:
    """The parent's artifacts: which worker ran each shard group, and the file it could not read."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.fanout import RUNS_ARTIFACT
    from flows.tag import FAILED_ARTIFACT

    def latest(key: str):
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        assert found, f"no {key} artifact"
        return str(found[0].data)

    runs = latest(RUNS_ARTIFACT)
    assert "worker-a" in runs and "worker-b" in runs and "crashed@worker-b" in runs
    assert "broken.jpg" in latest(FAILED_ARTIFACT)


def _assert_cron_scheduled(client) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    nightly = client.read_deployment_by_name("tag-images/nightly")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    deadline = time.monotonic() + 60
    while True:
        scheduled = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id={"any_": [nightly.id]}, state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=["SCHEDULED"]))))
        if scheduled or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert scheduled, "the nightly cron deployment has no scheduled runs"
    assert all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in scheduled)


def _assert_output(s3, src: str, out: str, n_images: int) -> None:
    from deltalake import DeltaTable

    opts = {"aws_endpoint_url": os.environ["AWS_ENDPOINT_URL"], "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing", "aws_region": "us-east-1", "aws_allow_http": "true"}
    df = pl.read_delta(f"s3://{out}/tags", storage_options=opts)  # the table's current version
    listed = {f"s3://{k}" for k in s3.find(f"{src}/photos")}
    assert df.height == n_images and set(df["uri"]) == listed, "exactly one row per image"
    errors = df.filter(pl.col("error").is_not_null())
    assert errors["uri"].to_list() == [f"s3://{src}/photos/broken.jpg"]
    s3.invalidate_cache()  # this client listed the output before the last run
    con = duckdb.connect()
    con.register_filesystem(s3)
    files = DeltaTable(f"s3://{out}/tags", storage_options=opts).file_uris()
    rows, uris = con.execute(f"select count(*), count(distinct uri) from read_parquet({files})").fetchone()
    assert rows == uris == n_images


def _print_table(runs: list) -> None:
    """The flow-run table (shown with `pytest -s`; quoted in the closing note)."""
    print(f"\n{'flow run':<34} {'worker':<9} {'state':<10} {'slot':<20} seconds")
    for r in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
        print(f"{r.name[:34]:<34} {_worker(r):<9} {r.state.type.value:<10} {r.parameters['slot']:<20} "
              f"{r.total_run_time.total_seconds():.1f}")
