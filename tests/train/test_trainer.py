"""Training: bundle round trip through tagging, resume, starting weights, freezing, losses, augmentation."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision

from mlcls import progress
from mlcls.bundle import load_bundle
from mlcls.demo.synth import make_dataset
from mlcls.errors import BundleError, LabelsError, OptionError
from mlcls.tag.job import TagOptions, tag_images
from mlcls.train import metrics
from mlcls.train.augment import Augment
from mlcls.train.labels import LabelsSpec, multi_hot
from mlcls.train.losses import AsymmetricLoss, FocalLoss, SmoothedTargets, auto_pos_weight, make_loss
from mlcls.train.train_job import train_from_labels
from mlcls.train.trainer import TrainConfig, Trainer, eval_pixels, fit, train_pixels
from mlcls.train.weights import InitWeights, load_init_weights
from tests.helpers.training import CFG, DATA, PRE, one_torch_thread, write_shapes


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def arrays():
    """In-memory pixels and targets: 48 training and 16 validation images."""
    classes = list(DATA.classes)
    train = make_dataset(48, seed=1, cfg=DATA)
    val = make_dataset(16, seed=2, cfg=DATA)
    return (train_pixels([im for im, _ in train], PRE), multi_hot([lb for _, lb in train], classes),
            eval_pixels([im for im, _ in val], PRE), multi_hot([lb for _, lb in val], classes))


def test_train_then_tag_gives_the_same_probabilities(tmp_path):
    labels = write_shapes(tmp_path / "data")
    trained = train_from_labels(LabelsSpec(str(labels)), str(tmp_path / "bundle"), cfg=CFG, pre=PRE)
    bundle = load_bundle(str(tmp_path / "bundle"))
    assert bundle.digest == trained.bundle.digest and bundle.classes == tuple(sorted(DATA.classes))
    assert bundle.threshold_method == "f1-per-class-shrunk" and bundle.preprocess == PRE
    result = trained.result
    v = bundle.metrics["validation"]
    assert v["images"] == trained.val_images == 24 and trained.train_images == 72
    assert v["mAP"] == pytest.approx(metrics.mean_average_precision(result.val_scores, result.val_targets))
    assert v["at_thresholds"]["empty_images"] == int((result.val_targets.sum(1) == 0).sum()) > 0
    history = bundle.metrics["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    validated = [h for h in history if "val_mAP" in h]
    assert [h["epoch"] for h in validated] == [2]  # only the anneal's epochs are validated
    assert bundle.metrics["training"]["best_epoch"] == max(validated, key=lambda h: h["val_mAP"])["epoch"]
    assert not (tmp_path / "bundle" / "checkpoint.pt").exists()
    ran = {k: bundle.metrics["training"][k] for k in ("epochs", "low_res_share", "label_smoothing", "freeze_epochs",
                                                      "device")}
    assert ran == {"epochs": 2, "low_res_share": CFG.for_data(72).low_res_share, "label_smoothing": 0.1,
                   "freeze_epochs": 0, "device": "cpu"}  # what ran, not the unfixed defaults

    tag_images(trained.val_uris, str(tmp_path / "tags"), model=str(tmp_path / "bundle"),
        options=TagOptions(device="cpu", batch_size=7))
    df = pl.read_parquet(f"{tmp_path}/tags/*.parquet")
    probs = dict(zip(df["uri"], np.array([[r[c] for c in bundle.classes] for r in df["probs"]]), strict=True))
    tagged = np.stack([probs[u] for u in trained.val_uris])
    np.testing.assert_allclose(tagged, result.val_scores, atol=2e-5)
    labels_out = dict(zip(df["uri"], df["labels"].to_list(), strict=True))
    expected = [[c for c, s, t in zip(bundle.classes, row, bundle.thresholds, strict=True) if s >= t]
                for row in result.val_scores]
    assert [labels_out[u] for u in trained.val_uris] == expected


def test_thresholds_are_calibrated_on_the_scores_tagging_gives_in_bf16(tmp_path, monkeypatch):
    """On a CPU with AMX or AVX-512 BF16 training validates and tagging runs in bf16 (forced here on any CPU).

    The tag engine folds the batch norms into the convolutions, which rounds
    differently in bf16: validation must score the model as tagging runs it,
    or the calibrated thresholds are not the ones tagging meets (four tests
    failed on an AVX-512 BF16 EPYC before validation folded them too).
    """
    monkeypatch.setattr("mlcls.tag.engine.cpu_has_fast_bf16", lambda cpuinfo=None: True)
    labels = write_shapes(tmp_path / "data")
    trained = train_from_labels(LabelsSpec(str(labels)), str(tmp_path / "bundle"), cfg=replace(CFG, epochs=1),
                                pre=PRE)
    assert trained.result.precision == "bfloat16"
    tag_images(trained.val_uris, str(tmp_path / "tags"), model=str(tmp_path / "bundle"),
               options=TagOptions(device="cpu", batch_size=7))
    df = pl.read_parquet(f"{tmp_path}/tags/*.parquet")
    classes = load_bundle(str(tmp_path / "bundle")).classes
    probs = dict(zip(df["uri"], np.array([[r[c] for c in classes] for r in df["probs"]]), strict=True))
    np.testing.assert_allclose(np.stack([probs[u] for u in trained.val_uris]), trained.result.val_scores, atol=2e-5)


def _stop_at_epoch(n: int):
    def listener(event: progress.Event) -> None:
        if event.kind == "epoch" and event.values["epoch"] == n:
            raise KeyboardInterrupt

    return listener


def test_an_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path, arrays, caplog):
    cfg = replace(CFG, epochs=3)
    whole = fit(*arrays, pre=PRE, cfg=cfg)
    ckpt = str(tmp_path / "ckpt.pt")
    unsubscribe = progress.subscribe(_stop_at_epoch(3))
    with pytest.raises(KeyboardInterrupt):
        fit(*arrays, pre=PRE, cfg=cfg, checkpoint=ckpt)
    unsubscribe()
    caplog.clear()  # only the resumed run's records (the mlcls logger may already be at INFO)
    with caplog.at_level(logging.INFO, logger="mlcls"):
        resumed = fit(*arrays, pre=PRE, cfg=cfg, checkpoint=ckpt, resume=True)
    logs = [r.getMessage() for r in caplog.records if r.name == "mlcls.train.trainer"]
    assert logs[0].startswith(f"resumed from {ckpt} after epoch 2 of 3") and len(logs) == 3
    assert logs[1].startswith("3 epochs of 3 steps") and logs[2].startswith("epoch 3/3  loss ")
    assert resumed.best_epoch == whole.best_epoch
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], abs=1e-6)
    for k, v in whole.state_dict.items():
        assert torch.allclose(resumed.state_dict[k].float(), v.float(), atol=1e-5), k
    np.testing.assert_allclose(resumed.thresholds, whole.thresholds, atol=1e-6)
    with pytest.raises(OptionError, match="is from a run with other data or settings"):
        fit(*arrays, pre=PRE, cfg=replace(cfg, lr=1e-3), checkpoint=ckpt, resume=True)


def test_a_new_head_on_pretrained_weights_trains_the_backbone_from_the_first_step_by_default(tmp_path, arrays):
    init = _imagenet_like_init(tmp_path)
    train_x, train_y, _, _ = arrays
    trainer = Trainer(replace(CFG, epochs=2), PRE, 6, 3, init=init)
    start = trainer.model.state_dict()["features.0.0.weight"].clone()
    trainer.train_epoch(torch.from_numpy(train_x), torch.from_numpy(train_y))
    assert not torch.equal(trainer.model.state_dict()["features.0.0.weight"], start)


def _imagenet_like_init(tmp_path) -> InitWeights:
    torch.manual_seed(1)
    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=1000).state_dict(), tmp_path / "w.pth")
    init = load_init_weights(str(tmp_path / "w.pth"), "mobilenet_v3_small", 6)
    assert init is not None and [d.split()[0] for d in init.dropped] == ["classifier.3.bias", "classifier.3.weight"]
    return init


def test_freeze_epochs_trains_only_the_new_head_first_then_everything(tmp_path, arrays):
    init = _imagenet_like_init(tmp_path)
    train_x, train_y, _, _ = arrays
    trainer = Trainer(replace(CFG, epochs=2, freeze_epochs=1), PRE, 6, 3, init=init)
    start = {k: v.clone() for k, v in trainer.model.named_parameters()}
    assert torch.equal(start["features.0.0.weight"], init.state_dict["features.0.0.weight"])
    xs, ys = torch.from_numpy(train_x), torch.from_numpy(train_y)
    trainer.train_epoch(xs, ys)
    trainer.epoch += 1
    after_one = dict(trainer.model.named_parameters())
    assert torch.equal(after_one["features.0.0.weight"], start["features.0.0.weight"])  # frozen
    assert not torch.equal(after_one["classifier.3.weight"], start["classifier.3.weight"])  # the new head learns
    trainer.train_epoch(xs, ys)
    assert not torch.equal(trainer.model.state_dict()["features.0.0.weight"], start["features.0.0.weight"])


def test_starting_weights_errors_and_the_offline_fallback(tmp_path, monkeypatch, caplog):
    torch.save(torchvision.models.get_model("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BundleError, match="do not fit mobilenet_v3_small: .*keys missing"):
        load_init_weights(str(tmp_path / "r18.pth"), "mobilenet_v3_small", 4)
    with pytest.raises(OptionError, match="not a torchvision weights name for resnet18 \\(it has: IMAGENET1K_V1"):
        load_init_weights("IMAGENET9K_V9", "resnet18", 4)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    caplog.clear()
    assert load_init_weights("auto", "resnet18", 4) is None
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "mlcls.train.weights" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "training from random init" in warnings[0] and "--weights FILE.pth" in warnings[0]
    assert load_init_weights("none", "resnet18", 4) is None


def test_losses_reduce_to_bce_and_asl_ignores_easy_negatives():
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 5) * 3, (torch.rand(8, 5) < 0.3).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, targets), bce, atol=1e-6)
    assert torch.allclose(AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, targets), bce, atol=1e-6)
    easy = torch.full((1, 3), -5.0)  # p = 0.0067 < clip 0.05: no loss at all for these negatives
    assert AsymmetricLoss()(easy, torch.zeros(1, 3)).item() == 0.0
    assert FocalLoss()(logits, targets) < bce
    weights = auto_pos_weight(np.array([[1, 0, 0]] * 5 + [[0, 0, 1]] * 30 + [[0, 0, 0]] * 65))
    assert weights.tolist() == pytest.approx([10.0, 1.0, 70 / 30])  # 95/5 clipped to 10; no positive: 1


def test_label_smoothing_trains_toward_reachable_targets_on_every_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 5) * 3, (torch.rand(8, 5) < 0.3).float()
    smoothed = make_loss("bce", smoothing=0.1)(logits, targets)
    assert torch.allclose(smoothed, F.binary_cross_entropy_with_logits(logits, targets * 0.9 + 0.05), atol=1e-6)
    assert make_loss("bce", smoothing=0.0)(logits, targets) == F.binary_cross_entropy_with_logits(logits, targets)
    # the loss is least where the sigmoid meets the smoothed target, not at an infinite logit
    z = torch.linspace(-8, 8, 1601)[:, None]
    loss = make_loss("bce", smoothing=0.1)
    per_logit = torch.stack([loss(v.view(1, 1), torch.ones(1, 1)) for v in z])
    assert torch.sigmoid(z[per_logit.argmin()]).item() == pytest.approx(0.95, abs=1e-3)
    for name in ("focal", "asl"):
        assert isinstance(make_loss(name, smoothing=0.1), SmoothedTargets)
    with pytest.raises(OptionError, match="--label-smoothing must be in \\[0, 1\\)"):
        TrainConfig(label_smoothing=1.0).validate()
    assert TrainConfig().smoothing() == 0.1 and TrainConfig(loss="asl").smoothing() == 0.0
    assert TrainConfig(loss="focal", label_smoothing=0.2).smoothing() == 0.2


@pytest.mark.parametrize("loss, pos_weight", [("focal", False), ("asl", False), ("bce", True)])
def test_every_loss_option_trains(arrays, loss, pos_weight):
    result = fit(*arrays, pre=PRE, cfg=replace(CFG, epochs=1, loss=loss, pos_weight=pos_weight))
    assert np.isfinite(result.history[0]["loss"]) and result.history[0]["loss"] > 0
    scores = result.val_scores
    assert scores.shape == (16, 6) and ((scores >= 0) & (scores <= 1)).all()
    assert (scores.std(0) > 1e-3).any()  # the outputs depend on the image


def test_augment_flips_and_shrinks_but_never_cuts_anything_out():
    x = torch.rand(64, 3, 8, 8)
    out = Augment(8, scale=(1.0, 1.0), hflip=True, jitter=0.0)(x, torch.Generator().manual_seed(0))
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    flipped = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(1)
    assert (same | flipped).all() and 16 < int(flipped.sum()) < 48  # whole image, flipped about half the time
    unflipped = Augment(8, scale=(1.0, 1.0), jitter=0.0)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(unflipped, x, atol=1e-5)  # no flips unless asked: a mirrored digit is not a digit
    assert TrainConfig().hflip is False
    corner = torch.zeros(64, 3, 32, 32)
    corner[:, :, :4, :4] = 1.0  # an "object" in the corner, where a random crop would cut it off
    out = Augment(32, scale=(0.6, 0.8), hflip=True, vflip=True, jitter=0.0)(corner, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and not torch.isclose(out, corner, atol=1e-3).flatten(1).all(1).any()
    kept = out.flatten(1).amax(1)  # the object is still in every image, at (nearly) full strength
    assert (kept > 0.9).all()
    jittered = Augment(8, scale=(1.0, 1.0), hflip=False, jitter=0.2)(x, torch.Generator().manual_seed(0))
    change = (jittered - x).abs().flatten(1).amax(1)
    assert (change > 1e-3).all() and (change < 0.2 * 1 + 0.2 / 0.226 + 1e-3).all()


def test_config_is_checked_before_training():
    with pytest.raises(OptionError, match="--pos-weight goes with --loss bce"):
        TrainConfig(loss="asl", pos_weight=True).validate()
    with pytest.raises(OptionError, match="--freeze-epochs must be between 0 and --epochs \\(2\\)"):
        TrainConfig(epochs=2, freeze_epochs=3).validate()
    with pytest.raises(OptionError, match="between 0 and --epochs \\(at most 30 by default\\), not -1"):
        TrainConfig(freeze_epochs=-1).validate()
    with pytest.raises(OptionError, match="--loss 'hinge'"):
        TrainConfig(loss="hinge").validate()
    with pytest.raises(OptionError, match="--scale must be in \\(0, 1\\]"):
        TrainConfig(scale=(0.9, 1.2)).validate()
    with pytest.raises(OptionError, match="--hflip and --vflip are augmentations"):
        TrainConfig(augment=False, vflip=True).validate()
    assert TrainConfig(augment=False).validate().hflip is False
    assert TrainConfig.from_dict(TrainConfig(scale=(0.5, 1.0)).to_dict()).scale == (0.5, 1.0)
    assert TrainConfig.from_dict({"freeze_epochs": None}).freeze_epochs == 0  # a record from before the default was 0


def test_labels_that_leave_a_class_without_training_positives_stop_before_reading_images(tmp_path):
    (tmp_path / "l.csv").write_text("image,labels,is_valid\nmissing-a.jpg,cat,0\nmissing-b.jpg,dog,1\n")
    with pytest.raises(LabelsError, match="no positive training image and cannot be learnt: dog"):
        train_from_labels(LabelsSpec(str(tmp_path / "l.csv")), str(tmp_path / "b"), cfg=CFG, pre=PRE)
    assert not (tmp_path / "b").exists()


def test_compile_without_a_compiler_stops_before_reading_labels_or_images(tmp_path, monkeypatch):
    # a slim container: Inductor would fail at the first step, after the images were read and decoded
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    labels = tmp_path / "l.csv"
    labels.write_text("image,labels\nmissing-a.jpg,cat\n")
    with pytest.raises(OptionError, match="--compile: no C\\+\\+ compiler .*; install one .* or drop --compile"):
        train_from_labels(LabelsSpec(str(labels)), str(tmp_path / "b"), cfg=replace(CFG, compile=True,
                                                                                      device="cpu"), pre=PRE)
    assert not (tmp_path / "b").exists()


def test_architectures_that_cannot_be_built_on_the_meta_device_still_train_and_load(tmp_path):
    """regnets compute their widths with tensors; head detection and bundle loading fall back to the CPU."""
    from mlcls.bundle import save_bundle
    from mlcls.train.weights import head_keys

    assert head_keys("regnet_x_400mf", 3) == {"fc.weight", "fc.bias"}
    model = torchvision.models.get_model("regnet_x_400mf", num_classes=3)
    save_bundle(str(tmp_path / "r"), name="r", arch="regnet_x_400mf", classes=["a", "b", "c"],
                state_dict=model.state_dict(), preprocess=PRE)
    x = torch.rand(2, 3, 48, 48)
    with torch.inference_mode():
        assert torch.allclose(load_bundle(str(tmp_path / "r")).build_model()(x), model.eval()(x))


@pytest.mark.parametrize("augment", [True, False])
def test_reduced_resolution_epochs_come_first_and_the_last_run_at_full_size(arrays, augment):
    train_x, train_y, _, _ = arrays
    cfg = replace(CFG, epochs=4, low_res=0.9, low_res_share=0.5, augment=augment)
    trainer = Trainer(cfg, PRE, train_y.shape[1], 3)
    seen: list[tuple[int, int]] = []
    trainer.model.register_forward_pre_hook(lambda _m, args: seen.append((trainer.epoch, args[0].shape[-1])))
    xs, ys = torch.from_numpy(train_x), torch.from_numpy(train_y)
    for _ in range(4):
        trainer.train_epoch(xs, ys)
        trainer.epoch += 1
    sizes = {epoch: {side for e, side in seen if e == epoch} for epoch in range(4)}
    assert sizes == {0: {40}, 1: {40}, 2: {48}, 3: {48}}  # 0.9 x 48 = 43.2, to a multiple of 8
    assert Trainer(replace(cfg, low_res=0.1), PRE, train_y.shape[1], 3).input_size() == 32  # never below 32
    assert Trainer(replace(CFG, epochs=4), PRE, train_y.shape[1], 3).input_size() == 48  # off unless asked
    with pytest.raises(OptionError, match="--low-res-epochs"):
        replace(CFG, low_res_share=1.0).validate()


def test_augment_at_a_reduced_size_shows_the_same_view():
    x = F.interpolate(torch.rand(4, 3, 4, 4), size=(32, 32), mode="bilinear")  # smooth: no detail to lose
    full = Augment(32, scale=(1.0, 1.0), jitter=0.0)(x, torch.Generator().manual_seed(0))
    small = Augment(32, scale=(1.0, 1.0), jitter=0.0)(x, torch.Generator().manual_seed(0), 16)
    assert small.shape == (4, 3, 16, 16)
    assert torch.allclose(small, F.avg_pool2d(full, 2), atol=0.05)  # the same image, at half the resolution
