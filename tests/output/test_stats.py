"""`mlcls stats`: every figure checked against a plain-Python count over the same files."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations

import pytest

from mlcls.cli.main import main
from mlcls.output.reader import OutputTable
from mlcls.output.stats import compute_stats
from tests.helpers.outputs import CLASSES, newest_rows, prob, stored_rows, table_rows, write_synthetic


def independent(out: str) -> dict:
    rows = list(newest_rows(out).values())
    tagged = [r for r in rows if r["error"] is None]
    counts = {c: sum(c in r["labels"] for r in tagged) for c in CLASSES}
    means = {}
    for c in CLASSES:
        values = [p for r in tagged if (p := prob(r, c)) is not None]
        means[c] = sum(values) / len(values) if values else None
    pairs = Counter(pair for r in tagged for pair in combinations(sorted(r["labels"], key=CLASSES.index), 2))
    order = sorted(pairs.items(), key=lambda kv: (-kv[1], CLASSES.index(kv[0][0]), CLASSES.index(kv[0][1])))
    return {"images": len(rows), "tagged": len(tagged), "counts": counts, "means": means,
            "errors": Counter(r["error"].split(":")[0] for r in rows if r["error"]),
            "unlabelled": sum(not r["labels"] for r in tagged), "pairs": [(a, b, n) for (a, b), n in order]}


@pytest.mark.parametrize("probs", ["all", "top-k:2", "min:0.3"])
def test_stats_match_an_independent_count(tmp_path, probs):
    out = str(tmp_path / "tags")
    write_synthetic(out, images=500, parts=5, retag=60, probs=probs, seed=11)
    s = compute_stats(OutputTable.open(out), pairs=100)
    want = independent(out)
    assert (s.images, s.tagged, s.unlabelled) == (want["images"], want["tagged"], want["unlabelled"])
    assert len(stored_rows(out)) >= 560 and s.version == 1  # the files hold the 60 older rows; the version not
    assert s.errors == dict(want["errors"]) and sum(s.errors.values()) == s.images - s.tagged
    assert {x.label: x.images for x in s.labels} == want["counts"]
    for x in s.labels:
        assert x.mean_prob == pytest.approx(want["means"][x.label], rel=1e-5)
    assert [x.images for x in s.labels] == sorted((x.images for x in s.labels), reverse=True)
    assert s.pairs == want["pairs"]
    assert s.models == {"synth@0a1b2c3d4e5f": 500}


def test_stats_of_an_earlier_version(tmp_path):
    out = str(tmp_path / "tags")
    first, _ = write_synthetic(out, images=100, parts=2, retag=30)
    s = compute_stats(OutputTable.open(out, version=first))
    rows = table_rows(out, version=first)
    assert s.images == len(rows) == 100 and s.version == first
    assert s.tagged == sum(r["error"] is None for r in rows)
    assert s.models == {"synth@0a1b2c3d4e5f": 100}


def test_stats_command_text_and_json(tmp_path, capsys):
    out = str(tmp_path / "tags")
    write_synthetic(out, images=200, parts=2, retag=20, seed=2)
    want = independent(out)
    assert main(["stats", out, "--labels", "2", "--pairs", "3"]) == 0
    text = capsys.readouterr().out
    assert f"images     {want['images']:,}: {want['tagged']:,} tagged" in text
    assert "5 of 5 classes in use" in text and "... 3 more (--labels 0 lists all)" in text
    top = max(want["counts"], key=want["counts"].get)
    assert f"  {top:<24} {want['counts'][top]:>10,}" in text
    a, b, n = want["pairs"][0]
    assert f"{a} + {b}" in text and f"{n:>10,}" in text
    assert main(["stats", out, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"] == 200 and data["version"] == 1 and data["error_count"] == 200 - data["tagged"]
    assert {x["label"]: x["images"] for x in data["labels"]} == want["counts"]


def test_stats_on_s3(s3, tmp_path):
    local = str(tmp_path / "local")
    write_synthetic(local, images=150, parts=3, retag=10, seed=4)
    remote = f"s3://{s3.buckets['out']}/tags"
    s3.put(local + "/", remote + "/", recursive=True)
    a, b = compute_stats(OutputTable.open(remote)), compute_stats(OutputTable.open(local))
    assert a.images == b.images == 150 and a.version == b.version
    assert a.labels == b.labels and a.pairs == b.pairs and a.errors == b.errors
