"""Which rows a run trusts: `read` errors are storage's fault (tagged again), the file's own errors are not."""

from __future__ import annotations

import polars as pl
import pytest

from mlcls import storage
from mlcls.cli.main import main
from mlcls.output.reader import OutputTable
from mlcls.tag.job import TagOptions, tag_images
from tests.helpers.images import bad_input_catalogue, write_images

OPTS = TagOptions(batch_size=4, shard_size=6, workers=2, decode_pool="threads")  # storage is patched in this process


@pytest.fixture()
def no_sleep(monkeypatch) -> None:
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)


def _current(out) -> dict[str, str | None]:
    """uri name -> its current row's error (the reading rule: newest row per image)."""
    df = OutputTable.open(str(out)).scan().select("uri", "error").collect()
    return {u.rsplit("/", 1)[-1]: e for u, e in zip(df["uri"], df["error"], strict=True)}


def _source(tmp_path):
    src = tmp_path / "src"
    write_images(src, 6)
    kinds = bad_input_catalogue(tmp_path / "bad")
    for name in ("truncated.jpg", "zero-byte.jpg"):
        (src / name).write_bytes((tmp_path / "bad" / name).read_bytes())
    assert (kinds["truncated.jpg"], kinds["zero-byte.jpg"]) == ("decode", "empty")
    return src


def test_read_errors_are_tagged_again_and_file_errors_only_with_retry_errors(tmp_path, tiny_bundle, monkeypatch,
                                                                           capsys, no_sleep):
    src, out = _source(tmp_path), tmp_path / "out"
    real, tries = storage._cat, []

    def storage_fails_one(fs, path):
        if path.endswith("img0002.jpg"):
            tries.append(path)
            raise ConnectionResetError("Connection reset by peer")
        return real(fs, path)

    monkeypatch.setattr(storage, "_cat", storage_fails_one)
    first = tag_images(str(src), str(out), tiny_bundle, OPTS)
    assert (first.images, first.errors) == (8, 3) and first.error_kinds == {"read": 1, "decode": 1, "empty": 1}
    assert len(tries) == storage.POLICY.attempts  # retried, then one error row of kind `read`
    assert _current(out)["img0002.jpg"] == "read: Connection reset by peer"

    monkeypatch.setattr(storage, "_cat", real)
    second = tag_images(str(src), str(out), tiny_bundle, OPTS)  # nobody asked: the read error is retried
    assert (second.listed, second.already_done, second.new, second.tagged) == (8, 7, 1, 1)
    current = _current(out)
    assert len(current) == 8 and current["img0002.jpg"] is None
    assert current["truncated.jpg"].startswith("decode:") and current["zero-byte.jpg"].startswith("empty:")

    assert tag_images(str(src), str(out), tiny_bundle, OPTS).new == 0  # decode and empty rows are the files' own
    code = main(["tag", str(src), "--out", str(out), "--model", tiny_bundle, "--no-prefect", "--retry-errors", "-q"])
    assert code == 0 and "tagged 0 of 2 new images" in capsys.readouterr().out
    assert _current(out) == current  # the same answers, from newer rows


def test_a_short_read_is_read_again_never_decoded_as_truncated(tmp_path, tiny_bundle, monkeypatch, no_sleep):
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 5)
    real, cut = storage._cat, {"img0001.jpg": 2, "img0003.jpg": 99}

    def short_bodies(fs, path):
        data = real(fs, path)
        name = path.rsplit("/", 1)[-1]
        if cut.get(name, 0) > 0:
            cut[name] -= 1
            return data[: len(data) // 2]
        return data

    monkeypatch.setattr(storage, "_cat", short_bodies)
    summary = tag_images(str(src), str(out), tiny_bundle, OPTS)
    current = _current(out)
    assert current["img0001.jpg"] is None  # cut short twice, read a third time
    assert current["img0003.jpg"].startswith("read: short read of ")  # always short: storage's fault, not the file's
    assert summary.error_kinds == {"read": 1}


def test_a_uri_list_with_repeats_gives_one_row_per_uri(tmp_path, tiny_bundle):
    src = tmp_path / "src"
    paths = write_images(src, 5)
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join([*(str(p) for p in paths), str(paths[1]), f"src/{paths[3].name}", str(paths[1])]))
    summary = tag_images(str(listing), str(tmp_path / "out"), tiny_bundle, OPTS)
    assert (summary.listed, summary.images) == (5, 5)
    df = pl.read_delta(str(tmp_path / "out"))
    assert df.height == 5 and df["uri"].n_unique() == 5
    as_list = tag_images([str(p) for p in paths] * 2, str(tmp_path / "out2"), tiny_bundle, OPTS)
    assert (as_list.listed, as_list.images) == (5, 5)


def test_a_listed_file_that_is_not_there_is_a_read_row_and_is_tagged_once_it_is(tmp_path, tiny_bundle):
    """An inventory (URI list) names a file that has not landed yet: one `read` row, the others tagged; the next
    run, after the file lands, tags it without being asked."""
    paths = write_images(tmp_path / "src", 3)
    later, listing, out = tmp_path / "src" / "later.jpg", tmp_path / "list.txt", tmp_path / "out"
    listing.write_text("".join(f"{p}\n" for p in [*paths, later]))
    first = tag_images(str(listing), str(out), tiny_bundle, OPTS)
    assert (first.images, first.error_kinds) == (4, {"read": 1})
    assert _current(out)["later.jpg"] == "read: file not found (listed, but not there when read)"

    later.write_bytes(paths[0].read_bytes())
    second = tag_images(str(listing), str(out), tiny_bundle, OPTS)
    assert (second.already_done, second.tagged, second.errors) == (3, 1, 0)
    assert _current(out)["later.jpg"] is None
