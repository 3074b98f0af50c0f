"""Train, eval and calibrate with labels, images, bundle and report all on a real S3-protocol server (moto)."""

from __future__ import annotations

import json

import pytest

from mlcls.bundle import load_bundle
from mlcls.cli.main import main
from tests.helpers.training import TRAIN_ARGS, one_torch_thread, write_shapes

pytestmark = pytest.mark.slow


def test_train_eval_calibrate_on_s3(tmp_path, s3, capsys):
    src, models, out = s3.buckets["src"], s3.buckets["models"], s3.buckets["out"]
    labels = write_shapes(tmp_path / "data", n=64)
    s3.put(str(labels.parent / "images") + "/", f"{src}/photos/images/", recursive=True)
    s3.put(str(labels), f"{out}/meta/labels.csv")
    with one_torch_thread():
        code = main(["train", f"s3://{out}/meta/labels.csv", "--images", f"s3://{src}/photos",
                     "--out", f"s3://{models}/mine", *TRAIN_ARGS])
        assert code == 0, capsys.readouterr().err
        assert sorted(p.rsplit("/", 1)[1] for p in s3.ls(f"{models}/mine")) == ["bundle.json", "model.safetensors"]
        bundle = load_bundle(f"s3://{models}/mine")
        assert bundle.metrics["validation"]["images"] == 16
        assert bundle.metrics["training"]["labels"] == f"s3://{out}/meta/labels.csv"

        assert main(["eval", f"s3://{models}/mine", f"s3://{out}/meta/labels.csv", "--images", f"s3://{src}/photos",
                     "--only-valid", "--report", f"s3://{out}/report", "-q"]) == 0
        m = json.loads(s3.cat(f"{out}/report/metrics.json"))
        assert m["images"] == 16 and m["mAP"] == pytest.approx(bundle.metrics["validation"]["mAP"], abs=1e-6)
        assert s3.cat(f"{out}/report/report.html").count(b'<svg class="chart') == 3

        assert main(["calibrate", f"s3://{models}/mine", f"s3://{out}/meta/labels.csv", "--images",
                     f"s3://{src}/photos", "-q"]) == 0
        again = load_bundle(f"s3://{models}/mine")
        assert again.digest != bundle.digest and again.metrics["thresholds"]["images"] == 64

        s3.rm(f"{src}/photos/images/000003.jpg")
        code = main(["train", f"s3://{out}/meta/labels.csv", "--images", f"s3://{src}/photos",
                     "--out", f"s3://{models}/other", *TRAIN_ARGS])
        assert code == 2 and "000003.jpg" in capsys.readouterr().err
        assert not s3.exists(f"{models}/other/bundle.json")
