"""Labels files: which image shows which classes, and how to split them.

A labels file is a CSV or Parquet table with an image column and a labels
column, fastai style (`image,labels,is_valid` with `labels` a space-separated
string) or with a list column (Parquet `list<string>`). An empty cell means
the image shows none of the classes: a negative example, never a class named
"". Image paths are relative to `--images` (any fsspec URL), or to the labels
file's folder when it is not given; absolute paths and URLs are kept.

Without an `is_valid` column the split is seeded and label-stratified
(iterative stratification, Sechidis et al. 2011), so a rare class gets its
share of validation images instead of landing all on one side by chance.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlcls.errors import LabelsError
from mlcls.storage import StorageOptions, describe_os_error, read_file, url_to_fs

IMAGE_COLUMNS = ("image", "fname", "filename", "file", "path", "uri", "url", "name")
LABEL_COLUMNS = ("labels", "tags", "label", "classes")
VALID_COLUMNS = ("is_valid", "valid", "is_val")
_TRUE = {"1", "true", "t", "yes", "y", "valid"}
_FALSE = {"0", "false", "f", "no", "n", "train", ""}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelsSpec:
    """Where the labels and images are and how to read them; plain values, so flows can pass it."""

    path: str
    images: str | None = None
    image_col: str | None = None
    labels_col: str | None = None
    delimiter: str = " "
    val_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class LabelTable:
    """A labels file read: resolved image URIs, one label list per image, optional validation flags."""

    source: str
    uris: list[str]
    labels: list[list[str]]
    is_valid: np.ndarray | None

    @property
    def classes(self) -> list[str]:
        """Every class named in the file, sorted."""
        return sorted({c for row in self.labels for c in row})

    def subset(self, index: np.ndarray) -> LabelTable:
        flags = None if self.is_valid is None else self.is_valid[index]
        return LabelTable(self.source, [self.uris[i] for i in index], [self.labels[i] for i in index], flags)


def read_labels(spec: LabelsSpec, storage_options: StorageOptions = None) -> LabelTable:
    """Read and check a labels file; raise `LabelsError` naming the problem."""
    columns = _read_columns(spec.path, storage_options)
    names = list(columns)
    image_col = _pick(names, spec.image_col, IMAGE_COLUMNS, "image", "--image-col", spec.path)
    labels_col = _pick(names, spec.labels_col, LABEL_COLUMNS, "labels", "--labels-col", spec.path)
    valid_col = next((c for c in names if c.lower() in VALID_COLUMNS), None)
    images = columns[image_col]
    if not images:
        raise LabelsError(f"labels file {spec.path} has no rows")
    for i, image in enumerate(images):
        if not isinstance(image, str) or not image.strip():
            raise LabelsError(f"labels file {spec.path}, row {i + 2}: the {image_col!r} cell is empty")
    base = spec.images if spec.images is not None else _parent(spec.path)
    uris = [resolve_uri(image.strip(), base) for image in images]
    _check_unique(uris, images, spec.path)
    labels = [parse_cell(cell, spec.delimiter, spec.path, i) for i, cell in enumerate(columns[labels_col])]
    is_valid = None if valid_col is None else _flags(columns[valid_col], valid_col, spec.path)
    return LabelTable(source=spec.path, uris=uris, labels=labels, is_valid=is_valid)


def _read_columns(path: str, storage_options: StorageOptions) -> dict[str, list]:
    """Every column as a Python list; CSV cells stay strings (no type guessing of labels like `1 2`)."""
    import polars as pl

    try:
        fs, p = url_to_fs(path, storage_options)
        data = read_file(fs, p)
    except FileNotFoundError:
        raise LabelsError(f"labels file not found: {path}") from None
    except (OSError, ValueError) as err:
        raise LabelsError(f"cannot read labels file {path}: {describe_os_error(err)}") from None
    try:
        if path.lower().endswith((".parquet", ".pq")):
            frame = pl.read_parquet(io.BytesIO(data))
        else:
            sep = "\t" if path.lower().endswith(".tsv") else ","
            frame = pl.read_csv(io.BytesIO(data), separator=sep, infer_schema=False)
    except Exception as err:  # noqa: BLE001 - polars raises its own error types for malformed files
        raise LabelsError(f"labels file {path} is not a readable CSV or Parquet table: "
                          f"{str(err).splitlines()[0]}") from None
    return {name: frame[name].to_list() for name in frame.columns}


def _pick(names: Sequence[str], given: str | None, choices: Sequence[str], what: str, option: str,
          path: str) -> str:
    if given is not None:
        if given not in names:
            raise LabelsError(f"labels file {path} has no column {given!r} (it has: {', '.join(names)})")
        return given
    lower = {n.lower(): n for n in names}
    found = next((lower[c] for c in choices if c in lower), None)
    if found is None:
        raise LabelsError(f"labels file {path} has no {what} column (looked for {', '.join(choices)}; "
                          f"it has: {', '.join(names)}); name it with {option}")
    return found


def parse_cell(cell: object, delimiter: str, path: str = "", row: int = 0) -> list[str]:
    """One labels cell to a sorted, de-duplicated list; empty or null is `[]` (a negative image)."""
    if cell is None:
        return []
    if isinstance(cell, str):
        parts = cell.split(delimiter) if delimiter != " " else cell.split()
    elif isinstance(cell, (list, tuple)):
        parts = [p for p in cell if p is not None]
    else:
        raise LabelsError(f"labels file {path}, row {row + 2}: labels must be text or a list, not {cell!r}")
    return sorted({str(p).strip() for p in parts if str(p).strip()})


def _flags(cells: list, column: str, path: str) -> np.ndarray:
    out = np.zeros(len(cells), dtype=bool)
    for i, cell in enumerate(cells):
        text = str(cell).strip().lower() if cell is not None else ""
        if text not in _TRUE | _FALSE:
            raise LabelsError(f"labels file {path}, row {i + 2}: {column} must be true/false or 1/0, not {cell!r}")
        out[i] = text in _TRUE
    return out


def _check_unique(uris: list[str], images: list[str], path: str) -> None:
    seen: dict[str, int] = {}
    for i, uri in enumerate(uris):
        if uri in seen:
            n = len(uris) - len(set(uris))
            raise LabelsError(f"labels file {path}: image {images[i]!r} is listed twice (rows {seen[uri] + 2} "
                              f"and {i + 2}; {n} repeats in all): give each image one row with all its labels")
        seen[uri] = i


def _parent(path: str) -> str:
    if "://" in path:
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(os.path.expanduser(path)))


def resolve_uri(image: str, base: str) -> str:
    """An image cell to a full URI: URLs and absolute paths as they are, the rest under `base`."""
    if "://" in image or os.path.isabs(image):
        return image
    if "://" in base:
        return f"{base.rstrip('/')}/{image.lstrip('/')}"
    return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(base)), image))


def multi_hot(label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """(N, C) float32 targets; an empty label set is a row of zeros. Unknown labels raise `KeyError`."""
    index = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(label_sets), len(classes)), dtype=np.float32)
    for i, labels in enumerate(label_sets):
        for label in labels:
            out[i, index[label]] = 1.0
    return out


def split(table: LabelTable, classes: Sequence[str], *, val_fraction: float,
          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation row indices: the `is_valid` column when there is one, else stratified."""
    if table.is_valid is not None:
        if table.is_valid.all():
            raise LabelsError(f"labels file {table.source}: every row has is_valid set; none is left to train on")
        if table.is_valid.any():
            return np.flatnonzero(~table.is_valid), np.flatnonzero(table.is_valid)
    if not 0.0 < val_fraction < 1.0:
        raise LabelsError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    val = stratified_split(multi_hot(table.labels, classes) > 0, val_fraction, seed)
    if val.all() or not val.any():
        raise LabelsError(f"labels file {table.source}: {len(val)} images are too few to split "
                          f"{val_fraction:.0%} off for validation")
    return np.flatnonzero(~val), np.flatnonzero(val)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: each class (and "no label") split close to `fraction`.

    Iterative stratification: take the rarest label still unassigned, give
    each of its images to the side that most lacks that label (ties: the side
    that most lacks images, then a seeded coin).
    """
    rng = np.random.default_rng(seed)
    y = np.column_stack([y, ~y.any(1)]).astype(np.int64)
    want = np.array([1.0 - fraction, fraction])
    want_images = want * len(y)
    want_labels = np.outer(want, y.sum(0))
    side = np.full(len(y), -1)
    left = y.sum(0).astype(float)
    while (side < 0).any():
        label = int(np.argmin(np.where(left > 0, left, np.inf)))
        rows = np.flatnonzero((side < 0) & (y[:, label] > 0))
        for i in rng.permutation(rows):
            need = want_labels[:, label]
            choice = np.flatnonzero(need == need.max())
            if len(choice) > 1:
                choice = choice[want_images[choice] == want_images[choice].max()]
            k = int(rng.choice(choice))
            side[i] = k
            want_labels[k] -= y[i]
            want_images[k] -= 1
            left -= y[i]
    return side == 1


def check_class_positives(train_y: np.ndarray, val_y: np.ndarray, classes: Sequence[str]) -> None:
    """Refuse classes the model cannot learn; warn about those whose thresholds cannot be measured.

    A class with no positive training image would only learn to say no: an
    error, naming it, before any image is read. A class with no positive
    validation image trains, but has no AP and takes the global threshold.
    """
    none_train = [c for c, n in zip(classes, train_y.sum(0), strict=True) if n == 0]
    none_val = [c for c, n in zip(classes, val_y.sum(0), strict=True) if n == 0]
    if none_train:
        raise LabelsError(f"{len(none_train)} classes have no positive training image and cannot be learnt: "
                          f"{', '.join(none_train[:10])}; label some images with them, drop them from --classes, "
                          "or move some of their is_valid rows to training")
    if none_val:
        logger.warning("%d classes have no positive validation image: no AP, and a global threshold: %s",
                       len(none_val), ", ".join(none_val[:10]))
