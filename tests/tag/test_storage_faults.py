"""A busy bucket's bad day: 10% of storage requests fail (503 SlowDown, 500, resets, bodies cut short), and
every command still gives the fault-free answer in one run; permanent storage errors are one line, at once.

The faults come from `tests.helpers.faults.FaultProxy` in front of the suite's moto server: every request
of the code under test goes through it (`endpoint_url` in the storage options); the tests' own checks go
to moto directly.
"""

from __future__ import annotations

import json
import time

import pytest

from mlcls.bundle import load_bundle
from mlcls.cli.main import main
from mlcls.output.commit import commit_parts
from mlcls.output.compact import compact
from mlcls.output.query import LabelQuery, label_query, sql
from mlcls.output.reader import OutputTable
from mlcls.output.stats import compute_stats
from mlcls.output.table import current_files
from mlcls.tag import job
from tests.helpers.faults import fault_proxy
from tests.helpers.images import bad_input_catalogue, write_images
from tests.helpers.net import free_port
from tests.helpers.outputs import write_synthetic
from tests.helpers.training import TRAIN_ARGS, one_torch_thread, write_shapes

pytestmark = pytest.mark.slow

RATE = 0.1
MAX_PIXELS = 10_000_000  # huge-pixels.png (12 MP) is a too_large row
OPTS = job.TagOptions(batch_size=8, shard_size=8, workers=2, max_pixels=MAX_PIXELS)
BAD = ("truncated.jpg", "zero-byte.jpg", "text-named.jpg", "huge-pixels.png")


@pytest.fixture()
def faulty(s3_server):
    """The proxy at 10% faults, seeded; `.options` are the storage options that route through it."""
    with fault_proxy(s3_server, rate=RATE, seed=13) as proxy:
        proxy.options = {"endpoint_url": proxy.url}
        yield proxy
    assert proxy.requests >= 30 and sum(proxy.injected.values()) >= RATE * proxy.requests - 3, \
        (proxy.requests, proxy.injected)  # the faults did happen, one request in ten


def _images(tmp_path, n: int = 20):
    """`n` photos and the hostile files of the catalogue that become error rows, in a local folder."""
    src = tmp_path / "src"
    write_images(src, n)
    bad_input_catalogue(tmp_path / "catalogue")
    for name in BAD:
        (src / name).write_bytes((tmp_path / "catalogue" / name).read_bytes())
    return src


def _rows(out: str, storage_options=None) -> list[tuple]:
    """Every row of the table's current version as (uri, labels, error), read from moto without faults."""
    df = OutputTable.open(out, storage_options).scan().select("uri", "labels", "error").collect()
    return sorted((r["uri"], tuple(r["labels"] or ()), r["error"]) for r in df.iter_rows(named=True))


def test_tag_s3_to_s3_through_the_flow_under_faults_equals_a_fault_free_run(tmp_path, tiny_bundle, s3, faulty,
                                                                             prefect_api):
    from flows.tag import tag_images as tag_flow

    src, out, models = s3.buckets["src"], s3.buckets["out"], s3.buckets["models"]
    s3.put(str(_images(tmp_path)) + "/", f"{src}/photos/", recursive=True)
    s3.put(tiny_bundle + "/", f"{models}/tiny/", recursive=True)
    source, model = f"s3://{src}/photos", f"s3://{models}/tiny"

    clean = job.tag_images(source, f"s3://{out}/clean", model, OPTS)
    result = tag_flow(source=source, out=f"s3://{out}/faulty", model=model, batch_size=8, shard_size=8, workers=2,
                      max_pixels=MAX_PIXELS, storage_options=faulty.options)
    assert (result["images"], result["failed_shards"]) == (24, [])
    expected = _rows(f"s3://{out}/clean")
    assert len(expected) == 24 and {e.split(":")[0] for _, _, e in expected if e} == {"decode", "empty", "too_large"}
    assert _rows(f"s3://{out}/faulty") == expected  # one row per object, the same labels and error rows
    assert result["error_kinds"] == clean.error_kinds
    again = job.tag_images(source, f"s3://{out}/faulty", model, OPTS, storage_options=faulty.options)
    assert (again.listed, again.already_done, again.new) == (24, 24, 0)


def test_tag_local_to_s3_under_faults_equals_a_fault_free_run(tmp_path, tiny_bundle, s3, faulty, capsys):
    src, out = _images(tmp_path), s3.buckets["out"]
    job.tag_images(str(src), f"s3://{out}/clean", tiny_bundle, OPTS)
    code = main(["tag", str(src), "--out", f"s3://{out}/faulty", "--model", tiny_bundle, "--shard-size", "6",
                 "--batch-size", "8", "--max-pixels", str(MAX_PIXELS), "--no-prefect", "-q",
                 "--storage-options", json.dumps(faulty.options)])
    assert code == 0, capsys.readouterr().err
    assert "tagged 20 of 24 new images" in capsys.readouterr().out
    assert _rows(f"s3://{out}/faulty") == _rows(f"s3://{out}/clean")
    assert len(current_files(f"s3://{out}/faulty")) == 4
    assert not s3.ls(f"{out}/faulty/_mlcls/runs/")[0].endswith("shards")


def _answers(out: str, storage_options=None) -> dict:
    """What query, --sql and stats say about `out`."""
    dataset = OutputTable.open(out, storage_options)
    stats = compute_stats(dataset, pairs=20).to_dict()
    for key in ("seconds", "out"):
        stats.pop(key)
    return {
        "dog": label_query(dataset, LabelQuery(labels=("dog",), not_labels=("boat",))).to_dicts(),
        "all": label_query(dataset, LabelQuery(min_prob=0.2)).to_dicts(),
        "sql": sql(dataset, "select uri, labels, error, tagged_at from tags order by uri").to_pylist(),
        "stats": stats,
    }


