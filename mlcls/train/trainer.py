"""Train a multi-label classifier and write it as a bundle.

Multi-label, not multi-class: one logit per class, sigmoid, binary
cross-entropy with logits (focal and asymmetric losses as options); an image
with no labels is a valid example whose targets are all zero. Thresholds are
calibrated per class on the validation split (`metrics.calibrate_thresholds`)
and stored in the bundle with the validation metrics, so `mlcls tag` applies
exactly what was measured.

The shape is fastai's `fine_tune`: with pretrained weights the backbone is
frozen for the first epoch (only the new head learns), then everything
trains; AdamW with one one-cycle schedule; autocast on CUDA. After each
epoch batch-norm statistics are recomputed exactly ("precise BN"), the
model is validated, and the epoch with the best validation mAP is kept. The
whole run state (model, optimiser, schedule, random generators, best so
far) is checkpointed after every epoch (`checkpoint.py`), so a run that
dies resumes where it stopped and ends exactly as an uninterrupted one.

Images are decoded once into uint8 arrays (`mlcls.train.image_cache`) and augmented as
tensors on the device (`augment.py`), which keeps a CPU busy with the model
instead of with JPEG decoding every epoch. Validation images go through the
exact inference preprocessing, so validation metrics are tagging metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mlcls import progress
from mlcls.bundle import Bundle, save_bundle
from mlcls.errors import OptionError
from mlcls.images.preprocess import Preprocess, resize_crop
from mlcls.storage import StorageOptions
from mlcls.tag.engine import Normaliser, resolve_device
from mlcls.train import metrics
from mlcls.train.augment import Augment, centre
from mlcls.train.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from mlcls.train.image_cache import stored_preprocess
from mlcls.train.labels import multi_hot
from mlcls.train.losses import LOSSES, auto_pos_weight, make_loss
from mlcls.train.weights import InitWeights, head_parameters, init_model

logger = logging.getLogger(__name__)
__all__ = ["Augment", "TrainConfig", "TrainResult", "Trainer", "eval_pixels", "fit", "multi_hot", "train_pixels",
           "write_bundle"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; defaults suit fine-tuning a small pretrained model on a CPU.

    `freeze_epochs=None` means one frozen-backbone epoch with pretrained
    weights and none from random init (a random backbone has nothing to keep).
    `precise_bn` training images recompute batch-norm statistics after each
    epoch (0: keep the moving averages).
    """

    arch: str = "mobilenet_v3_small"
    epochs: int = 10
    freeze_epochs: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)  # milder than ImageNet's 0.08: a crop must keep the objects
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    vflip: bool = False
    loss: str = "bce"
    pos_weight: bool = False
    amp: bool = True
    precise_bn: int = 1024

    def validate(self) -> TrainConfig:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise OptionError("--epochs and --batch-size must be >= 1, --lr > 0 and --weight-decay >= 0")
        if self.freeze_epochs is not None and not 0 <= self.freeze_epochs <= self.epochs:
            raise OptionError(f"--freeze-epochs must be between 0 and --epochs ({self.epochs})")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise OptionError(f"--crop-scale must be in (0, 1], not {lo}")
        if self.loss not in LOSSES:
            raise OptionError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.precise_bn < 0:
            raise OptionError("precise_bn (images for batch-norm statistics) must be >= 0")
        if self.pos_weight and self.loss != "bce":
            raise OptionError(f"--pos-weight goes with --loss bce; {self.loss} balances classes its own way")
        return self

    def frozen_epochs(self, pretrained: bool) -> int:
        if self.freeze_epochs is not None:
            return self.freeze_epochs
        return 1 if pretrained and self.epochs > 1 else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise OptionError(f"unknown training options: {', '.join(sorted(unknown))}")
        for key in ("crop_scale", "crop_ratio"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d).validate()


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


def train_pixels(images: Iterable[Image.Image], pre: Preprocess) -> np.ndarray:
    """Training storage for in-memory images: resized like inference, centre-cropped to a `resize_size` square."""
    stored = stored_preprocess(pre)
    return np.stack([np.asarray(resize_crop(img.convert("RGB"), stored)) for img in images])


def eval_pixels(images: Iterable[Image.Image], pre: Preprocess) -> np.ndarray:
    """Validation storage for in-memory images: exactly the pixels tagging feeds the model."""
    return np.stack([np.asarray(resize_crop(img.convert("RGB"), pre)) for img in images])


