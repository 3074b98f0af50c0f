"""Bundles: round trip, digest, loading from S3, and clear errors for every way one can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from mlcls.bundle import create_bundle, demo_bundle_url, load_bundle, read_classes, read_state_dict, save_bundle
from mlcls.errors import BundleError
from mlcls.images.preprocess import Preprocess

PRE = Preprocess(size=64, resize_size=72)


def _small(n=3, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.get_model("mobilenet_v3_small", num_classes=n)


def test_round_trip_and_digest(tmp_path):
    model = _small()
    saved = save_bundle(str(tmp_path / "b"), name="b", arch="mobilenet_v3_small", classes=["a", "b", "c"],
                        state_dict=model.state_dict(), preprocess=PRE, thresholds=[0.1, 0.5, 0.9],
                        metrics={"mAP": 0.5})
    loaded = load_bundle(str(tmp_path / "b"))
    assert loaded.digest == saved.digest and len(loaded.digest) == 16
    assert loaded.model_id == f"b@{saved.digest}"
    assert loaded.classes == ("a", "b", "c") and loaded.thresholds == (0.1, 0.5, 0.9)
    assert loaded.preprocess == PRE and loaded.metrics == {"mAP": 0.5}
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.build_model()(x), model.eval()(x))
    # reformatting bundle.json keeps the digest; other weights change it
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta, indent=7))
    assert load_bundle(str(tmp_path / "b")).digest == saved.digest
    other = save_bundle(str(tmp_path / "c"), name="b", arch="mobilenet_v3_small", classes=["a", "b", "c"],
                        state_dict=_small(seed=1).state_dict(), preprocess=PRE)
    assert other.digest != saved.digest


def test_demo_bundle_ships_and_loads():
    bundle = load_bundle(None)
    assert bundle.classes and len(bundle.thresholds) == len(bundle.classes)
    assert bundle.metrics["validation"]["mAP"] > 0.5
    assert load_bundle(demo_bundle_url()).digest == bundle.digest


@pytest.fixture()
def good(tmp_path):
    save_bundle(str(tmp_path / "good"), name="g", arch="mobilenet_v3_small", classes=["a", "b", "c"],
                state_dict=_small().state_dict(), preprocess=PRE)
    return tmp_path / "good"


def _edit(folder, **changes):
    meta = json.loads((folder / "bundle.json").read_text())
    meta.update(changes)
    (folder / "bundle.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change, message", [
    ({"classes": ["a", "b"]}, "3 thresholds for 2 classes; give one per class"),
    ({"classes": ["a", "b"], "thresholds": [0.5, 0.5]},
     r"do not fit mobilenet_v3_small with 2 classes: .*classifier.3.weight is \(3, 1024\) in the weights"),
    ({"arch": "resnet18"}, "do not fit resnet18"),
    ({"arch": "resnet5O"}, "unknown architecture 'resnet5O' \\(did you mean resnet50"),
    ({"thresholds": [0.5, 2.0, 0.5]}, "between 0 and 1"),
    ({"classes": ["a", "a", "c"]}, "unique; repeated: a"),
    ({"format_version": 99}, "upgrade mlcls"),
    ({"preprocess": {"size": 64, "resize_size": 72, "resize_mode": "zoom"}}, "resize_mode"),
])
def test_malformed_bundles_fail_with_a_named_problem(good, change, message):
    _edit(good, **change)
    with pytest.raises(BundleError, match=message):
        load_bundle(str(good))


def test_missing_or_corrupt_files(good, tmp_path):
    with pytest.raises(BundleError, match="no bundle.json in .*nowhere: not an mlcls bundle"):
        load_bundle(str(tmp_path / "nowhere"))
    (good / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(str(good))
    (good / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="has no weights file model.safetensors"):
        load_bundle(str(good))
    (good / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(str(good))


def test_bundle_loads_from_s3(good, s3):
    models = s3.buckets["models"]
    s3.put(str(good) + "/", f"{models}/mine/", recursive=True)
    assert load_bundle(f"s3://{models}/mine").digest == load_bundle(str(good)).digest


def test_create_from_checkpoint_variants(tmp_path):
    sd = _small(n=4).state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    for path in ("ckpt.pth", "w.safetensors"):
        loaded = read_state_dict(str(tmp_path / path))
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    bundle = create_bundle(str(tmp_path / "out"), name="x", arch="mobilenet_v3_small", classes=list("abcd"),
                           preprocess=PRE, state_dict=read_state_dict(str(tmp_path / "ckpt.pth")))
    assert load_bundle(str(tmp_path / "out")).digest == bundle.digest
    with pytest.raises(BundleError, match=r"do not fit mobilenet_v3_small with 3 classes: .*\(4,"):
        create_bundle(str(tmp_path / "bad"), name="x", arch="mobilenet_v3_small", classes=list("abc"),
                      preprocess=PRE, state_dict=sd)
    assert not (tmp_path / "bad").exists()


def test_create_checks_the_input_size(tmp_path):
    with pytest.raises(BundleError, match="vit_b_16 cannot take 64x64 input"):
        create_bundle(str(tmp_path / "vit"), name="v", arch="vit_b_16", classes=["a"], preprocess=PRE)


def test_read_classes_formats(tmp_path):
    assert read_classes("cat, dog,boat") == (["cat", "dog", "boat"], None)
    (tmp_path / "c.txt").write_text("cat\n# comment\ndog\n\n")
    assert read_classes(str(tmp_path / "c.txt")) == (["cat", "dog"], None)
    (tmp_path / "c.csv").write_text("name,threshold\ncat,0.3\ndog,0.7\n")
    assert read_classes(str(tmp_path / "c.csv")) == (["cat", "dog"], [0.3, 0.7])
    with pytest.raises(BundleError, match="classes file not found"):
        read_classes(str(tmp_path / "missing.txt"))


def test_copying_a_bundle_keeps_its_identity(good, tmp_path):
    shutil.copytree(good, tmp_path / "copy")
    assert load_bundle(str(tmp_path / "copy")).model_id == load_bundle(str(good)).model_id
