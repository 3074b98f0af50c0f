"""From a labels file to a bundle: the steps `mlcls train` and the `train-bundle` flow run.

Everything that can be checked is checked before the first image is read:
the labels file and its columns, the split, the starting weights (a wrong
architecture or an unreachable torchvision download fails here), whether the
pixels fit in memory. The run checkpoints after every epoch next to the
bundle (`OUT/checkpoint.pt`) and removes the checkpoint once the bundle is
written; `resume=True` picks a killed run up where it stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlcls.allocator import keep_freed_memory
from mlcls.bundle import Bundle, build_model, check_arch, check_classes, check_forward
from mlcls.errors import BundleError, LabelsError, OptionError
from mlcls.images.preprocess import Preprocess
from mlcls.storage import StorageOptions, check_folder, join, remove, stat, url_to_fs
from mlcls.tag.compiling import check_compiler
from mlcls.tag.engine import resolve_device
from mlcls.train.image_cache import check_memory, load_pixels, stored_preprocess
from mlcls.train.input_size import InputChoice, resolve_preprocess
from mlcls.train.labels import LabelsSpec, LabelTable, multi_hot, read_labels, split
from mlcls.train.labels import check_class_positives as check_positives
from mlcls.train.trainer import TrainConfig, TrainResult, fit, write_bundle
from mlcls.train.weights import InitWeights, load_init_weights

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Trained:
    """What a training job made: the bundle, and the run behind it."""

    bundle: Bundle
    result: TrainResult
    train_images: int
    val_uris: list[str]

    @property
    def val_images(self) -> int:
        return len(self.val_uris)


def default_checkpoint(out: str) -> str:
    return join(out.rstrip("/"), CHECKPOINT_FILE)


@dataclass
class TrainingPlan:
    """A training job checked and ready: which rows train, which validate, and from what weights."""

    spec: LabelsSpec
    table: LabelTable
    classes: list[str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    init: InitWeights | None
    checkpoint: str
    pre: Preprocess


def train_from_labels(spec: LabelsSpec, out: str, *, cfg: TrainConfig, pre: Preprocess | InputChoice,
                      classes: Sequence[str] | None = None, weights: str | None = None, name: str | None = None,
                      resume: bool = False, checkpoint: str | None = None, workers: int = 8,
                      weights_dtype: str = "float32", storage_options: StorageOptions = None,
                      extra: dict | None = None) -> Trained:
    """Read labels, split, load images once, train, calibrate, and write the bundle to `out`.

    `pre` is the preprocessing, or the user's `InputChoice` (size from the
    images unless given). `extra` goes into the bundle's training record
    (over the defaults: labels, weights, image counts).
    """
    plan = plan_training(spec, out, cfg=cfg, pre=pre, classes=classes, weights=weights, resume=resume,
                         checkpoint=checkpoint, storage_options=storage_options)
    keep_freed_memory()  # checks passed: from decoding on, each step reuses the last one's pages (`mlcls.allocator`)
    pre = plan.pre
    train_x, train_y, val_x, val_y, val_uris = load_split(plan, pre, workers=workers,
                                                          storage_options=storage_options)
    logger.info("%d training images (%d with no labels), %d validation images, %d px", len(train_y),
                int((train_y.sum(1) == 0).sum()), len(val_y), pre.size)
    result = fit(train_x, train_y, val_x, val_y, pre=pre, cfg=cfg, init=plan.init,
                 checkpoint=plan.checkpoint, resume=resume, classes=plan.classes, storage_options=storage_options)
    init = plan.init
    record = {"train_images": len(train_y), "val_images": len(val_y), "labels": spec.path,
              "weights": init.source if init else None, "dropped_keys": init.dropped if init else [],
              **(extra or {})}
    bundle = write_bundle(result, out, name=name or _default_name(out), classes=plan.classes, pre=pre,
                          storage_options=storage_options, extra=record, weights_dtype=weights_dtype)
    _remove(plan.checkpoint, storage_options)
    return Trained(bundle=bundle, result=result, train_images=len(train_y), val_uris=val_uris)


def plan_training(spec: LabelsSpec, out: str, *, cfg: TrainConfig, pre: Preprocess | InputChoice,
                  classes: Sequence[str] | None, weights: str | None, resume: bool, checkpoint: str | None,
                  storage_options: StorageOptions) -> TrainingPlan:
    """Every check that needs no image: options, labels, split, classes, weights, input size, memory, output."""
    cfg.validate()
    check_arch(cfg.arch)
    if cfg.compile:
        check_compiler(resolve_device(cfg.device).type, "--compile", "drop --compile")
    table = read_labels(spec, storage_options)
    names = _classes(table.classes, classes, spec.path)
    train_idx, val_idx = split(table, names, val_fraction=spec.val_fraction, seed=spec.seed)
    check_positives(multi_hot([table.labels[i] for i in train_idx], names),
                    multi_hot([table.labels[i] for i in val_idx], names), names)
    init = load_init_weights(weights, cfg.arch, len(names), storage_options)
    logger.info("%s, %d classes, %s", cfg.arch, len(names), init.describe() if init else "random init")
    pre = resolve_preprocess(pre, [table.uris[i] for i in train_idx], storage_options)
    check_forward(build_model(cfg.arch, len(names), None).eval(), cfg.arch, pre.size, len(names))
    check_memory(len(table.uris), pre.resize_size, "images")
    check_folder(out, "--out", storage_options)
    ckpt = checkpoint or default_checkpoint(out)
    _check_checkpoint(ckpt, resume, storage_options)
    return TrainingPlan(spec, table, names, train_idx, val_idx, init, ckpt, pre)


def load_split(plan: TrainingPlan, pre: Preprocess, *, workers: int,
               storage_options: StorageOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Decode each image once: training ones as `resize_size` squares, validation ones as tagging sees them."""
    t, uris, labels = plan.table, np.array(plan.table.uris, dtype=object), plan.table.labels
    train_x, keep = load_pixels(list(uris[plan.train_idx]), stored_preprocess(pre), storage_options=storage_options,
                                workers=workers, source=t.source)
    train_y = multi_hot([labels[i] for i in plan.train_idx[keep]], plan.classes)
    val_x, keep = load_pixels(list(uris[plan.val_idx]), pre, storage_options=storage_options, workers=workers,
                              source=t.source)
    val_y = multi_hot([labels[i] for i in plan.val_idx[keep]], plan.classes)
    return train_x, train_y, val_x, val_y, [t.uris[i] for i in plan.val_idx[keep]]


