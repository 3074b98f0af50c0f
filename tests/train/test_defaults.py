"""Defaults that fit the data (issue 14): schedule, epochs, validated epochs, input size, kept heads, bf16."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mlcls.errors import OptionError
from mlcls.images.preprocess import Preprocess
from mlcls.tag.engine import cpu_has_fast_bf16
from mlcls.train.input_size import InputChoice, resolve_preprocess, size_for
from mlcls.train.schedule import default_epochs, lr_factor, validated_epochs
from mlcls.train.trainer import TrainConfig, Trainer
from mlcls.train.weights import load_init_weights
from tests.helpers.training import CFG, PRE


def test_lr_warms_up_stays_flat_then_anneals_to_zero():
    total = 100
    f = [lr_factor(s, total, warmup=0.05, anneal=0.3) for s in range(total)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5:70] == [1.0] * 65  # flat at the peak, as the hand-written loop's constant Adam
    anneal = f[70:]
    assert all(a > b for a, b in itertools.pairwise(anneal)) and anneal[-1] < 0.01
    assert [lr_factor(s, 10, warmup=0.0, anneal=0.0) for s in range(10)] == [1.0] * 10


def test_epochs_fit_the_data_size_and_validation_only_where_the_best_epoch_is_chosen():
    assert default_epochs(1200) == 12  # about 14,400 images seen
    assert default_epochs(100_000) == 4 and default_epochs(40) == 30
    assert validated_epochs(10, 0.3) == [10] and validated_epochs(1, 0.3) == [1]
    assert validated_epochs(5, 0.0) == [5] and validated_epochs(10, 0.1) == [10]
    assert TrainConfig(batch_size=32).for_data(1200).epochs == TrainConfig().for_data(1200).epochs == 12
    assert TrainConfig(epochs=3).for_data(1200, reduced_precision=True).epochs == 3
    assert TrainConfig(amp=False).autocast_dtype() is None
    assert TrainConfig(epochs=3).for_data(1200).epochs == 3


def test_fp32_runs_train_their_first_half_at_reduced_size_unless_told_otherwise():
    # fp32 steps cost twice bf16's: the default spends the first half of the epochs at 3/4 side
    assert TrainConfig().for_data(1200).low_res_share == 0.5
    assert TrainConfig().for_data(1200, reduced_precision=True).low_res_share == 0.0
    assert TrainConfig(epochs=12).for_data(1200).low_res_share == 0.0  # pinned epochs: a plain schedule
    assert TrainConfig(epochs=12, low_res_share=0.25).for_data(1200).low_res_share == 0.25
    assert TrainConfig(low_res_share=0.0).for_data(1200).low_res_share == 0.0
    resolved = TrainConfig().for_data(1200)
    assert resolved.for_data(50) == resolved  # resolved once: a resumed run keeps its schedule


def test_input_size_comes_from_the_images_and_whole_images_are_kept(tmp_path):
    assert size_for([128] * 7) == 128 and size_for([1000, 800, 600]) == 224
    assert size_for([20]) == 32 and size_for([100, 110, 90]) == 96
    uris = []
    for i, (w, h) in enumerate([(100, 70), (90, 80), (120, 64)]):
        Image.new("RGB", (w, h), (i, 0, 0)).save(tmp_path / f"{i}.png")
        uris.append(str(tmp_path / f"{i}.png"))
    pre = resolve_preprocess(InputChoice(), uris)
    assert pre == Preprocess(size=64, resize_size=64, resize_mode="squash")  # median shorter side 70 -> 64
    assert resolve_preprocess(InputChoice(size=96), uris) == Preprocess(size=96, resize_size=96,
                                                                       resize_mode="squash")
    assert resolve_preprocess(InputChoice(size=48, resize_mode="shorter"), uris) == Preprocess(48, 55)
    assert resolve_preprocess(PRE, uris) is PRE
    with pytest.raises(OptionError, match="--resize-size goes with --resize-mode shorter"):
        InputChoice(size=48, resize_size=56).check()


def test_a_head_that_fits_the_classes_is_kept_and_nothing_is_frozen(tmp_path):
    torch.manual_seed(2)
    earlier = torchvision.models.get_model("mobilenet_v3_small", num_classes=6).state_dict()
    torch.save(earlier, tmp_path / "run.pth")
    init = load_init_weights(str(tmp_path / "run.pth"), "mobilenet_v3_small", 6)
    assert init is not None and init.dropped == []
    trainer = Trainer(replace(CFG, epochs=2), PRE, 6, 3, init=init)
    assert trainer.frozen_epochs == 0
    assert torch.equal(trainer.model.state_dict()["classifier.3.weight"], earlier["classifier.3.weight"])
    other = load_init_weights(str(tmp_path / "run.pth"), "mobilenet_v3_small", 5)
    assert other is not None and len(other.dropped) == 2
    assert Trainer(replace(CFG, epochs=2), PRE, 5, 3, init=other).frozen_epochs == 0  # a new head: still none
    assert Trainer(replace(CFG, epochs=2, freeze_epochs=1), PRE, 5, 3, init=other).frozen_epochs == 1
    assert Trainer(replace(CFG, epochs=2), PRE, 5, 3, init=None).frozen_epochs == 0


def test_bf16_autocast_where_the_cpu_computes_it_natively():
    trainer = Trainer(replace(CFG, epochs=1), PRE, 6, 1)
    assert trainer.amp == (torch.bfloat16 if cpu_has_fast_bf16() else None)
    assert Trainer(replace(CFG, epochs=1, amp=False), PRE, 6, 1).amp is None
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8))
    y = torch.zeros(4, 6)
    before = trainer.model.classifier[3].weight.detach().clone()
    loss = trainer.step(x, y)
    after = trainer.model.classifier[3].weight
    assert np.isfinite(loss) and after.dtype == torch.float32 and not torch.equal(after, before)
