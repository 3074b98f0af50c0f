"""Train a multi-label classifier and write it as a bundle.

Multi-label, not multi-class: one logit per class, sigmoid, binary
cross-entropy with logits and label smoothing 0.1 (focal and asymmetric
losses as options); an image with no labels is a valid example whose
targets are all (smoothed) zeros. Thresholds are
calibrated per class on the validation split (`metrics.calibrate_thresholds`)
and stored in the bundle with the validation metrics, so `mlcls tag` applies
exactly what was measured.

The defaults are measured against the loop a user writes by hand (issue 14,
bench/train_vs_loop.py): AdamW at 1e-3 with a warm-up, a flat stretch and a
cosine anneal (`schedule.py`), batches of 64, as many epochs as show the
model about 14,400 images, in fp32 the first half of them at 3/4 of the
side (progressive resizing: fp32 steps cost twice bf16's, and the reduced
epochs buy back the time), augmentation that keeps every label true and no
flips unless asked (`augment.py`). Nothing is frozen by default, pretrained
weights with a new head included: the warm-up shields their backbone from
the new head's first gradients, where a frozen first epoch spent the
warm-up on the head alone and then unfroze the backbone at the peak rate
(measured, `TrainConfig`; `freeze_epochs` asks for it).
bf16 autocast runs where the hardware computes bf16 natively (CUDA, CPUs
with AMX or AVX-512 BF16), with channels-last tensors; `compile` wraps the
model in `torch.compile`.

Only the last epoch is validated (the anneal ends at the best weights;
`schedule.validated_epochs`): batch-norm statistics are then recomputed
exactly ("precise BN"), the model is validated, and the validated epoch with
the best mAP is kept. The whole run state is checkpointed after every epoch
(`checkpoint.py`), so a run that dies resumes where it stopped and ends
exactly as an uninterrupted one.

Images are decoded once into uint8 arrays (`mlcls.train.image_cache`) and
augmented as tensors on the device, which keeps a CPU busy with the model
instead of with decoding every epoch. Validation images go through the
exact inference preprocessing, so validation metrics are tagging metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from mlcls.tag.engine import Normaliser, fold_batchnorm, resolve_device, resolve_precision
from mlcls.train import metrics
from mlcls.train.augment import Augment, centre, shrink
from mlcls.train.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from mlcls.train.image_cache import stored_preprocess
from mlcls.train.labels import multi_hot
from mlcls.train.losses import auto_pos_weight, check_loss_options, make_loss
from mlcls.train.schedule import MAX_EPOCHS, default_epochs, default_low_res_share, lr_factor, validated_epochs
from mlcls.train.weights import InitWeights, head_parameters, init_model

logger = logging.getLogger(__name__)
DEFAULT_SMOOTHING = 0.1  # label smoothing with BCE (issue 14, bench/RESULTS.md)
MIN_LOW_RES = 32  # below this a reduced-resolution epoch teaches little about the full-size images
__all__ = ["Augment", "TrainConfig", "TrainResult", "Trainer", "eval_pixels", "fit", "multi_hot", "train_pixels",
           "write_bundle"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; the defaults suit random init and fine-tuning alike (bench/RESULTS.md).

    `epochs=None` picks the passes from the data set's size
    (`schedule.default_epochs`). `freeze_epochs` epochs train only the
    head; none by default, even when pretrained weights got a new head: on
    the handwritten-scan bench, from another task's weights with their head
    replaced (bf16, 3 seeds), one frozen epoch gave calibrated macro-F1
    0.9762/0.9803/0.9803 and none 0.9858/0.9837/0.9793; from strong weights
    with a new head 0.9860 and 0.9870 (bench/RESULTS.md, issue 14, eighteenth
    pass). The frozen epoch used up the warm-up on the head, so the backbone
    met the peak rate at once; restarting the warm-up at the unfreeze gave
    0.9804/0.9804/0.9807. `warmup` and `anneal` are
    shares of the steps (`schedule.lr_factor`). `scale` is the range of
    the augmented content's side (zoom out only), `jitter` the brightness
    and contrast change. `precise_bn` training images recompute batch-norm
    statistics before each validation (0: keep the moving averages).

    Horizontal flips are off unless asked for: a mirrored digit, letter or
    logo is not what the class looks like, and on handwritten scans flips
    cost test mAP 0.99 -> 0.92 (bench/RESULTS.md, issue 14); photos of
    things, where a mirror image keeps its labels, gain little from them in
    a short run.
    """

    arch: str = "mobilenet_v3_small"
    epochs: int | None = None
    freeze_epochs: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.03
    anneal: float = 0.3
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    scale: tuple[float, float] = (0.85, 1.0)
    hflip: bool = False
    vflip: bool = False
    jitter: float = 0.1
    loss: str = "bce"
    label_smoothing: float | None = None  # None: DEFAULT_SMOOTHING with bce, none with focal and asl
    pos_weight: bool = False
    amp: bool = True
    compile: bool = False
    precise_bn: int = 512
    low_res: float = 0.75
    low_res_share: float | None = None  # None: chosen with the epochs (`for_data`)

    def __post_init__(self) -> None:
        if self.freeze_epochs is None:  # older records and deployments: None meant "1 for a new head on weights"
            object.__setattr__(self, "freeze_epochs", 0)

    def validate(self) -> TrainConfig:
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1 or self.lr <= 0 \
                or self.weight_decay < 0:
            raise OptionError("--epochs and --batch-size must be >= 1, --lr > 0 and --weight-decay >= 0")
        if not 0 <= self.freeze_epochs <= (self.epochs or MAX_EPOCHS):
            bound = self.epochs if self.epochs is not None else f"at most {MAX_EPOCHS} by default"
            raise OptionError(f"--freeze-epochs must be between 0 and --epochs ({bound}), not {self.freeze_epochs}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise OptionError(f"--scale must be in (0, 1] (the content is shrunk, never cropped), not {lo}")
        if not (0 <= self.warmup < 1 and 0 <= self.anneal <= 1 and self.warmup + self.anneal <= 1):
            raise OptionError("warm-up and anneal are shares of the steps: each in [0, 1], together at most 1")
        if not 0 <= self.jitter < 1:
            raise OptionError(f"--jitter must be in [0, 1), not {self.jitter}")
        if not 0 < self.low_res <= 1:
            raise OptionError(f"--low-res is a share of the side, in (0, 1], not {self.low_res}")
        if self.low_res_share is not None and not 0 <= self.low_res_share < 1:
            raise OptionError(f"--low-res-epochs is a share of the epochs, in [0, 1), not {self.low_res_share}")
        if self.precise_bn < 0:
            raise OptionError("precise_bn (images for batch-norm statistics) must be >= 0")
        if not self.augment and (self.hflip or self.vflip):
            raise OptionError("--hflip and --vflip are augmentations: drop them or --no-augment")
        check_loss_options(self.loss, pos_weight=self.pos_weight, smoothing=self.smoothing())
        return self

    def for_data(self, train_images: int, reduced_precision: bool = False) -> TrainConfig:
        """This config with `epochs`, `low_res_share` and `label_smoothing` fixed: the given ones, or those that
        fit `train_images`, the precision the steps run in and the loss (`schedule.default_epochs`,
        `default_low_res_share`, `smoothing`).
        Given epochs with no share given train at full size throughout: a pinned schedule stays plain."""
        share = self.low_res_share
        if share is None:
            share = default_low_res_share(reduced_precision) if self.epochs is None else 0.0
        epochs = self.epochs or default_epochs(train_images)
        return replace(self, epochs=epochs, low_res_share=share, label_smoothing=self.smoothing()).validate()

    def smoothing(self) -> float:
        """The label smoothing this run trains with: the given one, else `DEFAULT_SMOOTHING` with BCE
        (measured there, bench/RESULTS.md) and none with focal or asymmetric loss, which weigh easy and
        hard targets their own way."""
        if self.label_smoothing is not None:
            return self.label_smoothing
        return DEFAULT_SMOOTHING if self.loss == "bce" else 0.0

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype this config trains in on its device (None: plain fp32)."""
        return resolve_precision("auto", resolve_device(self.device)) if self.amp else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise OptionError(f"unknown training options: {', '.join(sorted(unknown))}")
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d).validate()


@dataclass
class TrainResult:
    """The best model's weights, its validation outputs, calibrated thresholds and the history.

    `cfg` is the config the run trained with, every default fixed (epochs, reduced-size share, label
    smoothing, frozen epochs, device), so the bundle records what ran rather than what was asked."""

    state_dict: dict[str, torch.Tensor]
    val_scores: np.ndarray
    val_targets: np.ndarray
    thresholds: np.ndarray
    threshold_info: dict[str, Any]
    cfg: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int = 0
    precision: str = "fp32"


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
        assert cfg.epochs is not None, "fix the epochs first: cfg.for_data(train_images)"
        torch.manual_seed(cfg.seed)
        self.cfg, self.steps, self.epochs = cfg, steps_per_epoch, cfg.epochs
        self.device = resolve_device(cfg.device)
        self.model = init_model(cfg.arch, num_classes, init).to(self.device).to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.normalise = Normaliser(pre, self.device)
        self.augment = Augment(pre.size, scale=cfg.scale, hflip=cfg.hflip, vflip=cfg.vflip, jitter=cfg.jitter)
        self.size = pre.size
        self.loss_fn = make_loss(cfg.loss, pos_weight=None if pos_weight is None else pos_weight.to(self.device),
                                 smoothing=cfg.smoothing())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = self.epochs * steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: lr_factor(step, total, cfg.warmup, cfg.anneal))
        self.amp = cfg.autocast_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.head = {id(p) for p in head_parameters(self.model, cfg.arch, num_classes)}
        self.validate_at = set(validated_epochs(self.epochs, cfg.anneal))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] | None = None

    @property
    def frozen_epochs(self) -> int:
        """Epochs that train only the head (`TrainConfig.freeze_epochs`)."""
        return self.cfg.freeze_epochs

    def train_epoch(self, xs: torch.Tensor, ys: torch.Tensor) -> float:
        """One pass over the training set in a seeded order; returns the mean loss."""
        frozen = self.epoch < self.frozen_epochs
        for p in self.model.parameters():
            p.requires_grad_(not frozen or id(p) in self.head)
        self.model.train()
        order = torch.randperm(len(xs), generator=self.gen)
        progress.emit(progress.Event("epoch", total=self.steps,
                                     values={"epoch": self.epoch + 1, "epochs": self.epochs}))
        total = 0.0
        for b in range(self.steps):
            idx = order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]
            loss = self.step(xs[idx], ys[idx])
            total += loss * len(idx)
            progress.emit(progress.Event("step", count=len(idx), values={"loss": loss}))
        return total / len(xs)

    def input_size(self) -> int:
        """The side the model trains at this epoch: reduced in the first `low_res_share` of the epochs."""
        if self.epoch < round((self.cfg.low_res_share or 0.0) * self.epochs):
            return min(self.size, max(MIN_LOW_RES, 8 * round(self.size * self.cfg.low_res / 8)))
        return self.size

    def step(self, pixels: torch.Tensor, targets: torch.Tensor) -> float:
        x, size = self.normalise(pixels), self.input_size()
        x = self.augment(x, self.gen, size) if self.cfg.augment else shrink(centre(x, self.size), size)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.forward(x.contiguous(memory_format=torch.channels_last))
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
        """Sigmoid probabilities for (N, size, size, 3) uint8 pixels, computed as tagging computes them.

        The batch norms are folded into a copy of the model first, as the tag
        engine folds them (`fold_batchnorm`): in bf16 the folded and unfolded
        models round differently (up to 0.013 apart in a probability on an
        AVX-512 BF16 EPYC), and thresholds calibrated on the unfolded scores
        would not be the ones tagging and `mlcls eval` meet.
        """
        self.model.eval()
        model = fold_batchnorm(self.model)
        out = []
        for i in range(0, len(pixels), self.cfg.batch_size):
            x = self.normalise(torch.from_numpy(pixels[i:i + self.cfg.batch_size]))
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out.append(torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last)).float()).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)

    def wants_validation(self) -> bool:
        """Whether the epoch just trained is one the best-epoch choice looks at (`schedule.validated_epochs`)."""
        return self.epoch + 1 in self.validate_at

    def end_epoch(self, loss: float, val_map: float | None, scores: np.ndarray | None, started: float) -> bool:
        """Record the epoch; keep its weights if it was validated and its mAP is the best so far (returns whether)."""
        self.epoch += 1
        entry = {"epoch": self.epoch, "loss": loss, "seconds": round(time.perf_counter() - started, 2)}
        if val_map is None or scores is None:
            self.history.append(entry)
            return False
        self.history.append({**entry, "val_mAP": val_map})
        best = self.best is None or _better(val_map, self.best[0])
        if best:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best = (val_map, self.epoch, state, scores)
        return best

    def state(self, fingerprint: str) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (tensors and plain values only)."""
        state = {"fingerprint": fingerprint, "epoch": self.epoch, "history": self.history,
                 "model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict(), "gen": self.gen.get_state(), "rng": torch.get_rng_state()}
        if self.best is not None:  # none before the first validated epoch
            state.update({"best_map": self.best[0], "best_epoch": self.best[1], "best_state": self.best[2],
                          "best_scores": torch.from_numpy(self.best[3])})
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.best = ((state["best_map"], state["best_epoch"], state["best_state"], state["best_scores"].numpy())
                     if "best_state" in state else None)

    def result(self, val_y: np.ndarray, started: float) -> TrainResult:
        """The best epoch's weights with thresholds calibrated on its validation scores."""
        assert self.best is not None
        _, epoch, state, scores = self.best
        thresholds, info = metrics.calibrate_thresholds(scores, val_y)
        return TrainResult(state_dict=state, val_scores=scores, val_targets=val_y, thresholds=thresholds,
                           threshold_info=info, history=self.history, seconds=time.perf_counter() - started,
                           cfg=replace(self.cfg, device=self.device.type),
                           best_epoch=epoch,
                           precision=str(self.amp).replace("torch.", "") if self.amp else "fp32")


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

    `train_x` holds the stored squares (`stored_preprocess`), `val_x` the
    exact inference input. `cfg.epochs=None` is fixed here from the data's
    size. With `checkpoint`, the run state is saved after every epoch;
    `resume` continues from it.
    """
    cfg = cfg.validate()
    cfg = cfg.for_data(len(train_x), reduced_precision=cfg.autocast_dtype() is not None)
    assert cfg.epochs is not None
    started = time.perf_counter()
    steps = math.ceil(len(train_x) / cfg.batch_size)
    pos_weight = auto_pos_weight(train_y) if cfg.pos_weight else None
    trainer = Trainer(cfg, pre, train_y.shape[1], steps, init=init, pos_weight=pos_weight)
    settings = {**cfg.to_dict(), "device": None, "pre": pre.to_dict()}
    key = fingerprint(settings, classes or [str(j) for j in range(train_y.shape[1])], len(train_x), len(val_x))
    if resume and checkpoint:
        trainer.load_state(load_checkpoint(checkpoint, key, storage_options))
        logger.info("resumed from %s after epoch %d of %d", checkpoint, trainer.epoch, cfg.epochs)
    logger.info("%d epochs of %d steps, lr %g, %s, validating epochs %s", cfg.epochs, steps, cfg.lr,
                "bf16 autocast" if trainer.amp == torch.bfloat16 else str(trainer.amp or "fp32"),
                ", ".join(str(e) for e in sorted(trainer.validate_at)))
    xs, ys = torch.from_numpy(train_x), torch.from_numpy(train_y)
    while trainer.epoch < cfg.epochs:
        run_epoch(trainer, xs, ys, val_x, val_y, started)
        if checkpoint:
            save_checkpoint(checkpoint, trainer.state(key), storage_options)
    return trainer.result(val_y, started)


def run_epoch(trainer: Trainer, xs: torch.Tensor, ys: torch.Tensor, val_x: np.ndarray, val_y: np.ndarray,
              started: float) -> None:
    """Train one epoch; validate it only if the best-epoch choice looks at it."""
    frozen = trainer.epoch < trainer.frozen_epochs
    loss = trainer.train_epoch(xs, ys)
    if not trainer.wants_validation():
        trainer.end_epoch(loss, None, None, started)
        logger.info("epoch %d/%d  loss %.4f%s", trainer.epoch, trainer.epochs, loss,
                    "  (backbone frozen)" if frozen else "")
        return
    trainer.update_norm_statistics(xs)
    scores = trainer.predict(val_x)
    val_map = metrics.mean_average_precision(scores, val_y)
    best = trainer.end_epoch(loss, val_map, scores, started)
    progress.emit(progress.Event("validated", values={"epoch": trainer.epoch, "loss": loss, "val_mAP": val_map,
                                                      "best": float(best)}))
    logger.info("epoch %d/%d  loss %.4f  val mAP %.4f%s%s", trainer.epoch, trainer.epochs, loss, val_map,
                "  (best)" if best else "", "  (backbone frozen)" if frozen else "")


def write_bundle(result: TrainResult, out: str, *, name: str, classes: Sequence[str], pre: Preprocess,
                 storage_options: StorageOptions = None, extra: dict | None = None,
                 weights_dtype: str = "float32") -> Bundle:
    """The trained model as a bundle, with calibrated thresholds and validation metrics."""
    report = metrics.evaluate(result.val_scores, result.val_targets, result.thresholds, list(classes))
    at_half = metrics.classification_metrics(result.val_scores >= 0.5, result.val_targets)
    summary = {
        "validation": {"images": report["images"], "mAP": report["mAP"], "per_class_ap": report["per_class_ap"],
                       "positives": report["positives"], "at_thresholds": report["at_thresholds"],
                       "at_0.5": at_half, "at_top3": report["at_top3"]},
        "thresholds": result.threshold_info,
        "training": {**result.cfg.to_dict(), "precision": result.precision,
                     "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1),
                     "history": [{k: round(v, 5) for k, v in h.items()} for h in result.history], **(extra or {})},
    }
    return save_bundle(out, name=name, arch=result.cfg.arch, classes=list(classes), state_dict=result.state_dict,
                       preprocess=pre, thresholds=[float(t) for t in result.thresholds],
                       threshold_method=result.threshold_info["method"], metrics=summary,
                       weights_dtype=weights_dtype, storage_options=storage_options)
