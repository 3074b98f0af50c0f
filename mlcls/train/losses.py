"""Multi-label losses: one independent binary problem per class, on logits.

- `bce`: binary cross-entropy with logits, optionally with `pos_weight`
  (n_neg / n_pos per class, clipped) so rare classes are not drowned by
  their negatives;
- `focal`: BCE scaled by (1 - p_t)^γ (Lin et al. 2017), which spends the
  gradient on hard examples;
- `asl`: asymmetric loss (Ridnik et al. 2021): focusing only on negatives
  (γ− = 4, γ+ = 0) and a probability margin (clip 0.05) that ignores easy
  negatives altogether, for label sets with many more negatives than
  positives.

All reduce by the mean over every (image, class) element, so their scales
are comparable and the learning rate need not change with the loss.

`smoothing` ε (label smoothing, Szegedy et al. 2016, per binary problem)
trains toward 1 − ε/2 and ε/2 instead of 1 and 0: a target the sigmoid can
reach, so the logits of easy examples stop growing and the gradient stays
on the hard ones. The 0.5 cut is unchanged (the targets are symmetric about
it), and the calibrated thresholds are chosen on the smoothed model's scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlcls.errors import OptionError

LOSSES = ("bce", "focal", "asl")
MAX_POS_WEIGHT = 10.0


def auto_pos_weight(targets: np.ndarray, max_weight: float = MAX_POS_WEIGHT) -> torch.Tensor:
    """Per-class n_neg / n_pos, clipped to [1, max_weight]; 1 for a class with no positives."""
    pos = targets.sum(0).astype(np.float64)
    neg = len(targets) - pos
    ratio = np.divide(neg, pos, out=np.ones_like(pos), where=pos > 0)
    return torch.from_numpy(np.clip(ratio, 1.0, max_weight).astype(np.float32))


class FocalLoss(nn.Module):
    """Sigmoid focal loss; γ = 0 and no α is plain BCE."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = torch.exp(-bce)
        loss = bce * (1.0 - p_t) ** self.gamma
        if self.alpha is not None:
            loss = loss * (self.alpha * targets + (1.0 - self.alpha) * (1.0 - targets))
        return loss.mean()


class AsymmetricLoss(nn.Module):
    """ASL; γ− = γ+ = 0 and clip 0 is plain BCE."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        log_p = F.logsigmoid(logits)
        if self.clip > 0:  # shifted probability: negatives with p < clip cost nothing
            p_neg = (p - self.clip).clamp(min=0)
            log_not_p = torch.log((1.0 - p_neg).clamp(min=self.eps))
        else:
            p_neg = p
            log_not_p = F.logsigmoid(-logits)
        pos = targets * log_p * (1.0 - p) ** self.gamma_pos
        neg = (1.0 - targets) * log_not_p * p_neg ** self.gamma_neg
        return -(pos + neg).mean()


class SmoothedTargets(nn.Module):
    """`loss` against targets pulled `smoothing` / 2 toward 0.5 from each side."""

    def __init__(self, loss: nn.Module, smoothing: float) -> None:
        super().__init__()
        self.loss, self.smoothing = loss, smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets * (1.0 - self.smoothing) + self.smoothing / 2)


def check_loss_options(name: str, *, pos_weight: bool = False, smoothing: float = 0.0) -> None:
    """One line on what to fix where the loss options do not go together (checked before any work)."""
    if name not in LOSSES:
        raise OptionError(f"--loss {name!r}: use one of {', '.join(LOSSES)}")
    if pos_weight and name != "bce":
        raise OptionError(f"--pos-weight goes with --loss bce; {name} balances classes its own way")
    if not 0 <= smoothing < 1:
        raise OptionError(f"--label-smoothing must be in [0, 1), not {smoothing}")


def make_loss(name: str, *, pos_weight: torch.Tensor | None = None, smoothing: float = 0.0) -> nn.Module:
    """The loss called `name`, with label `smoothing` (see the module); `pos_weight` only goes with `bce`."""
    check_loss_options(name, pos_weight=pos_weight is not None, smoothing=smoothing)
    loss: nn.Module
    if name == "focal":
        loss = FocalLoss()
    elif name == "asl":
        loss = AsymmetricLoss()
    else:
        loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return SmoothedTargets(loss, smoothing) if smoothing > 0 else loss
