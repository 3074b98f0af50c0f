"""The tag-images flow through a real Prefect API (temporary server and database)."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest

from mlcls.output.table import current_files
from tests.helpers.images import write_images

pytestmark = pytest.mark.slow


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return found

    return asyncio.run(read())


def test_flow_tags_in_shards_and_reports(tmp_path, tiny_bundle, prefect_api):
    from flows.tag import FAILED_ARTIFACT, SUMMARY_ARTIFACT, tag_images

    write_images(tmp_path / "src", 14)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = tag_images(source=str(tmp_path / "src"), out=str(tmp_path / "out"), model=tiny_bundle,
                        batch_size=4, shard_size=5)
    assert (result["images"], result["tagged"], result["errors"], result["shards"]) == (15, 14, 1, 3)
    assert len(current_files(str(tmp_path / "out"))) == 3
    df = pl.read_delta(str(tmp_path / "out"))
    assert df.height == 15 and df["run_id"].n_unique() == 1
    assert df.filter(pl.col("error").is_not_null())["uri"].to_list()[0].endswith("broken.jpg")
    artifacts = _artifact(SUMMARY_ARTIFACT)
    assert artifacts, "the summary table artifact was not created"
    assert '"images"' in str(artifacts[0].data) or "images" in str(artifacts[0].data)
    failed = _artifact(FAILED_ARTIFACT)
    assert failed and "broken.jpg" in str(failed[0].data) and "decode" in str(failed[0].data)

    again = tag_images(source=str(tmp_path / "src"), out=str(tmp_path / "out"), model=tiny_bundle, shard_size=5)
    assert (again["new"], again["already_done"]) == (0, 15)


def test_flow_fails_fast_on_bad_input(tmp_path, tiny_bundle, prefect_api):
    from flows.tag import tag_images
    from mlcls.errors import BundleError, SourceError

    write_images(tmp_path / "src", 2)
    with pytest.raises(SourceError, match="source not found"):
        tag_images(source=str(tmp_path / "missing"), out=str(tmp_path / "out"), model=tiny_bundle)
    with pytest.raises(BundleError, match="no bundle.json"):
        tag_images(source=str(tmp_path / "src"), out=str(tmp_path / "out"), model=str(tmp_path))
    assert not current_files(str(tmp_path / "out"))


def test_a_failing_shard_does_not_lose_the_others(tmp_path, tiny_bundle, prefect_api, monkeypatch):
    """A shard whose part cannot be written fails after its retries; the rest land and the run says which."""
    from flows import tag as tag_flow
    from mlcls.tag import job

    write_images(tmp_path / "src", 9)
    real = job.tag_shard
    calls = []

    def flaky(shard, **kw):
        calls.append(shard.id)
        if len(set(calls)) == 2:  # the second shard always fails (a full disk, say)
            raise OSError("No space left on device")
        return real(shard, **kw)

    monkeypatch.setattr(job, "tag_shard", flaky)
    monkeypatch.setattr(tag_flow.tag_shard_task, "retry_delay_seconds", 0)
    with pytest.raises(RuntimeError, match="1 of 3 shards failed"):
        tag_flow.tag_images(source=str(tmp_path / "src"), out=str(tmp_path / "out"), model=tiny_bundle,
                            shard_size=3)
    assert calls.count(calls[1]) == 3  # tried, then retried twice
    assert pl.read_delta(str(tmp_path / "out")).height == 6


def test_fan_out_fails_fast_without_the_shard_deployment(tmp_path, tiny_bundle, prefect_api):
    from flows.tag import tag_images
    from mlcls.errors import MlclsError

    write_images(tmp_path / "src", 3)
    with pytest.raises(MlclsError, match="deployment 'nope/nope' not found"):
        tag_images(source=str(tmp_path / "src"), out=str(tmp_path / "out"), model=tiny_bundle,
                   fan_out="deployment", shard_deployment="nope/nope")
    assert not current_files(str(tmp_path / "out"))


def test_slot_runs_follow_the_published_shards_and_redo_only_the_missing(tmp_path, tiny_bundle, prefect_api):
    from flows.tag import tag_shard
    from mlcls.tag import job, stream

    write_images(tmp_path / "src", 9)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    opts = job.TagOptions(batch_size=2, shard_size=2)
    plan, shards = job.stream_run(src, out, job.open_run(out, tiny_bundle, opts), opts, "r1")
    for seq, shard in enumerate(shards):
        stream.publish(out, "r1", seq, shard)
    stream.publish_end(out, "r1", len(plan.shards))
    assert [s.count for s in plan.shards] == [2, 2, 2, 2, 1]
    job.save_shard_result(out, "r1", job.ShardResult(shard=plan.shards[1].id))  # tagged before a crash
    one = tag_shard(out=out, run_id="r1", model=tiny_bundle, options=opts.to_dict(), slot=1, slots=2)
    assert (one["tagged"], one["skipped"]) == (1, 1)  # shards 1 and 3: only 3 is tagged again
    zero = tag_shard(out=out, run_id="r1", model=tiny_bundle, options=opts.to_dict(), slot=0, slots=2)
    assert (zero["tagged"], zero["skipped"]) == (3, 0) and len(zero["gaps"]) == 2  # shards 0, 2, 4
    assert zero["engines_built"] == one["engines_built"]  # the second slot run reused the first one's engine
    results = job.load_shard_results(out, "r1", [s.id for s in plan.shards])
    assert set(results) == {s.id for s in plan.shards}
    assert not pl.read_delta(str(out)).height  # slot runs write parts; the parent commits them
    committed = job.commit_run(out, "r1", list(results.values()))
    df = pl.read_delta(str(out))
    assert df.height == 7 and df["uri"].n_unique() == 7 and committed.added == 4
