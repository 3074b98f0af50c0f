"""The job in-process: planning, incremental runs, resume after SIGKILL, bad input, engine equivalence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mlcls.bundle import load_bundle
from mlcls.images.preprocess import INTERPOLATIONS
from mlcls.output.table import current_files
from mlcls.tag import job
from mlcls.tag.engine import get_engine
from mlcls.tag.job import TagOptions, tag_images
from mlcls.tag.plan import plan_shards, read_shard
from tests.helpers.images import bad_input_catalogue, write_images

OPTS = TagOptions(batch_size=8, shard_size=10, workers=2)


def _rows(out: Path) -> pl.DataFrame:
    return pl.read_delta(str(out))


def test_plan_cuts_stable_shards_and_subtracts_done(tmp_path, tiny_bundle):
    write_images(tmp_path / "src", 25)
    model_id = load_bundle(tiny_bundle).model_id
    out = str(tmp_path / "out")
    a = plan_shards(str(tmp_path / "src"), out, model_id, shard_size=10, run_id="r1")
    b = plan_shards(str(tmp_path / "src"), out, model_id, shard_size=10, run_id="r2")
    assert [s.count for s in a.shards] == [10, 10, 5] and a.listed == 25 and a.new == 25
    assert [s.id for s in a.shards] == [s.id for s in b.shards]  # same work, same ids
    assert len({s.id for s in a.shards}) == 3
    assert [r.uri for r in read_shard(a.shards[2])] == sorted(str(p) for p in (tmp_path / "src").iterdir())[20:]
    other = plan_shards(str(tmp_path / "src"), out, "other@model", shard_size=10, run_id="r3")
    assert other.shards[0].id != a.shards[0].id


class _RecordingList(list):
    """A URI list that notes the order of events: each URI read, and each shard's first tagged batch."""

    def __init__(self, uris: list[str], events: list[str]) -> None:
        super().__init__(uris)
        self.events = events

    def __iter__(self):
        for uri in super().__iter__():
            self.events.append("read")
            yield uri


def test_first_shard_is_tagged_while_the_listing_goes_on(tmp_path, tiny_bundle):
    from mlcls import progress

    uris = [str(p) for p in write_images(tmp_path / "src", 25)]
    events: list[str] = []
    unsubscribe = progress.subscribe(lambda e: events.append(e.kind) if e.kind in ("images", "planned") else None)
    try:
        summary = tag_images(_RecordingList(uris, events), str(tmp_path / "out"), tiny_bundle, OPTS)
    finally:
        unsubscribe()
    assert (summary.new, summary.images, summary.shards) == (25, 25, 3)
    reads = [i for i, kind in enumerate(events) if kind == "read"]
    first_tagged, last_read = events.index("images"), reads[24]  # the listing's last URI (the summary reads again)
    assert first_tagged < last_read, "the first shard must be tagged before the listing ends"
    assert events.index("planned") > last_read  # the totals come at the end
    assert _rows(tmp_path / "out")["uri"].n_unique() == 25


def test_incremental_runs_tag_only_new_or_changed_files(tmp_path, tiny_bundle):
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 23)
    first = tag_images(str(src), str(out), tiny_bundle, OPTS)
    assert (first.new, first.tagged, first.errors, first.shards) == (23, 23, 0, 3)
    parts = current_files(str(out))
    again = tag_images(str(src), str(out), tiny_bundle, OPTS)
    assert (again.listed, again.already_done, again.new, again.images) == (23, 23, 0, 0)
    assert current_files(str(out)) == parts  # no inference, no new file
    write_images(src, 4, seed=9, prefix="new")
    changed = src / "img0003.jpg"
    changed.write_bytes(changed.read_bytes())
    os.utime(changed, (time.time() + 10, time.time() + 10))
    third = tag_images(str(src), str(out), tiny_bundle, OPTS)
    assert (third.already_done, third.new) == (22, 5)
    df = _rows(out)
    assert df.height == 27 and df["uri"].n_unique() == 27  # the changed file's old row left the table
    assert df["error"].null_count() == 27 and third.superseded == 1
    assert df.filter(pl.col("uri") == str(changed))["run_id"].to_list() == [third.run_id]


def test_bad_input_catalogue_gives_one_row_each_and_the_run_completes(tmp_path, tiny_bundle):
    expected = bad_input_catalogue(tmp_path / "src")
    summary = tag_images(str(tmp_path / "src"), str(tmp_path / "out"), tiny_bundle,
                  TagOptions(batch_size=4, shard_size=7, max_pixels=5_000_000))
    df = _rows(tmp_path / "out")
    assert df.height == len(expected) == summary.images
    by_name = {Path(u).name: (e, w) for u, e, w in df.select("uri", "error", "width").iter_rows()}
    assert set(by_name) == set(expected)
    for name, kind in expected.items():
        error, width = by_name[name]
        if kind is None:
            assert error is None and width > 0, name
        else:
            assert error.startswith(kind + ":"), (name, error)
    assert summary.errors == sum(k is not None for k in expected.values())
    assert summary.error_kinds == {"decode": 3, "empty": 1, "too_large": 1}


