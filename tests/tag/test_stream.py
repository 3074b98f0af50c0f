"""The shard stream of a fanned-out run: each slot follows its own shards, in order, until the stream ends."""

from __future__ import annotations

import threading

import pytest

from mlcls.errors import MlclsError
from mlcls.tag import stream
from mlcls.tag.plan import Shard


def _shard(i: int) -> Shard:
    return Shard(id=f"s{i}", count=i + 1, manifest=f"file:///m/s{i}.arrow")


def test_slots_follow_their_shards_as_they_are_published(tmp_path):
    out = str(tmp_path / "out")
    got: dict[int, list[str]] = {0: [], 1: []}

    def follow(slot: int) -> None:
        got[slot] = [s.id for s in stream.follow(out, "r", slot, 2, poll_seconds=0.01, wait_seconds=60)]

    threads = [threading.Thread(target=follow, args=(slot,)) for slot in (0, 1)]
    for t in threads:
        t.start()
    for i in range(5):  # published while the slots already wait
        stream.publish(out, "r", i, _shard(i))
    stream.publish_end(out, "r", 5)
    for t in threads:
        t.join(timeout=30)
    assert got == {0: ["s0", "s2", "s4"], 1: ["s1", "s3"]}
    assert [s.count for s in stream.follow(out, "r", 1, 2)] == [2, 4]  # a redone slot reads the same shards
    stream.clear(out, "r")
    with pytest.raises(MlclsError, match="was not published within 0 s"):
        list(stream.follow(out, "r", 0, 2, wait_seconds=0.0, poll_seconds=0.01))


def test_a_failed_planner_ends_the_stream_after_what_it_published(tmp_path, caplog):
    out = str(tmp_path / "out")
    stream.publish(out, "r", 0, _shard(0))
    stream.publish_end(out, "r", 1, error="SourceError: listing failed")
    assert [s.id for s in stream.follow(out, "r", 0, 1)] == ["s0"]
    assert "listing failed" in caplog.text
    with pytest.raises(MlclsError, match="slot 2 is not one of 2 slots"):
        list(stream.follow(out, "r", 2, 2))
