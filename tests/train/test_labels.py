"""Labels files: formats, empty cells, the split, and a one-line error for every way one can be wrong."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest

from mlcls.errors import LabelsError
from mlcls.train.labels import LabelsSpec, check_class_positives, multi_hot, read_labels, split, stratified_split


def _csv(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_fastai_style_with_empty_cells_as_negatives(tmp_path):
    path = _csv(tmp_path / "labels.csv", "image,labels,is_valid\n"
                                         "a.jpg,cat dog,0\n"
                                         "b.jpg,,1\n"
                                         "sub/c.jpg,  dog   dog ,false\n"
                                         "d.jpg,\"\",True\n")
    table = read_labels(LabelsSpec(path, images=str(tmp_path / "imgs")))
    assert table.labels == [["cat", "dog"], [], ["dog"], []]
    assert table.classes == ["cat", "dog"]  # never a class named ""
    assert table.uris == [str(tmp_path / "imgs" / p) for p in ("a.jpg", "b.jpg", "sub/c.jpg", "d.jpg")]
    assert table.is_valid.tolist() == [False, True, False, True]
    y = multi_hot(table.labels, table.classes)
    assert y.tolist() == [[1, 1], [0, 0], [0, 1], [0, 0]]
    train, val = split(table, table.classes, val_fraction=0.2, seed=0)
    assert train.tolist() == [0, 2] and val.tolist() == [1, 3]


def test_parquet_list_column_other_names_and_urls(tmp_path):
    pl.DataFrame({"fname": ["x.png", "s3://bucket/y.png", "/abs/z.png"],
                  "tags": [["sky", "sea"], [], None]}).write_parquet(tmp_path / "l.parquet")
    table = read_labels(LabelsSpec(str(tmp_path / "l.parquet")))
    assert table.labels == [["sea", "sky"], [], []]
    assert table.uris == [str(tmp_path / "x.png"), "s3://bucket/y.png", "/abs/z.png"]  # default root: its folder
    assert table.is_valid is None
    table = read_labels(LabelsSpec(str(tmp_path / "l.parquet"), images="s3://photos/2026/"))
    assert table.uris[0] == "s3://photos/2026/x.png"


def test_delimiter_and_named_columns(tmp_path):
    path = _csv(tmp_path / "l.csv", "file,what\na.jpg,red car|blue sky\nb.jpg,blue sky\n")
    table = read_labels(LabelsSpec(path, image_col="file", labels_col="what", delimiter="|"))
    assert table.labels == [["blue sky", "red car"], ["blue sky"]]


@pytest.mark.parametrize("text, spec, message", [
    ("picture,labels\na.jpg,cat\n", {}, r"has no image column \(looked for image, fname.*it has: picture, labels\)"),
    ("image,cats\na.jpg,cat\n", {}, "has no labels column .* name it with --labels-col"),
    ("image,labels\na.jpg,cat\n", {"labels_col": "tags"}, "has no column 'tags' \\(it has: image, labels\\)"),
    ("image,labels\n", {}, "has no rows"),
    ("image,labels\na.jpg,cat\n,dog\n", {}, "row 3: the 'image' cell is empty"),
    ("image,labels\na.jpg,cat\nb.jpg,dog\na.jpg,bird\n", {}, "image 'a.jpg' is listed twice \\(rows 2 and 4"),
    ("image,labels,is_valid\na.jpg,cat,maybe\n", {}, "row 2: is_valid must be true/false or 1/0, not 'maybe'"),
])
def test_malformed_files_name_the_problem(tmp_path, text, spec, message):
    path = _csv(tmp_path / "l.csv", text)
    with pytest.raises(LabelsError, match=message):
        read_labels(LabelsSpec(path, **spec))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(LabelsError, match="labels file not found: .*nope.csv"):
        read_labels(LabelsSpec(str(tmp_path / "nope.csv")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(LabelsError, match="is not a readable CSV or Parquet table"):
        read_labels(LabelsSpec(str(tmp_path / "bad.parquet")))


def test_split_errors(tmp_path):
    path = _csv(tmp_path / "l.csv", "image,labels,is_valid\na.jpg,cat,1\nb.jpg,dog,1\n")
    table = read_labels(LabelsSpec(path))
    with pytest.raises(LabelsError, match="every row has is_valid set; none is left to train on"):
        split(table, table.classes, val_fraction=0.2, seed=0)
    table = read_labels(LabelsSpec(_csv(tmp_path / "one.csv", "image,labels\na.jpg,cat\n")))
    with pytest.raises(LabelsError, match="1 images are too few to split 20% off"):
        split(table, table.classes, val_fraction=0.2, seed=0)
    with pytest.raises(LabelsError, match="--val-fraction must be between 0 and 1"):
        split(table, table.classes, val_fraction=1.5, seed=0)


def test_a_class_with_no_training_positive_is_an_error_one_without_validation_positives_a_warning(caplog):
    y_train = np.array([[1, 0, 1], [1, 0, 0]], dtype=np.float32)
    y_val = np.array([[1, 1, 0]], dtype=np.float32)
    with pytest.raises(LabelsError, match="1 classes have no positive training image and cannot be learnt: b"):
        check_class_positives(y_train, y_val, ["a", "b", "c"])
    caplog.clear()
    check_class_positives(y_train[:, [0, 2]], y_val[:, [0, 2]], ["a", "c"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in caplog.records] == ["mlcls.train.labels"]
    assert len(warnings) == 1 and "no positive validation image" in warnings[0] and warnings[0].endswith(": c")


def test_stratified_split_is_seeded_and_keeps_every_class_on_both_sides():
    rng = np.random.default_rng(0)
    y = rng.random((500, 12)) < np.linspace(0.01, 0.4, 12)
    y[:100] = False  # images with no labels are stratified too
    val = stratified_split(y, 0.2, seed=3)
    assert np.array_equal(val, stratified_split(y, 0.2, seed=3))
    assert not np.array_equal(val, stratified_split(y, 0.2, seed=4))
    assert abs(val.mean() - 0.2) < 0.02
    counts = y.sum(0)
    share = y[val].sum(0) / counts
    assert (np.abs(share - 0.2) <= 1.0 / counts + 0.02).all()  # within one image of a fair share
    empty = ~y.any(1)
    assert abs(val[empty].sum() - 0.2 * empty.sum()) <= 1
    random_split = np.random.default_rng(3).random(500) < 0.2  # what it improves on: the rarest class's share
    assert abs(share[0] - 0.2) <= abs(y[random_split, 0].sum() / counts[0] - 0.2) + 1e-9
