"""Train a multi-label classifier and write it as a bundle.

Multi-label, not multi-class: one logit per class, sigmoid, binary
cross-entropy with logits; an image with no labels is a valid example whose
targets are all zero. Thresholds are calibrated per class on the validation
split (`metrics.calibrate_thresholds`) and stored in the bundle with the
validation metrics, so `mlcls tag` applies exactly what was measured.

Images are decoded once into uint8 arrays at the bundle's resize size and
augmented as tensors (random crop, flips), which keeps a CPU busy with the
model instead of with JPEG decoding every epoch. Validation images go through
the exact inference preprocessing, so validation metrics are tagging metrics.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import metrics
from .bundle import Bundle, build_model, save_bundle
from .engine import Normaliser, resolve_device
from .errors import OptionError
from .images import Preprocess, resize_crop
from .storage import StorageOptions

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; defaults suit fine-tuning a small model on a CPU."""

    arch: str = "mobilenet_v3_small"
    epochs: int = 10
    freeze_epochs: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    vflip: bool = False

    def validate(self) -> TrainConfig:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise OptionError("epochs and batch size must be >= 1 and the learning rate > 0")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise OptionError(f"--freeze-epochs must be between 0 and --epochs ({self.epochs})")
        return self


@dataclass
class TrainResult:
    """The best model's weights, its validation outputs, calibrated thresholds and the history."""

    state_dict: dict[str, torch.Tensor]
    val_scores: np.ndarray
    val_targets: np.ndarray
    thresholds: np.ndarray
    threshold_info: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int = 0


def multi_hot(label_sets: Sequence[Iterable[str]], classes: Sequence[str]) -> np.ndarray:
    """(N, C) float32 targets; an empty label set is a row of zeros."""
    index = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(label_sets), len(classes)), dtype=np.float32)
    for i, labels in enumerate(label_sets):
        for label in labels:
            out[i, index[label]] = 1.0
    return out


