"""Shared fixtures (helpers live in tests/helpers): small bundles, a real S3 server, a real Prefect API."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from tests.helpers.net import free_port

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")














@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init mobilenet_v3_small bundle at 64 px, 4 classes: fast to load and run."""
    import torch
    import torchvision

    from mlcls.bundle import save_bundle
    from mlcls.images.preprocess import Preprocess

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=4)
    save_bundle(str(out), name="tiny", arch="mobilenet_v3_small", classes=["cat", "dog", "boat", "sky blue"],
                thresholds=[0.5, 0.45, 0.55, 0.5], state_dict=model.state_dict(),
                preprocess=Preprocess(size=64, resize_size=72))
    return str(out)




@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-protocol server (moto's server mode) on 127.0.0.1; s3fs reaches it via AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3(s3_server: str):
    """An s3fs filesystem on the moto server with fresh buckets per test."""
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    suffix = uuid.uuid4().hex[:8]
    buckets = {"src": f"src-{suffix}", "out": f"out-{suffix}", "models": f"models-{suffix}"}
    for b in buckets.values():
        fs.mkdir(b)
    fs.buckets = buckets  # type: ignore[attr-defined]
    yield fs
    fs.invalidate_cache()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (temporary SQLite database and server) for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
