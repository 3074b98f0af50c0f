"""How long to train, how the learning rate moves, and which epochs are worth validating.

The learning rate: a short linear warm-up, a long flat stretch at the peak,
then a cosine anneal to zero over the last `anneal` share of the steps.
Constant Adam at 1e-3 is what a hand-written loop uses, and it trains a
random-init ResNet well; the warm-up keeps the first steps from wrecking
given weights when fine-tuning, and the anneal settles the weights at the
end (measured in bench/train_vs_loop.py; bench/RESULTS.md). One-cycle's
long ramp spent a third of a short run below the useful rate.

Epochs: a small data set needs more passes than a large one; `default_epochs`
aims at a number of training images seen (12 passes over 1,200 images) and
bounds the passes. Measured on real handwritten scans (bench/RESULTS.md,
issue 14): 8, 9, 10 and 12 passes over 1,200 images gave test mAP 0.83,
0.90, 0.95 and 0.96, and on the large-digit scans 12 passes instead of 10
raised calibrated macro-F1 from 0.975-0.985 to 0.982-0.986 (bf16, 4 and 3
seeds). Where the run uses bf16 autocast (CUDA, CPUs with AMX or AVX-512
BF16) a step costs about half of fp32's and the 12 passes stay well under a
hand-written loop's time. In fp32 they would cost 1.15x the loop, so fp32
runs train the first half of the epochs at 3/4 of the side
(`default_low_res_share`, progressive resizing): such an epoch costs about
0.6 of a full one, and the 12 passes cost about what 10 full ones do. On the
same machine and data that was 0.94-0.98x the time of 10 full passes, with
calibrated macro-F1 +0.026 on the small-digit scans and equal (+0.0005) on
the large-digit ones (AVX2 EPYC; bench/RESULTS.md, issue 14, seventh pass).
Batches of 64 reach the mAP of batches of 32 (0.943 against 0.947) in half
the steps, at about the same fp32 cost per image on a CPU (-2 %).

Validation: with a schedule annealed to zero the best weights are at the
end of the run: in every bench run the last epoch was the best of those
validated (bench/RESULTS.md, issue 14). So only the last epoch is validated:
each validation re-estimates batch-norm statistics and scores the validation
set, about 20-40 % of an epoch's time on a CPU. `VALIDATED_EPOCHS` keeps the
best-epoch choice for whoever wants more.
"""

from __future__ import annotations

import math

TARGET_IMAGES = 14_400  # training images a default run sees (bench/RESULTS.md, issue 14)
LOW_RES_SHARE = 0.5  # share of a default fp32 run's epochs at reduced size; bf16 runs need no saving
MIN_EPOCHS, MAX_EPOCHS = 4, 30


def default_epochs(train_images: int) -> int:
    """Passes over the data that show the model about `TARGET_IMAGES` images, within [MIN_EPOCHS, MAX_EPOCHS]."""
    return min(MAX_EPOCHS, max(MIN_EPOCHS, round(TARGET_IMAGES / max(1, train_images))))


def default_low_res_share(reduced_precision: bool) -> float:
    """The share of the epochs trained at reduced size: half in fp32, whose full-size steps cost twice bf16's."""
    return 0.0 if reduced_precision else LOW_RES_SHARE


def lr_factor(step: int, total: int, warmup: float, anneal: float) -> float:
    """The learning-rate multiplier at `step` of `total`: linear warm-up, flat, cosine anneal to 0."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    start = total - round(anneal * total)
    if step < warm:
        return (step + 1) / warm
    if step < start or total <= start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - start) / (total - start)))


VALIDATED_EPOCHS = 1  # the best-epoch choice looks at this many of the last epochs


def validated_epochs(epochs: int, anneal: float) -> list[int]:
    """The 1-based epochs to validate: the last `VALIDATED_EPOCHS` that end inside the anneal, the last always."""
    first = epochs - min(VALIDATED_EPOCHS, max(1, math.ceil(anneal * epochs))) + 1
    return list(range(max(1, first), epochs + 1))
