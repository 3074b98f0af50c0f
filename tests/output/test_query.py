"""`mlcls query`: label filters and SQL checked against a plain-Python reading of the same files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest

from mlcls.cli.main import main
from mlcls.output.query import LabelQuery, label_query, sql
from mlcls.output.reader import OutputTable
from mlcls.tag import job
from tests.helpers.images import write_images
from tests.helpers.outputs import newest_rows, prob, stored_rows, write_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("q") / "tags")
    write_synthetic(out, images=400, parts=4, retag=50)
    return out


@pytest.fixture(scope="module")
def synth_bounded(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("qb") / "tags")
    write_synthetic(out, images=200, parts=3, retag=30, probs="top-k:2", seed=3)
    return out


def expected(out: str, labels=(), not_labels=(), min_prob=None, limit=None) -> list[tuple[str, list]]:
    """The query by hand: (uri, probabilities of the labels) in the documented order."""
    hits = []
    for uri, row in newest_rows(out).items():
        have = row["labels"]
        if (labels or not_labels) and have is None:
            continue
        if any(label not in have for label in labels) or any(label in (have or []) for label in not_labels):
            continue
        if min_prob is not None:
            if labels and any((prob(row, label) or 0) < min_prob for label in labels):
                continue
            if not labels and (row["probs"] is None or max(_all_probs(row)) < min_prob):
                continue
        hits.append((uri, [prob(row, label) for label in labels]))
    hits.sort(key=lambda h: (-h[1][0] if h[1] and h[1][0] is not None else 0, h[0]))
    return hits[:limit] if limit else hits


def _all_probs(row: dict) -> list[float]:
    return list(row["probs"].values()) if isinstance(row["probs"], dict) else [v for _, v in row["probs"]]


CASES = [
    {"labels": ("dog",)},
    {"labels": ("dog",), "not_labels": ("person",), "min_prob": 0.8},
    {"labels": ("cat", "sky blue")},
    {"labels": ("boat",), "min_prob": 0.9, "limit": 7},
    {"not_labels": ("cat", "dog")},
    {"min_prob": 0.97},
    {},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "all")
def test_label_queries_match_an_independent_reading(synth, case):
    got = label_query(OutputTable.open(synth), LabelQuery(**case))
    want = expected(synth, **case)
    assert got["uri"].to_list() == [u for u, _ in want]
    for j, label in enumerate(case.get("labels", ())):
        assert got[f"p_{label}"].to_list() == pytest.approx([p[j] for _, p in want])
    assert got.columns[:2] == ["uri", "labels"]


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_bounded_probabilities_query_the_same_way(synth_bounded, case):
    got = label_query(OutputTable.open(synth_bounded), LabelQuery(**case))
    assert got["uri"].to_list() == [u for u, _ in expected(synth_bounded, **case)]


def test_sql_reads_bounded_probabilities_by_name(synth_bounded):
    n = sql(OutputTable.open(synth_bounded), "select count(*) n from tags where probs['dog'] >= 0.5").column("n")[0]
    assert n.as_py() == sum((prob(r, "dog") or 0) >= 0.5 for r in newest_rows(synth_bounded).values()) > 0


def test_the_current_version_holds_each_images_newest_row_and_time_travel_the_older(synth):
    ds = OutputTable.open(synth)
    stored, newest = stored_rows(synth), newest_rows(synth)
    assert len(stored) > 450 and len(newest) == 400  # the folder keeps the superseded rows' files until vacuum
    assert ds.scan().select(pl.len()).collect().item() == 400
    df = ds.scan().select("uri", "run_id", "error").collect()
    assert {u: r for u, r in df.select("uri", "run_id").iter_rows()} == {u: r["run_id"] for u, r in newest.items()}
    before = OutputTable.open(synth, version=ds.version - 1).scan().select("run_id").collect()
    assert before.height == 400 and set(before["run_id"]) == {"20260301T000000Z-run0"}


def test_sql_view_tags(synth):
    ds = OutputTable.open(synth)
    boat = sql(ds, "select uri from tags where list_contains(labels, 'boat') order by uri").column("uri").to_pylist()
    assert boat == sorted(u for u, r in newest_rows(synth).items() if r["labels"] and "boat" in r["labels"])
    counts = sql(ds, "select (select count(*) from tags) a, (select count(distinct uri) from tags) c").to_pylist()[0]
    assert counts == {"a": 400, "c": 400}
    mean = sql(ds, 'select avg(probs."sky blue") m from tags where error is null').column("m")[0].as_py()
    rows = [r for r in newest_rows(synth).values() if r["error"] is None]
    assert mean == pytest.approx(sum(r["probs"]["sky blue"] for r in rows) / len(rows), rel=1e-6)
    assert sql(ds, "select * from tags", limit=3).num_rows == 3


def test_cli_formats_round_trip(synth, tmp_path, capsys):
    args = ["query", synth, "--label", "dog", "--not-label", "cat", "--min-prob", "0.6"]
    want = [u for u, _ in expected(synth, ("dog",), ("cat",), 0.6)]
    assert main([*args, "--format", "csv"]) == 0
    csv = pl.read_csv(io.StringIO(capsys.readouterr().out))
    assert csv["uri"].to_list() == want and csv.columns == ["uri", "labels", "p_dog"]
    assert all("dog" in labels.split(";") for labels in csv["labels"])
    assert main([*args, "--format", "json"]) == 0
    assert [r["uri"] for r in json.loads(capsys.readouterr().out)] == want
    assert main([*args, "--format", "parquet", "--out", str(tmp_path / "r.parquet")]) == 0
    assert pl.read_parquet(tmp_path / "r.parquet")["uri"].to_list() == want
    assert main([*args, "--limit", "3"]) == 0
    table = capsys.readouterr().out
    assert want[0] in table and want[3] not in table and "3 rows" in table
    assert main(args) == 0  # a table without --limit shows 20 and says how many match
    assert f"20 of {len(want)} rows shown" in capsys.readouterr().out
    assert main(["query", synth, "--sql", "select uri from tags order by uri"]) == 0
    table = capsys.readouterr().out
    assert "the first 20 rows shown" in table and sorted(newest_rows(synth))[19] in table


def test_query_of_a_real_tagging_run(tmp_path, tiny_bundle, capsys):
    """Through the real pipeline: labels are the classes at or above the bundle's thresholds."""
    write_images(tmp_path / "src", 14)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"not an image")
    job.tag_images(str(tmp_path / "src"), str(tmp_path / "out"), tiny_bundle,
                 job.TagOptions(batch_size=8, shard_size=6, workers=1))
    raw = pl.read_delta(str(tmp_path / "out"))
    thresholds = dict(zip(["cat", "dog", "boat", "sky blue"], [0.5, 0.45, 0.55, 0.5], strict=True))
    for label, threshold in thresholds.items():
        got = label_query(OutputTable.open(str(tmp_path / "out")), LabelQuery(labels=(label,)))
        probs = raw.select("uri", pl.col("probs").struct.field(label).alias("p"))
        want = probs.filter(pl.col("p") >= threshold).sort(["p", "uri"], descending=[True, False])
        assert got["uri"].to_list() == want["uri"].to_list()
    assert main(["query", str(tmp_path / "out"), "--sql", "select uri, error from tags where error is not null",
                 "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "decode" in out


@pytest.mark.parametrize("args, message", [
    (["query", "{tmp}/missing", "--label", "dog"], "output not found: {tmp}/missing"),
    (["query", "{tmp}/empty", "--label", "dog"], "output {tmp}/empty holds no tags"),
    (["stats", "{tmp}/empty"], "output {tmp}/empty holds no tags"),
    (["report", "{tmp}/missing", "--out", "{tmp}/r"], "output not found: {tmp}/missing"),
    (["compact", "{tmp}/missing"], "output not found: {tmp}/missing"),
    (["query", "{synth}", "--label", "dgo"], "unknown label 'dgo': no class of {synth} has that name (did you"),
    (["query", "{synth}", "--not-label", "zebra"], "unknown label 'zebra'"),
    (["query", "{synth}", "--sql", "selec uri frm tags"], "--sql: Parser Error: syntax error"),
    (["query", "{synth}", "--sql", "select nope from tags"], "--sql: Binder Error"),
    (["query", "{synth}", "--sql", "select 1", "--label", "dog"], "--sql cannot be combined with --label"),
    (["query", "{synth}", "--label", "dog", "--version", "99"], "has no version 99"),
    (["query", "{synth}", "--label", "dog", "--format", "parquet"], "--format parquet needs --out FILE"),
    (["query", "{synth}", "--min-prob", "2"], "--min-prob must be between 0 and 1"),
    (["query", "{synth}", "--label", "dog", "--not-label", "dog"], "is both a --label and a --not-label"),
])
def test_bad_input_gives_one_line_and_exit_2(synth, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "synth": synth}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlcls: error:") and message.format(**fill) in err
    assert len(err.splitlines()) == 1


def test_query_and_sql_on_s3(s3, tmp_path):
    """The same answers from an s3:// output (moto server) as from a local copy of it."""
    local = str(tmp_path / "local")
    write_synthetic(local, images=120, parts=3, retag=15, seed=5)
    remote = f"s3://{s3.buckets['out']}/tags"
    s3.put(local + "/", remote + "/", recursive=True)
    for case in CASES[:3]:
        a = label_query(OutputTable.open(remote), LabelQuery(**case))
        b = label_query(OutputTable.open(local), LabelQuery(**case))
        assert a.equals(b) and a.height > 0
    statement = "select count(*) n, count(distinct uri) u from tags where list_contains(labels, 'cat')"
    assert sql(OutputTable.open(remote), statement).to_pylist() == sql(OutputTable.open(local), statement).to_pylist()
    assert sql(OutputTable.open(remote), "select count(*) n from tags").to_pylist() == [{"n": 120}]
    assert Path(local).exists()
