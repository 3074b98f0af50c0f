"""`mlcls compact`: the same answers before, during (crashed at any step) and after; incremental runs still skip."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mlcls.cli.main import main
from mlcls.output.compact import compact, compact_steps, plan_compaction
from mlcls.output.parts import ProbsMode, list_parts, write_part
from mlcls.output.query import LabelQuery, label_query, sql
from mlcls.output.reader import OutputTable
from mlcls.output.stats import compute_stats
from mlcls.tag import job
from tests.helpers.images import write_images
from tests.helpers.outputs import CLASSES, THRESHOLDS, newest_rows, stored_rows, synthetic_table, write_synthetic

ROOT = Path(__file__).resolve().parents[2]
QUERIES = [{"labels": ("dog",)}, {"labels": ("cat",), "not_labels": ("boat",), "min_prob": 0.6},
           {"not_labels": ("sky blue",)}, {}]


def answers(out: str, classes=CLASSES) -> dict:
    """Every question a user can ask, and the newest rows read independently (pyarrow, plain Python)."""
    ds = OutputTable.open(out)
    stats = compute_stats(ds, pairs=50).to_dict()
    for key in ("parts", "rows_stored", "superseded", "seconds", "out"):
        stats.pop(key)
    queries = [{**q, "labels": tuple(c for c in q.get("labels", ()) if c in classes)} for q in QUERIES]
    return {
        "queries": [label_query(ds, LabelQuery(**q)).to_dicts() for q in queries],
        "sql": sql(ds, "select uri, labels, error, run_id, tagged_at, probs from tags order by uri").to_pylist(),
        "stats": stats,
        "newest": sorted(newest_rows(out).items()),
    }


@pytest.fixture()
def synth(tmp_path) -> str:
    out = str(tmp_path / "tags")
    write_synthetic(out, images=240, parts=6, retag=30, seed=8)
    return out


def test_round_trip_on_a_real_incremental_output(tmp_path, tiny_bundle, capsys):
    src, out = tmp_path / "src", str(tmp_path / "out")
    opts = job.TagOptions(batch_size=8, shard_size=4, workers=1)
    write_images(src, 14)
    (src / "broken.jpg").write_bytes(b"nope")
    job.tag_images(str(src), out, tiny_bundle, opts)
    for name in ("img0001.jpg", "img0005.jpg", "img0009.jpg"):  # changed files: tagged again, a second row each
        (src / name).write_bytes((src / "img0002.jpg").read_bytes())
        os.utime(src / name, (time.time() + 30, time.time() + 30))
    write_images(src, 2, seed=4, prefix="late")
    second = job.tag_images(str(src), out, tiny_bundle, opts)
    assert second.new == 5
    classes = ["cat", "dog", "boat", "sky blue"]
    before, parts_before = answers(out, classes), list_parts(out)
    assert len(stored_rows(out)) == 20 and len(before["newest"]) == 17

    assert main(["compact", out]) == 0
    assert "compacted" in capsys.readouterr().out
    assert answers(out, classes) == before
    assert len(list_parts(out)) == 1 < len(parts_before)
    assert len(stored_rows(out)) == 17 and len(OutputTable.open(out).superseded()) == 0
    again = job.tag_images(str(src), out, tiny_bundle, opts)  # incremental runs still see every file as done
    assert (again.listed, again.already_done, again.new) == (17, 17, 0)
    assert main(["compact", out]) == 0
    assert "already compact: 1 part files, 17 rows" in capsys.readouterr().out


def test_a_crash_after_any_step_loses_nothing_and_the_next_compact_finishes(synth, tmp_path):
    before = answers(synth)
    sizes = sorted(os.path.getsize(p) for p in list_parts(synth))
    target = sizes[-1] * 3  # bins of about three parts: several merged parts, several steps
    probe = _copy(synth, tmp_path / "probe")
    total = len(list(compact_steps(OutputTable.open(probe), plan_compaction(OutputTable.open(probe), target))))
    assert total >= 8
    for crash_after in range(1, total):
        out = _copy(synth, tmp_path / f"crash{crash_after}")
        dataset = OutputTable.open(out)
        steps = compact_steps(dataset, plan_compaction(dataset, target))
        done = [next(steps) for _ in range(crash_after)]
        steps.close()  # the process dies here: nothing after this step runs
        assert answers(out) == before, f"after {done[-1]}"
        result = compact(out, target_bytes=target)
        assert result.recovered and ("rolled back" in result.recovered[0] or "finished" in result.recovered[0])
        assert answers(out) == before, f"recovered after {done[-1]}"
        assert not os.listdir(Path(out) / "_mlcls" / "compact")
        assert len(stored_rows(out)) == 240 and len(list_parts(out)) < 7


def _copy(src: str, dest: Path) -> str:
    shutil.copytree(src, dest)
    return str(dest)


def test_killed_compact_process_leaves_a_complete_dataset(tmp_path):
    out = str(tmp_path / "tags")
    write_synthetic(out, images=10_000, parts=20, retag=500, seed=1)
    before = answers(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mlcls.cli", "compact", out], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = Path(out) / "_mlcls" / "compact"
    deadline = time.time() + 120
    while not (journal.exists() and any(journal.glob("*.json"))) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "compact finished before it could be killed"
    assert answers(out) == before
    result = compact(out)
    assert result.recovered and answers(out) == before
    assert len(list_parts(out)) == 1 and len(stored_rows(out)) == 10_000


def test_a_part_rewritten_during_compaction_is_kept(synth):
    dataset = OutputTable.open(synth)
    plan = plan_compaction(dataset)
    steps = compact_steps(dataset, plan)
    while next(steps) != "committed":
        pass
    # a retried shard rewrites its part with newer rows while compact deletes the merged ones
    rng = np.random.default_rng(0)
    uris = [f"/data/photos/img{i:05d}.jpg" for i in range(5)]
    table = synthetic_table(uris, rng, CLASSES, THRESHOLDS, ProbsMode(),
                            tagged_at=datetime(2026, 4, 1, tzinfo=UTC) + timedelta(hours=1), run_id="late-run")
    write_part(synth, "synth000", table)
    rest = list(steps)
    assert "kept part-synth000.parquet" in rest and os.path.exists(Path(synth) / "part-synth000.parquet")
    newest = label_query(OutputTable.open(synth), LabelQuery())
    assert newest.height == 240
    late = sql(OutputTable.open(synth), "select uri from tags where run_id = 'late-run'")
    assert set(late.column("uri").to_pylist()) \
        == set(uris)


def test_compact_on_s3(s3, tmp_path):
    local = str(tmp_path / "local")
    write_synthetic(local, images=90, parts=4, retag=12, seed=6)
    before = answers(local)
    remote = f"s3://{s3.buckets['out']}/tags"
    s3.put(local + "/", remote + "/", recursive=True)
    result = compact(remote)
    assert (result.parts_before, result.parts_after, result.rows_before, result.rows_after) == (5, 1, 102, 90)
    s3.invalidate_cache()
    assert [p for p in s3.find(remote) if p.endswith(".parquet")] == [f"{s3.buckets['out']}/tags/" +
                                                                     os.path.basename(list_parts(remote)[0])]
    assert not s3.exists(f"{remote}/_mlcls/compact") or not s3.ls(f"{remote}/_mlcls/compact")
    local_after = str(tmp_path / "after")
    s3.get(remote + "/", local_after + "/", recursive=True)
    assert answers(local_after) == before