class Trainer:
    """One run's whole state: model, optimiser, schedule, random generators, history, best epoch."""

    def __init__(self, cfg: TrainConfig, pre: Preprocess, num_classes: int, steps_per_epoch: int, *,
                 init: InitWeights | None = None, pos_weight: torch.Tensor | None = None) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg, self.steps = cfg, steps_per_epoch
        self.device = resolve_device(cfg.device)
        self.model = init_model(cfg.arch, num_classes, init).to(self.device).to(memory_format=torch.channels_last)
        self.normalise = Normaliser(pre, self.device)
        self.augment = Augment(pre.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, vflip=cfg.vflip)
        self.size = pre.size
        self.loss_fn = make_loss(cfg.loss, pos_weight=None if pos_weight is None else pos_weight.to(self.device))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=cfg.lr, pct_start=0.25,
                                                         total_steps=cfg.epochs * steps_per_epoch)
        self.amp = _amp_dtype(self.device) if cfg.amp else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.head = {id(p) for p in head_parameters(self.model, cfg.arch, num_classes)}
        self.frozen_epochs = cfg.frozen_epochs(pretrained=init is not None)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] | None = None

    def train_epoch(self, xs: torch.Tensor, ys: torch.Tensor) -> float:
        """One pass over the training set in a seeded order; returns the mean loss."""
        frozen = self.epoch < self.frozen_epochs
        for p in self.model.parameters():
            p.requires_grad_(not frozen or id(p) in self.head)
        self.model.train()
        order = torch.randperm(len(xs), generator=self.gen)
        progress.emit(progress.Event("epoch", total=self.steps,
                                     values={"epoch": self.epoch + 1, "epochs": self.cfg.epochs}))
        total = 0.0
        for b in range(self.steps):
            idx = order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]
            loss = self.step(xs[idx], ys[idx])
            total += loss * len(idx)
            progress.emit(progress.Event("step", count=len(idx), values={"loss": loss}))
        return total / len(xs)

    def step(self, pixels: torch.Tensor, targets: torch.Tensor) -> float:
        x = self.normalise(pixels)
        x = self.augment(x, self.gen) if self.cfg.augment else centre(x, self.size)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.model(x.contiguous(memory_format=torch.channels_last))
        logits = getattr(out, "logits", out)  # inception/googlenet return (logits, aux) in training
        loss = self.loss_fn(logits.float(), targets.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return float(loss.detach())

    @torch.no_grad()
    def update_norm_statistics(self, xs: torch.Tensor) -> None:
        """Recompute batch-norm running statistics exactly, on up to `precise_bn` training images.

        Running statistics are a moving average over weights that kept
        changing; eval mode (validation, tagging) uses them. From a random
        init they lag far behind (mobilenet_v3 moves them 1 % a step) and a
        short run validates a model whose outputs are the same for every
        image. "Precise BN" (Wu & Johnson 2021) averages them afresh over
        fixed images with the final weights: the numbers validation and the
        bundle use are then those of this epoch's model.
        """
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.track_running_stats]
        n = min(len(xs), self.cfg.precise_bn)
        if not norms or n == 0:
            return
        paces = [m.momentum for m in norms]
        self.model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        for i in range(0, n, self.cfg.batch_size):
            x = centre(self.normalise(xs[i:min(n, i + self.cfg.batch_size)]), self.size)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                self.model(x.contiguous(memory_format=torch.channels_last))
        for m, pace in zip(norms, paces, strict=True):
            m.momentum = pace
        self.model.eval()

    @torch.inference_mode()
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Sigmoid probabilities for (N, size, size, 3) uint8 pixels."""
        self.model.eval()
        out = []
        for i in range(0, len(pixels), self.cfg.batch_size):
            x = self.normalise(torch.from_numpy(pixels[i:i + self.cfg.batch_size]))
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out.append(torch.sigmoid(self.model(x).float()).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)

    def end_epoch(self, loss: float, val_map: float, scores: np.ndarray, started: float) -> bool:
        """Record the epoch; keep its weights if its validation mAP is the best so far (returns whether)."""
        self.epoch += 1
        self.history.append({"epoch": self.epoch, "loss": loss, "val_mAP": val_map,
                             "seconds": round(time.perf_counter() - started, 2)})
        best = self.best is None or _better(val_map, self.best[0])
        if best:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best = (val_map, self.epoch, state, scores)
        return best

    def state(self, fingerprint: str) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (tensors and plain values only)."""
        assert self.best is not None
        return {"fingerprint": fingerprint, "epoch": self.epoch, "history": self.history,
                "model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "gen": self.gen.get_state(), "rng": torch.get_rng_state(),
                "best_map": self.best[0], "best_epoch": self.best[1], "best_state": self.best[2],
                "best_scores": torch.from_numpy(self.best[3])}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.best = (state["best_map"], state["best_epoch"], state["best_state"], state["best_scores"].numpy())

    def result(self, val_y: np.ndarray, started: float) -> TrainResult:
        """The best epoch's weights with thresholds calibrated on its validation scores."""
        assert self.best is not None
        _, epoch, state, scores = self.best
        thresholds, info = metrics.calibrate_thresholds(scores, val_y)
        return TrainResult(state_dict=state, val_scores=scores, val_targets=val_y, thresholds=thresholds,
                           threshold_info=info, history=self.history, seconds=time.perf_counter() - started,
                           best_epoch=epoch)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast on CUDA (bf16 where supported, else fp16 with loss scaling); plain fp32 on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _better(val_map: float, best_map: float) -> bool:
    """A NaN mAP (no validation positives at all) never beats a number; the later of two NaNs wins."""
    if math.isnan(val_map):
        return math.isnan(best_map)
    return math.isnan(best_map) or val_map > best_map