def train_pixels(images: Iterable[Image.Image], pre: Preprocess) -> np.ndarray:
    """Training storage: each image resized like inference, centre-cropped to a `resize_size` square."""
    side = pre.resize_size
    stored = Preprocess(size=side, resize_size=side, resize_mode=pre.resize_mode,
                        interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
    return np.stack([np.asarray(resize_crop(img.convert("RGB"), stored)) for img in images])


def eval_pixels(images: Iterable[Image.Image], pre: Preprocess) -> np.ndarray:
    """Validation storage: exactly the pixels tagging feeds the model."""
    return np.stack([np.asarray(resize_crop(img.convert("RGB"), pre)) for img in images])


class Augment:
    """Random crop to `size` from the stored square, horizontal (and optionally vertical) flips."""

    def __init__(self, size: int, *, vflip: bool = False) -> None:
        self.size = size
        self.vflip = vflip

    def __call__(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, h, w, _ = batch.shape
        out = torch.empty((n, self.size, self.size, 3), dtype=batch.dtype)
        ys = torch.randint(0, h - self.size + 1, (n,), generator=gen)
        xs = torch.randint(0, w - self.size + 1, (n,), generator=gen)
        flips = torch.rand(n, 2, generator=gen)
        for i in range(n):
            img = batch[i, ys[i]:ys[i] + self.size, xs[i]:xs[i] + self.size]
            if flips[i, 0] < 0.5:
                img = img.flip(1)
            if self.vflip and flips[i, 1] < 0.5:
                img = img.flip(0)
            out[i] = img
        return out


def centre(batch: torch.Tensor, size: int) -> torch.Tensor:
    h, w = batch.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return batch[:, top:top + size, left:left + size]


def head_parameters(model: nn.Module, num_classes: int) -> list[nn.Parameter]:
    """The parameters of the last layer with `num_classes` outputs (the new head)."""
    heads = [m for m in model.modules() if getattr(m, "out_features", None) == num_classes
             or getattr(m, "out_channels", None) == num_classes]
    if not heads:
        raise OptionError("cannot find the classifier head of this architecture")
    return list(heads[-1].parameters())


def fit(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
        pre: Preprocess, cfg: TrainConfig, init_state: dict[str, torch.Tensor] | None = None,
        log: Log = print) -> TrainResult:
    """Train; keep the weights of the epoch with the best validation mAP; calibrate thresholds on it."""
    cfg.validate()
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    num_classes = train_y.shape[1]
    model = build_model(cfg.arch, num_classes, init_state).to(device).to(memory_format=torch.channels_last)
    normalise = Normaliser(pre, device)
    augment = Augment(pre.size, vflip=cfg.vflip)
    xs, ys = torch.from_numpy(train_x), torch.from_numpy(train_y)
    steps = math.ceil(len(xs) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.25)
    loss_fn = nn.BCEWithLogitsLoss()
    head = set(map(id, head_parameters(model, num_classes)))
    best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] | None = None
    history = []
    for epoch in range(cfg.epochs):
        frozen = epoch < cfg.freeze_epochs
        for p in model.parameters():
            p.requires_grad_(not frozen or id(p) in head)
        model.train()
        order = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for b in range(steps):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            batch = augment(xs[idx], gen) if cfg.augment else centre(xs[idx], pre.size)
            logits = model(normalise(batch))
            loss = loss_fn(logits.float(), ys[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        scores = predict(model, val_x, normalise, cfg.batch_size)
        val_map = metrics.mean_average_precision(scores, val_y)
        history.append({"epoch": epoch + 1, "loss": total / len(xs), "val_mAP": val_map,
                        "seconds": time.perf_counter() - started})
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {total / len(xs):.4f}  val mAP {val_map:.4f}"
            f"{'  (backbone frozen)' if frozen else ''}")
        if best is None or val_map > best[0]:
            best = (val_map, epoch + 1, copy.deepcopy(model.state_dict()), scores)
    assert best is not None
    thresholds, info = metrics.calibrate_thresholds(best[3], val_y)
    state = {k: v.detach().cpu() for k, v in best[2].items()}
    return TrainResult(state_dict=state, val_scores=best[3], val_targets=val_y, thresholds=thresholds,
                       threshold_info=info, history=history, seconds=time.perf_counter() - started,
                       best_epoch=best[1])


@torch.inference_mode()
def predict(model: nn.Module, pixels: np.ndarray, normalise: Normaliser, batch_size: int) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(normalise(torch.from_numpy(pixels[i:i + batch_size]))).float()).cpu()
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def write_bundle(result: TrainResult, out: str, *, name: str, classes: Sequence[str], pre: Preprocess,
                 cfg: TrainConfig, storage_options: StorageOptions = None, extra: dict | None = None,
                 weights_dtype: str = "float32") -> Bundle:
    """The trained model as a bundle, with calibrated thresholds and validation metrics."""
    report = metrics.evaluate(result.val_scores, result.val_targets, result.thresholds, list(classes))
    at_half = metrics.classification_metrics(result.val_scores >= 0.5, result.val_targets)
    summary = {
        "validation": {"images": report["images"], "mAP": report["mAP"], "per_class_ap": report["per_class_ap"],
                       "at_thresholds": report["at_thresholds"], "at_0.5": at_half},
        "thresholds": result.threshold_info,
        "training": {"arch": cfg.arch, "epochs": cfg.epochs, "best_epoch": result.best_epoch,
                     "seconds": round(result.seconds, 1), **(extra or {})},
    }
    return save_bundle(out, name=name, arch=cfg.arch, classes=list(classes), state_dict=result.state_dict,
                       preprocess=pre, thresholds=[float(t) for t in result.thresholds],
                       threshold_method=result.threshold_info["method"], metrics=summary,
                       weights_dtype=weights_dtype, storage_options=storage_options)

