"""The train-bundle and eval-bundle flows through a real Prefect API (temporary server and database)."""

from __future__ import annotations

import pytest

from mlcls.bundle import load_bundle
from mlcls.errors import LabelsError
from tests.helpers.training import one_torch_thread, write_shapes

pytestmark = pytest.mark.slow


def test_train_then_eval_flows(tmp_path, prefect_api):
    from flows.train import eval_bundle_flow, train_bundle

    labels = write_shapes(tmp_path / "data", n=64)
    with one_torch_thread():
        summary = train_bundle(labels=str(labels), out=str(tmp_path / "bundle"), arch="mobilenet_v3_small",
                               weights="none", epochs=1, batch_size=16, size=48, resize_size=56, device="cpu")
        bundle = load_bundle(str(tmp_path / "bundle"))
        assert summary["model"] == bundle.model_id and summary["val_images"] == 16
        assert summary["val_mAP"] == pytest.approx(bundle.metrics["validation"]["mAP"])

        headline = eval_bundle_flow(model=str(tmp_path / "bundle"), labels=str(labels), only_valid=True,
                                    report=str(tmp_path / "report"), top_k=2, device="cpu")
        assert headline["images"] == 16 and headline["mAP"] == pytest.approx(summary["val_mAP"], abs=1e-6)
        assert headline["override"]["macro_f1"] >= 0 and (tmp_path / "report" / "report.html").exists()

        (tmp_path / "bad.csv").write_text("image,labels\n")
        with pytest.raises(LabelsError, match="has no rows"):
            train_bundle(labels=str(tmp_path / "bad.csv"), out=str(tmp_path / "b2"), weights="none")
