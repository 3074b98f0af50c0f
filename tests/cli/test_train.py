"""`mlcls train`, `mlcls eval`, `mlcls calibrate`: the commands, their report, and one-line errors."""

from __future__ import annotations

import json
import re
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
import torchvision

from mlcls.bundle import load_bundle
from mlcls.cli.main import main
from mlcls.train import metrics
from mlcls.train.labels import LabelsSpec
from mlcls.train.scoring import read_eval_labels, score_table
from tests.helpers.training import TRAIN_ARGS, one_torch_thread, read_rows, write_rows, write_shapes


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A labels file with an is_valid column and the bundle `mlcls train` made from it."""
    root = tmp_path_factory.mktemp("cli-train")
    labels = write_shapes(root / "data")
    with one_torch_thread():
        code = main(["train", str(labels), "--out", str(root / "bundle"), *TRAIN_ARGS])
    assert code == 0
    return root, labels, root / "bundle"


def test_train_writes_a_bundle_and_says_how_good_it_is(trained, capsys):
    _, labels, bundle_dir = trained
    bundle = load_bundle(str(bundle_dir))
    assert bundle.name == "bundle" and bundle.threshold_method == "f1-per-class-shrunk"
    assert bundle.metrics["training"]["labels"] == str(labels) and bundle.metrics["training"]["weights"] is None
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["bundle.json", "model.safetensors"]


def test_eval_on_the_validation_rows_reproduces_the_training_metrics(trained, capsys, tmp_path):
    _, labels, bundle_dir = trained
    code = main(["eval", str(bundle_dir), str(labels), "--only-valid", "--report", str(tmp_path / "report"),
                 "--device", "cpu", "-q", "--top-k", "2"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "on 24 images" in out and "at top-2" in out
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    v = load_bundle(str(bundle_dir)).metrics["validation"]
    assert m["images"] == v["images"] == 24
    assert m["mAP"] == pytest.approx(v["mAP"], abs=1e-6)  # same images, same pixels, same model: same numbers
    for key in ("macro_f1", "CF1", "OF1", "hamming_loss", "subset_accuracy"):
        assert m["at_thresholds"][key] == pytest.approx(v["at_thresholds"][key], abs=1e-6), key
    assert m["override"]["rule"] == "top-2" and m["at_top3"]["OR"] >= m["override"]["OR"]
    assert [r["class"] for r in m["per_class"]] == list(load_bundle(str(bundle_dir)).classes)
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count('<svg class="chart') == 3 and "Per-class AP" in html
    for name in ("ap.svg", "pr.svg", "f1.svg"):
        assert ElementTree.parse(tmp_path / "report" / name).getroot().tag == "{http://www.w3.org/2000/svg}svg"


def test_calibrate_recalibrates_or_sets_thresholds_and_keeps_the_weights(trained, capsys, tmp_path):
    _, labels, bundle_dir = trained
    assert main(["calibrate", str(bundle_dir), str(labels), "--out", str(tmp_path / "b2"), "--min-positives", "3",
                 "--device", "cpu", "-q"]) == 0
    assert "macro-F1" in capsys.readouterr().out
    before, after = load_bundle(str(bundle_dir)), load_bundle(str(tmp_path / "b2"))
    assert (tmp_path / "b2" / "model.safetensors").read_bytes() == (bundle_dir / "model.safetensors").read_bytes()
    assert after.digest != before.digest and after.threshold_method == "f1-per-class-shrunk"
    info = after.metrics["thresholds"]
    assert info["labels"] == str(labels) and info["images"] == 96 and info["min_positives"] == 3
    # the thresholds are max-F1 on the eval scores of those 96 images
    assert main(["eval", str(tmp_path / "b2"), str(labels), "--report", str(tmp_path / "r"), "-q"]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    rec = info["calibration"]
    assert m["at_thresholds"]["macro_f1"] == pytest.approx(rec["at_new_thresholds"]["macro_f1"], abs=1e-9)
    scored = score_table(before, read_eval_labels(LabelsSpec(str(labels)), before.classes), device="cpu")
    expected, _ = metrics.calibrate_thresholds(scored.scores, scored.targets, min_positives=3)
    assert after.thresholds == pytest.approx(expected.tolist(), abs=1e-9)
    own = np.asarray(info["own_thresholds"])  # before shrinkage: each class's max-F1 cut on these images
    assert metrics.classification_metrics(scored.scores >= own, scored.targets)["macro_f1"] >= \
        rec["at_previous_thresholds"]["macro_f1"]

    assert main(["calibrate", str(tmp_path / "b2"), "--threshold", "0.3"]) == 0
    assert set(load_bundle(str(tmp_path / "b2")).thresholds) == {0.3}
    classes = after.classes
    (tmp_path / "t.csv").write_text("name,threshold\n" + "".join(f"{c},0.{i + 1}\n" for i, c in enumerate(classes)))
    assert main(["calibrate", str(tmp_path / "b2"), "--thresholds", str(tmp_path / "t.csv")]) == 0
    b = load_bundle(str(tmp_path / "b2"))
    assert b.thresholds == pytest.approx([0.1 * (i + 1) for i in range(len(classes))])
    assert b.threshold_method == "per-class-file"


def test_empty_label_cells_are_negative_images_end_to_end(trained, tmp_path):
    _, labels, bundle_dir = trained
    rows = read_rows(labels)
    empty = [r for r in rows if not r["labels"]]
    assert len(empty) >= 10
    bundle = load_bundle(str(bundle_dir))
    assert "" not in bundle.classes and len(bundle.classes) == 6
    assert bundle.metrics["validation"]["at_thresholds"]["empty_images"] == sum(
        1 for r in rows if not r["labels"] and r["is_valid"] == "1")


def _train_error_cases(root, labels):
    rows = read_rows(labels)
    missing_img = write_rows(root / "missing.csv", [*rows[:60], {"image": "images/gone.jpg", "labels": "circle",
                                                                 "is_valid": "0"}])
    torch.save(torchvision.models.get_model("resnet18", num_classes=3).state_dict(), root / "r18.pth")
    return [
        (["train", str(root / "nope.csv")], "labels file not found"),
        (["train", str(missing_img), "--images", str(labels.parent)],
         "1 of \\d+ images listed in .*missing.csv do not exist \\(first: .*gone.jpg\\)"),
        (["train", str(labels), "--labels-col", "tags"], "has no column 'tags'"),
        (["train", str(labels), "--arch", "resnet5O"], "unknown architecture 'resnet5O'"),
        (["train", str(labels), "--weights", str(root / "r18.pth")], "do not fit mobilenet_v3_small"),
        (["train", str(labels), "--classes", "circle,ring"], "uses 4 classes missing from --classes"),
        (["train", str(labels), "--freeze-epochs", "5"], "--freeze-epochs must be between 0 and --epochs"),
        (["train", str(labels), "--size", "8"], "--size must be at least 16"),
        (["train", str(labels), "--resume"], "no checkpoint at .* to resume from"),
    ]


def test_bad_training_input_is_one_line_and_exit_2_before_any_training(trained, capsys, tmp_path):
    _, labels, _ = trained

    for args, message in _train_error_cases(tmp_path, labels):
        out = tmp_path / "out"
        code = main([*args[:2], "--out", str(out), *TRAIN_ARGS, *args[2:]])  # later options win
        err = capsys.readouterr().err.strip().split("mlcls: error:")  # info lines may come first
        assert code == 2 and len(err) == 2, (args, err)
        assert re.search(message, err[1].replace("\n", " ")), (message, err)
        assert not out.exists() or not any(p.suffix in (".json", ".pt", ".safetensors") for p in out.iterdir())


def test_the_library_log_lines_show_on_stderr_unless_quiet(trained, capsys, tmp_path):
    _, labels, _ = trained
    args = ["train", str(labels), "--out", str(tmp_path / "out"), *TRAIN_ARGS, "--resume"]  # fails after planning
    assert main([a for a in args if a != "-q"]) == 2
    lines = capsys.readouterr().err.splitlines()  # no progress bars off a terminal, so no blank line they leave
    assert lines[0] == "mobilenet_v3_small, 6 classes, random init" and lines[1].startswith("mlcls: error: no ")
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("mlcls: error: no checkpoint at ")


@pytest.mark.parametrize("args, message", [
    (["eval", "{bundle}", "{tmp}/l.csv"], "uses 1 classes the bundle does not have: hexagon"),
    (["eval", "{bundle}", "{labels}", "--threshold", "1.5"], "--threshold must be between 0 and 1"),
    (["eval", "{bundle}", "{labels}", "--report", "{labels}"], "--report .*labels.csv is a file"),
    (["eval", "{tmp}", "{labels}"], "no bundle.json in"),
    (["calibrate", "{bundle}", "{labels}", "--threshold", "0.4"], "give a labels file to recalibrate on, or"),
    (["calibrate", "{bundle}"], "give a labels file to recalibrate on, or"),
    (["calibrate", "{bundle}", "--thresholds", "{tmp}/t.csv"], "--thresholds .*t.csv: no threshold for"),
])
def test_bad_eval_and_calibrate_input(trained, capsys, tmp_path, args, message):
    _, labels, bundle_dir = trained
    (tmp_path / "l.csv").write_text("image,labels\nx.jpg,circle hexagon\n")
    (tmp_path / "t.csv").write_text("name,threshold\ncircle,0.5\n")
    before = (bundle_dir / "bundle.json").read_text()
    fill = {"bundle": bundle_dir, "labels": labels, "tmp": tmp_path}
    code = main([a.format(**fill) for a in args] + ["-q"])
    err = capsys.readouterr().err.strip().replace("\n", " ")
    assert code == 2 and err.startswith("mlcls: error:")
    assert re.search(message, err), err
    assert (bundle_dir / "bundle.json").read_text() == before


def test_eval_on_images_with_no_labels_reports_the_false_positive_rate(trained, capsys, tmp_path):
    _, labels, bundle_dir = trained
    rows = [r for r in read_rows(labels) if not r["labels"]]
    negatives = write_rows(labels.parent / "negatives.csv", rows)
    assert main(["eval", str(bundle_dir), str(negatives), "--report", str(tmp_path / "r"), "-q"]) == 0
    assert "mlcls: warning: 6 classes have no positive image" in capsys.readouterr().err.replace("\n", " ")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["mAP"] is None and m["images"] == len(rows) == m["at_thresholds"]["empty_images"]
    assert 0.0 <= m["at_thresholds"]["empty_fpr"] <= 1.0 and m["at_top3"]["empty_fpr"] == 1.0
