"""Listing: folders, URI lists and S3, streamed, with clear errors for missing or empty sources."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlcls import sources
from mlcls.errors import SourceError
from mlcls.sources import ListingStats, check_source, iter_source


def _tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ["x.jpg", "Y.JPEG", "a/z.png", "a/b/deep.WebP", "a/notes.txt", "a/._x.jpg", ".hidden/h.jpg",
                "a/b/readme.md"]:
        (root / rel).write_bytes(b"data")
    return root


def test_local_folder_is_listed_recursively_sorted_case_insensitive(tmp_path):
    root = _tree(tmp_path / "photos")
    stats = ListingStats()
    records = list(iter_source(str(root), stats=stats))
    names = [os.path.relpath(r.uri, root) for r in records]
    assert names == ["Y.JPEG", "a/b/deep.WebP", "a/z.png", "x.jpg"]
    assert all(os.path.isabs(r.uri) for r in records)
    assert all(r.size == 4 and r.mtime is not None and r.etag is None for r in records)
    assert stats.skipped == 3  # notes.txt, readme.md, ._x.jpg; hidden folders are not walked


def test_missing_and_empty_sources_fail_with_a_clear_message(tmp_path):
    with pytest.raises(SourceError, match="source not found: .*nope"):
        list(iter_source(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(SourceError, match=r"no images found in .*empty \(1 files without an image extension"):
        check_source(str(tmp_path / "empty"))
    (tmp_path / "doc.pdf").write_bytes(b"%PDF")
    with pytest.raises(SourceError, match="neither an image nor a URI list"):
        check_source(str(tmp_path / "doc.pdf"))


def test_uri_lists_text_csv_and_parquet(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"1")
    txt = tmp_path / "list.txt"
    txt.write_text("# a comment\nimgs/a.jpg\n\ns3://bucket/b.png\n/abs/c.jpg\n")
    uris = [r.uri for r in iter_source(str(txt))]
    assert uris == [str(tmp_path / "imgs" / "a.jpg"), "s3://bucket/b.png", "/abs/c.jpg"]

    csv = tmp_path / "inventory.csv"
    csv.write_text("URI,size,e_tag,last_modified\ns3://b/x.jpg,10,\"abc\",2026-01-02T03:04:05Z\ns3://b/y.jpg,,,\n")
    recs = list(iter_source(str(csv)))
    assert recs[0].uri == "s3://b/x.jpg" and recs[0].size == 10 and recs[0].etag == "abc"
    assert recs[0].mtime.isoformat() == "2026-01-02T03:04:05+00:00"
    assert recs[1].size is None and recs[1].etag is None and recs[1].mtime is None

    pq.write_table(pa.table({"uri": ["s3://b/1.jpg", "s3://b/2.jpg"], "size": [5, 6]}), tmp_path / "l.parquet")
    recs = list(iter_source(str(tmp_path / "l.parquet")))
    assert [(r.uri, r.size) for r in recs] == [("s3://b/1.jpg", 5), ("s3://b/2.jpg", 6)]

    bad = tmp_path / "bad.csv"
    bad.write_text("name,size\nx.jpg,1\n")
    with pytest.raises(SourceError, match="has no 'uri' column"):
        list(iter_source(str(bad)))


def test_python_list_of_uris(tmp_path):
    recs = list(iter_source(["s3://b/x.jpg", "rel.jpg"]))
    assert recs[0].uri == "s3://b/x.jpg" and recs[1].uri == os.path.abspath("rel.jpg")
    with pytest.raises(SourceError, match="no images found in the list of 0 URIs"):
        list(iter_source([]))


def test_s3_prefix_is_listed_page_by_page(s3, monkeypatch):
    src = s3.buckets["src"]
    for i in range(23):
        s3.pipe(f"{src}/photos/{i:02d}.jpg", b"x" * i)
    s3.pipe(f"{src}/photos/sub/deep.png", b"y")
    s3.pipe(f"{src}/photos/readme.txt", b"z")
    s3.pipe(f"{src}/photosX/other.jpg", b"w")  # a sibling prefix must not leak in
    monkeypatch.setattr(sources, "S3_PAGE_SIZE", 5)
    calls = []
    original = type(s3).call_s3

    def counting(self, method, **kw):
        calls.append(method)
        return original(self, method, **kw)

    monkeypatch.setattr(type(s3), "call_s3", counting)
    records = list(iter_source(f"s3://{src}/photos"))
    assert len(records) == 24
    assert records[0].uri == f"s3://{src}/photos/00.jpg" and records[-1].uri == f"s3://{src}/photos/sub/deep.png"
    assert all(r.etag and r.mtime is not None for r in records)
    assert records[5].size == 5
    assert calls.count("list_objects_v2") == 5  # 25 keys, 5 per page


def test_s3_missing_bucket_is_a_source_error(s3):
    with pytest.raises(SourceError, match="not found|cannot read"):
        check_source("s3://no-such-bucket-mlcls/x")