def test_query_stats_and_compact_on_s3_under_faults(s3, faulty):
    out = f"s3://{s3.buckets['out']}/tags"
    write_synthetic(out, images=120, parts=5, retag=20, seed=3)  # 6 files, 20 rows superseded in the commit
    before = _answers(out)
    assert len(before["sql"]) == 120 and before["stats"]["parts"] == 6
    assert _answers(out, faulty.options) == before

    result = compact(out, faulty.options, target_bytes=2**30, retention_hours=0)
    assert (result.files_before, result.files_after, result.rows) == (6, 1, 120)
    after = _answers(out)
    assert after["stats"]["parts"] == 1 and after["stats"]["version"] > before["stats"]["version"]
    for key in ("dog", "all", "sql"):
        assert after[key] == before[key]
    left = [k for k in s3.ls(f"{s3.buckets['out']}/tags") if k.endswith(".parquet")]
    assert len(left) == 1  # vacuum deleted the merged and the superseded files


def test_training_reads_its_images_and_labels_from_s3_under_faults(tmp_path, s3, faulty):
    src, models = s3.buckets["src"], s3.buckets["models"]
    labels = write_shapes(tmp_path / "data", n=64)
    s3.put(str(labels.parent / "images") + "/", f"{src}/shapes/images/", recursive=True)
    s3.put(str(labels), f"{src}/shapes/labels.csv")
    args = [f"s3://{src}/shapes/labels.csv", "--images", f"s3://{src}/shapes", *TRAIN_ARGS]
    with one_torch_thread():
        assert main(["train", *args, "--out", f"s3://{models}/clean"]) == 0
        assert main(["train", *args, "--out", f"s3://{models}/faulty",
                     "--storage-options", json.dumps(faulty.options)]) == 0
    clean, trained = load_bundle(f"s3://{models}/clean"), load_bundle(f"s3://{models}/faulty")
    assert trained.metrics["validation"]["images"] == clean.metrics["validation"]["images"] == 16
    assert trained.metrics["validation"]["mAP"] == pytest.approx(clean.metrics["validation"]["mAP"], abs=1e-6)


def test_listings_and_bundles_are_never_served_from_a_cache_filled_before_a_write(tmp_path, tiny_bundle, s3):
    out, models = f"s3://{s3.buckets['out']}/tags", s3.buckets["models"]
    write_synthetic(out, images=20, parts=2, retag=2)
    parts = current_files(out)
    assert len(parts) == 3 and len(OutputTable.open(out).parts) == 3
    other = parts[0].replace("synth000", "other-writer")
    s3.copy(parts[0], other.replace(".parquet", "-x.parquet"))
    s3.copy(parts[0], other)  # another process writes and commits a part (our client never saw it)
    commit_parts(out, "other-run", [f"s3://{other}"])
    assert len(current_files(out)) == 3 and len(OutputTable.open(out).parts) == 3  # its rows replaced theirs
    assert any("other-writer" in p for p in OutputTable.open(out).parts)

    s3.put(tiny_bundle + "/", f"{models}/tiny/", recursive=True)
    first = job.get_bundle(f"s3://{models}/tiny")
    meta = json.loads(s3.cat(f"{models}/tiny/bundle.json"))
    s3.pipe(f"{models}/tiny/bundle.json", json.dumps(meta | {"thresholds": [0.3] * 4}).encode())  # calibrated
    assert job.get_bundle(f"s3://{models}/tiny").digest != first.digest


def _no_credentials(monkeypatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254


@pytest.mark.parametrize("side", ["source", "output"])
@pytest.mark.parametrize("problem, says", [
    ("no credentials", "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("access denied", "access denied (Forbidden): check the credentials and this bucket's permissions"),
    ("no such bucket", "no such bucket 'no-such-bucket-mlcls': check the bucket name"),
    ("unreachable", "cannot reach the storage endpoint http://127.0.0.1:{port}: check endpoint_url"),
])
def test_permanent_storage_errors_are_one_line_before_any_work(tmp_path, s3, s3_server, monkeypatch, capsys,
                                                              side, problem, says):
    import s3fs

    src = tmp_path / "src"
    write_images(src, 2)
    bucket, port = s3.buckets["src"], free_port()
    s3.put(str(src) + "/", f"{bucket}/photos/", recursive=True)
    options = {"endpoint_url": s3_server}
    if problem == "no credentials":
        _no_credentials(monkeypatch)
        s3fs.S3FileSystem.clear_instance_cache()
    elif problem == "no such bucket":
        bucket = "no-such-bucket-mlcls"
    elif problem == "unreachable":
        options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    url = f"s3://{bucket}/photos"
    source, out = (url, str(tmp_path / "out")) if side == "source" else (str(src), f"{url}/tags")
    with fault_proxy(s3_server, rate=0, deny=[s3.buckets["src"]] if problem == "access denied" else []) as proxy:
        if problem == "access denied":
            options = {"endpoint_url": proxy.url}
        started = time.perf_counter()
        code = main(["tag", source, "--out", out, "--no-prefect", "-q", "--storage-options", json.dumps(options)])
        took = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    what = "cannot read source" if side == "source" else "cannot write to output"
    assert err.startswith(f"mlcls: error: {what} {url}") and says.format(port=port) in err, err
    assert took < 15, f"{problem}: {took:.1f} s"
    assert not (tmp_path / "out").exists()
