"""The library's own log records (loggers under `mlcls`) in a flow run's logs on a real Prefect API."""

from __future__ import annotations

import logging
import time
import warnings

import pytest

from tests.helpers.training import one_torch_thread, write_shapes

pytestmark = pytest.mark.slow


def _run_logs(flow_run_id, wanted: int, timeout: float = 20.0) -> list:
    """The flow run's logs from the API, once `wanted` of them (or the timeout) have arrived: they go in batches."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if len([g for g in logs if g.name.startswith("mlcls.")]) >= wanted or time.monotonic() > deadline:
                return logs
            time.sleep(0.5)


def test_library_log_records_reach_the_flow_runs_logs(tmp_path, prefect_api, monkeypatch):
    from prefect.logging.handlers import APILogHandler

    from flows.logs import route_library_logs
    from flows.train import train_bundle

    monkeypatch.delenv("PREFECT_LOGGING_EXTRA_LOGGERS", raising=False)  # the flow's own routing, not the setting
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))  # weights="auto": a warning, random init
    labels = write_shapes(tmp_path / "data", n=48)
    with one_torch_thread():
        state = train_bundle(labels=str(labels), out=str(tmp_path / "bundle"), arch="mobilenet_v3_small",
                             weights="auto", epochs=1, batch_size=16, size=32, resize_size=36, device="cpu",
                             return_state=True)
    assert state.is_completed(), state.message
    logs = _run_logs(state.state_details.flow_run_id, wanted=4)
    ours: dict[tuple[str, int], list[str]] = {}
    for g in logs:
        if g.name.startswith("mlcls."):
            ours.setdefault((g.name, g.level), []).append(g.message)
            assert g.task_run_id  # logged in the train task, linked to it
    assert "no torchvision weights for mobilenet_v3_small" in ours[("mlcls.train.weights", logging.WARNING)][0]
    plan, images = ours[("mlcls.train.train_job", logging.INFO)]
    assert plan == "mobilenet_v3_small, 6 classes, random init" and images.startswith("36 training images")
    schedule, epoch = ours[("mlcls.train.trainer", logging.INFO)]
    assert schedule.startswith("1 epochs of 3 steps") and epoch.startswith("epoch 1/1  loss ")

    route_library_logs()  # once per process, whatever the number of flows
    assert sum(isinstance(h, APILogHandler) for h in logging.getLogger("mlcls").handlers) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logging.getLogger("mlcls.test").info("outside any run: dropped by the handler's filter, no warning")
