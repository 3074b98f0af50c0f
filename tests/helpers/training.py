"""Tiny generated labelled data sets and settings for the training tests: seconds, not minutes."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mlcls.demo.synth import SynthConfig, write_dataset
from mlcls.images.preprocess import Preprocess
from mlcls.train.trainer import TrainConfig

DATA = SynthConfig(size=64, min_radius=0.2, max_radius=0.35, clutter=1, p_blur=0.0)
PRE = Preprocess(size=48, resize_size=56)
CFG = TrainConfig(arch="mobilenet_v3_small", epochs=2, batch_size=16, lr=3e-3, seed=0, device="cpu")
TRAIN_ARGS = ["--arch", "mobilenet_v3_small", "--weights", "none", "--size", "48", "--resize-size", "56",
              "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--device", "cpu", "-q"]


def write_shapes(folder: Path, n: int = 96, seed: int = 0, valid_share: float = 0.25) -> Path:
    """`n` shape images and a labels.csv whose last `valid_share` of rows are is_valid (about 20 % have no labels)."""
    return Path(write_dataset(str(folder), n, seed, DATA, val_fraction=valid_share))


def read_rows(labels: Path) -> list[dict[str, str]]:
    with open(labels, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run faster on one thread than on two that spin-wait."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)

