"""Synthetic outputs written by mlcls's own writer, and an independent reading of them in plain Python.

`write_synthetic` writes part files through `mlcls.output.build_table` and
`write_part` (the real schema and footer): error rows of several kinds, and
re-tagged images (a later run with newer rows for some uris), each run
committed to the Delta table as `mlcls tag` does (or left as a pre-Delta
folder with `commit=False`). `newest_rows` reads every Parquet file in the
folder with pyarrow alone, removed ones included, and applies the rule by
hand (newest `tagged_at`, then `run_id`, ...), so the tests compare mlcls's
answers with a computation that shares no code with it; `table_rows` reads
the current version with `deltalake`, the table's own reader.
"""

from __future__ import annotations

import glob
import os
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.parquet as pq

from mlcls.images.decode import Decoded
from mlcls.output.commit import commit_parts
from mlcls.output.parts import ProbsMode, build_table, file_metadata, part_name, write_part
from mlcls.sources import FileRecord

CLASSES = ["cat", "dog", "boat", "sky blue", "person"]
THRESHOLDS = np.array([0.5, 0.4, 0.6, 0.5, 0.55], dtype=np.float32)
ERRORS = ["decode: cannot identify image file", "empty: zero bytes", "too_large: 200000000 pixels"]
MODEL = "synth@0a1b2c3d4e5f"


def write_synthetic(out: str, *, images: int = 300, parts: int = 4, retag: int = 40, probs: str = "all",
                    seed: int = 0, classes: list[str] | None = None, thresholds: np.ndarray | None = None,
                    uri_prefix: str = "/data/photos", commit: bool = True,
                    storage_options: dict | None = None) -> list[int]:
    """`images` uris in `parts` parts (run 0), then run 1's part re-tagging `retag` of them an hour later.

    Returns the table version after each run's commit (none with `commit=False`).
    """
    rng = np.random.default_rng(seed)
    classes = classes or CLASSES
    thresholds = THRESHOLDS if thresholds is None else thresholds
    uris = [f"{uri_prefix}/img{i:05d}.jpg" for i in range(images)]
    chunks = [list(c) for c in np.array_split(np.arange(images), parts)]
    chunks.append(sorted(rng.choice(images, size=retag, replace=False).tolist()))
    start = datetime(2026, 3, 1, tzinfo=UTC)
    runs: dict[str, list[str]] = {}
    for p, ids in enumerate(chunks):
        run = f"2026030{1 + p // parts}T000000Z-run{p // parts}"
        table = synthetic_table([uris[i] for i in ids], rng, classes, thresholds, ProbsMode.parse(probs),
                                tagged_at=start + timedelta(hours=p), run_id=run)
        runs.setdefault(run, []).append(write_part(out, part_name(f"synth{p:03d}", run), table, storage_options))
    if not commit:
        return []
    return [commit_parts(out, run, files, storage_options).version for run, files in runs.items()]


def synthetic_table(uris: list[str], rng: np.random.Generator, classes: list[str], thresholds: np.ndarray,
                    mode: ProbsMode, *, tagged_at: datetime, run_id: str):
    n = len(uris)
    records = [FileRecord(uri=u, size=1000 + i, etag=f"e{i}-{run_id}", mtime=None) for i, u in enumerate(uris)]
    failed = rng.random(n) < 0.08
    decoded = [Decoded(pixels=None, error=ERRORS[int(rng.integers(len(ERRORS)))]) if f
               else Decoded(pixels=None, width=int(rng.integers(50, 500)), height=int(rng.integers(50, 500)))
               for f in failed]
    prevalence = np.linspace(0.5, 0.1, len(classes))
    positive = rng.random((n, len(classes))) < prevalence
    probs = np.where(positive, rng.uniform(0.3, 1.0, positive.shape), rng.uniform(0.0, 0.45, positive.shape))
    meta = file_metadata(model_id=MODEL, digest="0a1b2c3d4e5f", classes=classes, thresholds=thresholds, mode=mode)
    return build_table(records, decoded, probs.astype(np.float32), classes=classes, thresholds=thresholds,
                       mode=mode, model_id=MODEL, run_id=run_id, tagged_at=tagged_at, metadata=meta)


def stored_rows(out: str) -> list[dict]:
    """Every row of every Parquet file in the folder, files the table removed included (pyarrow only)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*.parquet"))):
        rows += pq.read_table(path).to_pylist()
    return rows


def table_rows(out: str, version: int | None = None, storage_options: dict | None = None) -> list[dict]:
    """The rows of the table's current version (or `version`), read by `deltalake` itself."""
    from deltalake import DeltaTable

    return DeltaTable(out, version=version, storage_options=storage_options).to_pyarrow_dataset().to_table().to_pylist()


def newest_rows(out: str) -> dict[str, dict]:
    """uri -> its newest row: latest tagged_at, then run_id, then model, then the last stored."""
    newest: dict[str, tuple[tuple, dict]] = {}
    for order, row in enumerate(stored_rows(out)):
        key = (row["tagged_at"], row["run_id"], row["model"], order)
        if row["uri"] not in newest or key > newest[row["uri"]][0]:
            newest[row["uri"]] = (key, row)
    return {uri: row for uri, (_, row) in newest.items()}


def prob(row: dict, label: str) -> float | None:
    """A class's probability in a row, for both probability layouts (struct: dict; bounded: list of pairs)."""
    probs = row["probs"]
    if probs is None:
        return None
    if isinstance(probs, dict):
        return probs[label]
    return dict(probs).get(label)
