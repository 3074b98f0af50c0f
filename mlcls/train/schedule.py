"""How long to train, how the learning rate moves, and which epochs are worth validating.

The learning rate: a short linear warm-up, a long flat stretch at the peak,
then a cosine anneal to zero over the last `anneal` share of the steps.
Constant Adam at 1e-3 is what a hand-written loop uses, and it trains a
random-init ResNet well; the warm-up keeps the first steps from wrecking
given weights when fine-tuning, and the anneal settles the weights at the
end (measured in bench/train_vs_loop.py; bench/RESULTS.md). One-cycle's
long ramp spent a third of a short run below the useful rate.

Epochs: a small data set needs more passes than a large one to give the
optimiser the same number of steps; `default_epochs` aims at a number of
steps and bounds the passes.

Validation: with an annealed schedule the best weights are at the end of
the run, so only the last two epochs inside the anneal are validated (the
last one always): the best-epoch choice needs nothing more, and each
validation re-estimates batch-norm statistics and scores the validation
set, about 40 % of an epoch's time on a CPU (bench/RESULTS.md, issue 14).
"""

from __future__ import annotations

import math

TARGET_STEPS = 450  # steps a default run aims at (bench/RESULTS.md, issue 14: 9 -> 14 epochs, mAP 0.78 -> 0.88)
MIN_EPOCHS, MAX_EPOCHS = 4, 30


def default_epochs(train_images: int, batch_size: int) -> int:
    """Passes over the data that give about `TARGET_STEPS` steps, within [MIN_EPOCHS, MAX_EPOCHS]."""
    steps = max(1, math.ceil(train_images / batch_size))
    return min(MAX_EPOCHS, max(MIN_EPOCHS, round(TARGET_STEPS / steps)))


def lr_factor(step: int, total: int, warmup: float, anneal: float) -> float:
    """The learning-rate multiplier at `step` of `total`: linear warm-up, flat, cosine anneal to 0."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    start = total - round(anneal * total)
    if step < warm:
        return (step + 1) / warm
    if step < start or total <= start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - start) / (total - start)))


VALIDATED_EPOCHS = 2  # the best-epoch choice looks at this many of the last epochs


def validated_epochs(epochs: int, anneal: float) -> list[int]:
    """The 1-based epochs to validate: the last `VALIDATED_EPOCHS` that end inside the anneal, the last always."""
    first = epochs - min(VALIDATED_EPOCHS, max(1, math.ceil(anneal * epochs))) + 1
    return list(range(max(1, first), epochs + 1))