def _classes(found: list[str], given: Sequence[str] | None, path: str) -> list[str]:
    """The file's classes (sorted), or the given list, which must cover every label in the file."""
    if given is None:
        if not found:
            raise LabelsError(f"labels file {path} names no class at all: every labels cell is empty")
        return found
    given = list(given)
    try:
        check_classes(given, "--classes")
    except BundleError as err:
        raise LabelsError(str(err)) from None
    unknown = sorted(set(found) - set(given))
    if unknown:
        raise LabelsError(f"labels file {path} uses {len(unknown)} classes missing from --classes: "
                          f"{', '.join(unknown[:10])}")
    return given


def has_checkpoint(out: str, storage_options: StorageOptions = None) -> bool:
    """Whether an interrupted run left a checkpoint in the bundle folder `out`."""
    fs, path = url_to_fs(default_checkpoint(out), storage_options)
    return stat(fs, path) is not None


def _check_checkpoint(url: str, resume: bool, storage_options: StorageOptions) -> None:
    fs, path = url_to_fs(url, storage_options)
    exists = stat(fs, path) is not None
    if resume and not exists:
        raise OptionError(f"no checkpoint at {url} to resume from; run without --resume to start afresh")
    if not resume and exists:
        logger.warning("starting afresh: the checkpoint %s of an earlier run will be overwritten "
                       "(--resume continues it)", url)


def _remove(url: str, storage_options: StorageOptions) -> None:
    fs, path = url_to_fs(url, storage_options)
    remove(fs, path)


def _default_name(out: str) -> str:
    return os.path.basename(out.rstrip("/")) or "bundle"