def test_probabilities_equal_a_plain_torchvision_pipeline(tmp_path, tiny_bundle):
    paths = write_images(tmp_path / "src", 12)
    tag_images(str(tmp_path / "src"), str(tmp_path / "out"), tiny_bundle, TagOptions(batch_size=5, draft=False))
    bundle = load_bundle(tiny_bundle)
    pre = bundle.preprocess
    tf = T.Compose([T.Resize(pre.resize_size, interpolation=INTERPOLATIONS[pre.interpolation]),
                    T.CenterCrop(pre.size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    model = bundle.build_model()
    with torch.inference_mode():
        expected = torch.sigmoid(model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]))).numpy()
    df = _rows(tmp_path / "out").sort("uri")
    got = np.array([[row[c] for c in bundle.classes] for row in df["probs"].to_list()])
    assert np.abs(got - expected).max() < 1e-4
    labels = [[c for c, p, t in zip(bundle.classes, r, bundle.thresholds, strict=True) if p >= t] for r in got]
    assert df["labels"].to_list() == labels


def test_engine_labels_use_per_class_thresholds(tiny_bundle):
    engine = get_engine(load_bundle(tiny_bundle), "cpu")
    probs = np.array([[0.5, 0.44, 0.56, 0.1], [0.49, 0.45, 0.54, 0.9]], dtype=np.float32)
    assert engine.labels(probs) == [["cat", "boat"], ["dog", "sky blue"]]
    assert engine.probs(torch.zeros((0, 64, 64, 3), dtype=torch.uint8)).shape == (0, 4)


_CRASHER = """
import sys
from mlcls.tag.job import TagOptions, tag_images
tag_images(sys.argv[1], sys.argv[2], sys.argv[3], TagOptions(batch_size=4, shard_size=6, workers=1))
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_gives_exactly_one_row_per_image(tmp_path, tiny_bundle):
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 60)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    codes = []
    for delay in (1.0, 3.0, 5.0):  # before, during and after the first parts (or the commit)
        proc = subprocess.Popen([sys.executable, "-c", _CRASHER, str(src), str(out), tiny_bundle], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        codes.append(proc.wait())
        assert codes[-1] in (0, -signal.SIGKILL)  # killed, or done before the kill: never an error of its own
        if current_files(str(out)):  # whatever the table holds is whole, one row per image
            rows = _rows(out)
            assert rows.height == rows["uri"].n_unique() > 0
    assert codes[0] == -signal.SIGKILL
    summary = tag_images(str(src), str(out), tiny_bundle, TagOptions(batch_size=4, shard_size=6))
    df = _rows(out)
    assert df.height == 60 and df["uri"].n_unique() == 60
    assert summary.already_done + summary.new == 60
    assert not [f for f in os.listdir(out) if f.endswith(".parquet") and not f.startswith("part-")]


def test_options_are_checked(tmp_path, tiny_bundle):
    from mlcls.errors import OptionError

    for bad in (TagOptions(batch_size=0), TagOptions(workers=-1), TagOptions(probs="some"),
                TagOptions(precision="fp8")):
        with pytest.raises(OptionError):
            bad.validate()
    with pytest.raises(OptionError, match="unknown tagging options: colour"):
        TagOptions.from_dict({"colour": 1})
    assert TagOptions.from_dict(OPTS.to_dict()) == OPTS


def test_summary_is_written_and_manifests_removed(tmp_path, tiny_bundle):
    write_images(tmp_path / "src", 5)
    s = job.tag_images(str(tmp_path / "src"), str(tmp_path / "out"), tiny_bundle, OPTS)
    run = tmp_path / "out" / "_mlcls" / "runs" / s.run_id
    assert (run / "summary.json").exists() and not (run / "shards").exists()


def test_decode_processes_give_the_same_rows_as_threads(tmp_path, tiny_bundle):
    """Four or more workers decode in forked processes through a shared-memory ring."""
    write_images(tmp_path / "src", 30)
    (tmp_path / "src" / "bad.jpg").write_bytes(b"nope")
    tag_images(str(tmp_path / "src"), str(tmp_path / "threads"), tiny_bundle, TagOptions(batch_size=4, workers=1))
    tag_images(str(tmp_path / "src"), str(tmp_path / "procs"), tiny_bundle, TagOptions(batch_size=4, workers=4))
    a, b = (_rows(tmp_path / d).sort("uri") for d in ("threads", "procs"))
    assert a.height == b.height == 31
    assert a.select("uri", "labels", "error", "width").equals(b.select("uri", "labels", "error", "width"))
    assert a["probs"].to_list() == b["probs"].to_list()
