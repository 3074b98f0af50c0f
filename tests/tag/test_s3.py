"""S3 end to end: source, model and output on a real S3-protocol server (moto), through the Prefect flow."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest

from mlcls.bundle import load_bundle
from mlcls.images.decode import prepare
from mlcls.tag.engine import get_engine
from tests.helpers.images import write_images

pytestmark = pytest.mark.slow


def test_s3_source_model_and_output_through_the_flow(tmp_path, tiny_bundle, s3, s3_server, prefect_api):
    from flows.tag import tag_images

    src, out, models = s3.buckets["src"], s3.buckets["out"], s3.buckets["models"]
    paths = write_images(tmp_path / "local", 17)
    for p in paths:
        s3.put(str(p), f"{src}/2026/{p.name}")
    s3.pipe(f"{src}/2026/broken.jpg", b"not a jpeg")
    s3.put(tiny_bundle + "/", f"{models}/tiny/", recursive=True)

    result = tag_images(source=f"s3://{src}/2026", out=f"s3://{out}/tags", model=f"s3://{models}/tiny",
                        batch_size=4, shard_size=6)
    assert (result["images"], result["tagged"], result["errors"], result["shards"]) == (18, 17, 1, 3)
    keys = sorted(s3.ls(f"{out}/tags"))
    assert len([k for k in keys if k.endswith(".parquet")]) == 3

    # the Delta table's own reader lists the version's files; DuckDB reads them through the same S3 endpoint
    from deltalake import DeltaTable

    delta_opts = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    files = DeltaTable(f"s3://{out}/tags", storage_options=delta_opts).file_uris()
    assert len(files) == 3
    con = duckdb.connect()
    con.register_filesystem(s3)
    rows = con.execute(f"select uri, labels, error, etag from read_parquet({files}) order by uri").fetchall()
    assert len(rows) == 18 and all(r[0].startswith(f"s3://{src}/2026/") for r in rows)
    assert all(r[3] for r in rows)  # S3 etags recorded as file identity

    # polars reads the table with its own S3 client
    df = pl.read_delta(f"s3://{out}/tags", storage_options={
        "aws_endpoint_url": s3_server, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
        "aws_region": "us-east-1", "aws_allow_http": "true"})
    assert df.height == 18 and df.filter(pl.col("error").is_not_null())["uri"][0].endswith("broken.jpg")

    # label sets equal what the engine gives for the same bytes, called directly
    bundle = load_bundle(tiny_bundle)
    engine = get_engine(bundle, "cpu")
    import torch

    ok = [r for r in rows if r[2] is None]
    pixels = [prepare(s3.cat(r[0]), bundle.preprocess).pixels for r in ok]
    probs = engine.probs(torch.from_numpy(np.stack(pixels)))
    assert [r[1] for r in ok] == engine.labels(probs)

    again = tag_images(source=f"s3://{src}/2026", out=f"s3://{out}/tags", model=f"s3://{models}/tiny")
    assert (again["new"], again["already_done"]) == (0, 18)
    s3.pipe(f"{src}/2026/late-arrival.jpg", s3.cat(f"{src}/2026/{paths[0].name}"))
    third = tag_images(source=f"s3://{src}/2026", out=f"s3://{out}/tags", model=f"s3://{models}/tiny")
    assert (third["new"], third["already_done"]) == (1, 18)
