"""The Parquet contract: schema, label sets, probability modes, atomic parts, one dataset for every reader."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from mlcls.errors import OptionError, OutputError
from mlcls.images.decode import Decoded
from mlcls.output.commit import commit_parts
from mlcls.output.parts import ProbsMode, build_table, file_metadata, part_name, write_part
from mlcls.output.table import check_output, current_files
from mlcls.sources import FileRecord

CLASSES = ["cat", "dog", "sky blue"]
THRESHOLDS = np.array([0.5, 0.3, 0.9], dtype=np.float32)


def _table(mode: ProbsMode | None = None, n_ok: int = 3, prefix: str = "/x"):
    mode = mode or ProbsMode()
    records = [FileRecord(uri=f"{prefix}/{i}.jpg", size=10 + i, etag=None, mtime=datetime(2026, 1, 1, tzinfo=UTC))
               for i in range(n_ok + 1)]
    decoded = [Decoded(pixels=np.zeros(1), width=100 + i, height=50) for i in range(n_ok)]
    decoded.append(Decoded(pixels=None, error="decode: not an image"))
    probs = np.array([[0.9, 0.1, 0.95], [0.2, 0.3, 0.5], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]], dtype=np.float32)
    meta = file_metadata(model_id="m@abc", digest="abc", classes=CLASSES, thresholds=THRESHOLDS, mode=mode)
    return build_table(records, decoded, probs[: n_ok + 1], classes=CLASSES, thresholds=THRESHOLDS, mode=mode,
                       model_id="m@abc", run_id="r1", tagged_at=datetime.now(UTC), metadata=meta)


def test_rows_labels_and_probs():
    t = _table()
    rows = t.to_pylist()
    assert [r["labels"] for r in rows] == [["cat", "sky blue"], ["dog"], [], None]
    assert rows[0]["probs"]["sky blue"] == pytest.approx(0.95)
    assert rows[3]["probs"] is None and rows[3]["width"] is None
    assert rows[3]["error"] == "decode: not an image" and rows[0]["error"] is None
    assert str(t.schema.field("probs").type) == 'struct<cat: float, dog: float, sky blue: float>'
    meta = json.loads(t.schema.metadata[b"mlcls"])
    assert meta["classes"] == CLASSES and meta["model"] == "m@abc" and meta["thresholds"][1] == pytest.approx(0.3)


def test_bounded_probability_modes():
    top = _table(ProbsMode.parse("top-k:2")).to_pylist()
    assert top[0]["probs"] == [("sky blue", pytest.approx(0.95)), ("cat", pytest.approx(0.9))]
    low = _table(ProbsMode.parse("min:0.25")).to_pylist()
    assert [k for k, _ in low[1]["probs"]] == ["sky blue", "dog"]
    assert low[2]["probs"] == [] and low[3]["probs"] is None
    for bad in ("top-k:0", "min:2", "best"):
        with pytest.raises(OptionError, match="--probs"):
            ProbsMode.parse(bad)


def test_committed_parts_form_one_table_for_polars_duckdb_and_pyarrow(tmp_path):
    from deltalake import DeltaTable

    out = str(tmp_path / "out")
    parts = [write_part(out, part_name("s1", "r"), _table()),
             write_part(out, part_name("s2", "r"), _table(n_ok=1, prefix="/y"))]
    os.makedirs(f"{out}/_mlcls/runs/x", exist_ok=True)
    with open(f"{out}/_mlcls/runs/x/summary.json", "w") as f:
        f.write("{}")
    assert not current_files(out)  # written, not committed: no reader of the table sees them
    commit_parts(out, "r", parts)
    assert [os.path.basename(p) for p in current_files(out)] == ["part-s1-r.parquet", "part-s2-r.parquet"]
    df = pl.scan_delta(out).collect()
    assert df.height == 6
    assert df.filter(pl.col("probs").struct.field("cat") > 0.8).height == 2
    files = DeltaTable(out).file_uris()
    n = duckdb.sql(f"select count(*) from read_parquet({files}) "
                   "where list_contains(labels, 'sky blue') and probs['sky blue'] > 0.9").fetchall()[0][0]
    assert n == 2
    assert DeltaTable(out).to_pyarrow_dataset().count_rows() == 6
    assert pq.read_schema(f"{out}/part-s1-r.parquet").metadata[b"mlcls"]


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "out"
    write_part(str(out), part_name("s1", "r"), _table())
    write_part(str(out), part_name("s1", "r"), _table())  # a retried shard overwrites its own part
    assert sorted(os.listdir(out)) == ["part-s1-r.parquet"]


def test_check_output_refuses_unwritable_and_incompatible(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(str(blocker), CLASSES, ProbsMode())
    with pytest.raises(OutputError, match="cannot write to output"):
        check_output(str(blocker / "sub"), CLASSES, ProbsMode())
    out = str(tmp_path / "out")
    commit_parts(out, "r", [write_part(out, part_name("s1", "r"), _table())])
    check_output(out, CLASSES, ProbsMode())
    check_output(out, ["cat", "dog", "zebra"], ProbsMode())  # other classes: a schema change the table takes
    with pytest.raises(OutputError, match="written with --probs all"):
        check_output(out, CLASSES, ProbsMode.parse("top-k:2"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(OutputError, match="cannot write to output"):
        check_output(str(ro / "out"), CLASSES, ProbsMode())