def fit(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
        pre: Preprocess, cfg: TrainConfig, init: InitWeights | None = None,
        checkpoint: str | None = None, resume: bool = False, classes: Sequence[str] = (),
        storage_options: StorageOptions = None) -> TrainResult:
    """Train; keep the weights of the epoch with the best validation mAP; calibrate thresholds on it.

    `train_x` holds `resize_size` squares (augmentation crops them), `val_x`
    the exact inference input. With `checkpoint`, the run state is saved
    after every epoch; `resume` continues from it.
    """
    cfg.validate()
    started = time.perf_counter()
    steps = math.ceil(len(train_x) / cfg.batch_size)
    pos_weight = auto_pos_weight(train_y) if cfg.pos_weight else None
    trainer = Trainer(cfg, pre, train_y.shape[1], steps, init=init, pos_weight=pos_weight)
    settings = {**cfg.to_dict(), "device": None, "pre": pre.to_dict()}
    key = fingerprint(settings, classes or [str(j) for j in range(train_y.shape[1])], len(train_x), len(val_x))
    if resume and checkpoint:
        trainer.load_state(load_checkpoint(checkpoint, key, storage_options))
        logger.info("resumed from %s after epoch %d of %d", checkpoint, trainer.epoch, cfg.epochs)
    xs, ys = torch.from_numpy(train_x), torch.from_numpy(train_y)
    while trainer.epoch < cfg.epochs:
        frozen = trainer.epoch < trainer.frozen_epochs
        loss = trainer.train_epoch(xs, ys)
        trainer.update_norm_statistics(xs)
        scores = trainer.predict(val_x)
        val_map = metrics.mean_average_precision(scores, val_y)
        best = trainer.end_epoch(loss, val_map, scores, started)
        progress.emit(progress.Event("validated", values={"epoch": trainer.epoch, "loss": loss, "val_mAP": val_map,
                                                          "best": float(best)}))
        logger.info("epoch %d/%d  loss %.4f  val mAP %.4f%s%s", trainer.epoch, cfg.epochs, loss, val_map,
                    "  (best)" if best else "", "  (backbone frozen)" if frozen else "")
        if checkpoint:
            save_checkpoint(checkpoint, trainer.state(key), storage_options)
    return trainer.result(val_y, started)


def write_bundle(result: TrainResult, out: str, *, name: str, classes: Sequence[str], pre: Preprocess,
                 cfg: TrainConfig, storage_options: StorageOptions = None, extra: dict | None = None,
                 weights_dtype: str = "float32") -> Bundle:
    """The trained model as a bundle, with calibrated thresholds and validation metrics."""
    report = metrics.evaluate(result.val_scores, result.val_targets, result.thresholds, list(classes))
    at_half = metrics.classification_metrics(result.val_scores >= 0.5, result.val_targets)
    summary = {
        "validation": {"images": report["images"], "mAP": report["mAP"], "per_class_ap": report["per_class_ap"],
                       "positives": report["positives"], "at_thresholds": report["at_thresholds"],
                       "at_0.5": at_half, "at_top3": report["at_top3"]},
        "thresholds": result.threshold_info,
        "training": {**cfg.to_dict(), "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1),
                     "history": [{k: round(v, 5) for k, v in h.items()} for h in result.history], **(extra or {})},
    }
    return save_bundle(out, name=name, arch=cfg.arch, classes=list(classes), state_dict=result.state_dict,
                       preprocess=pre, thresholds=[float(t) for t in result.thresholds],
                       threshold_method=result.threshold_info["method"], metrics=summary,
                       weights_dtype=weights_dtype, storage_options=storage_options)
