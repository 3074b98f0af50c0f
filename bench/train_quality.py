"""Training quality on a harder generated multi-label task, measured on a held-out test set.

    python bench/train_quality.py                     # about 10 minutes on a 2-core CPU
    python bench/train_quality.py --epochs 2 --train 600 --val 200 --test 200   # a quick smoke run

The task is `synth.HARD`: all 12 shapes, up to 4 per image (overlapping),
lines and shape-like blobs as clutter, lower contrast, ~20 % images with no
shape. Images are written as JPEGs with fastai-style labels files; training
runs `mlcls train`'s code path (`trainjob.train_from_labels`), thresholds
are calibrated on its validation split, and everything is then measured by
`mlcls eval`'s code path (`evaljob.eval_bundle`) on a test set the training
never saw: calibrated per-class thresholds against the global 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from machine import cpu_name

from mlcls.demo.synth import HARD, write_dataset
from mlcls.images.preprocess import Preprocess
from mlcls.train.eval_job import ScoreOptions, eval_bundle
from mlcls.train.labels import LabelsSpec
from mlcls.train.train_job import train_from_labels
from mlcls.train.trainer import TrainConfig

ROWS = [("mAP (macro)", None, "mAP"), ("macro-F1", "macro_f1", None), ("micro-F1 (OF1)", "OF1", None),
        ("CF1", "CF1", None), ("Hamming loss", "hamming_loss", None), ("subset accuracy", "subset_accuracy", None),
        ("FPR on no-label images", "empty_fpr", None)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=3200)
    p.add_argument("--val", type=int, default=800)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--arch", default="mobilenet_v3_small")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--loss", default="bce")
    p.add_argument("--weights", default=None,
                   help="starting weights (a state dict file, e.g. mlcls/data/demo/model.safetensors; default: random)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workdir", default=None, help="where to write the images (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = run(tmp, args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def run(tmp: str, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    n = args.train + args.val
    labels = write_dataset(os.path.join(tmp, "trainval"), n, seed=0, cfg=HARD, val_fraction=args.val / n)
    test = write_dataset(os.path.join(tmp, "test"), args.test, seed=1, cfg=HARD)
    generated = time.perf_counter() - started
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=32, lr=3e-3, vflip=True,
                      loss=args.loss, seed=0)
    pre = Preprocess(size=args.size, resize_size=round(args.size * 17 / 16))
    trained = train_from_labels(LabelsSpec(labels), os.path.join(tmp, "bundle"), cfg=cfg, pre=pre,
                                weights=args.weights)
    evaluated = eval_bundle(os.path.join(tmp, "bundle"), LabelsSpec(test), report=os.path.join(tmp, "report"),
                            options=ScoreOptions(device="cpu"))
    m = evaluated.metrics
    return {
        "task": "mlcls.demo.synth.HARD", "classes": len(HARD.classes), "train": args.train, "val": args.val,
        "test_images": args.test, "test_no_label_images": m["at_thresholds"]["empty_images"], "arch": args.arch,
        "size": args.size, "epochs": args.epochs, "loss": args.loss, "weights": args.weights or "random init",
        "best_epoch": trained.result.best_epoch,
        "train_seconds": round(trained.result.seconds, 1), "generate_seconds": round(generated, 1),
        "eval_seconds": m["seconds"], "threads": torch.get_num_threads(), "cpu": cpu_name(),
        "cores": os.cpu_count(), "fallback_classes": trained.bundle.metrics["thresholds"]["fallback_classes"],
        "val_mAP": trained.bundle.metrics["validation"]["mAP"], "test_metrics": m,
        "history": trained.result.history,
    }


def print_table(r: dict) -> None:
    m = r["test_metrics"]
    print(f"\n{r['task']}: {r['classes']} classes; train {r['train']}, val {r['val']} (thresholds), "
          f"held-out test {r['test_images']} ({r['test_no_label_images']} with no labels); {r['arch']} {r['size']} px, "
          f"{r['epochs']} epochs ({r['loss']}, from {r['weights']}), best epoch {r['best_epoch']}; "
          f"trained in {r['train_seconds']} s "
          f"on {r['threads']} threads\n")
    print("| metric (held-out test) | calibrated per-class thresholds | global 0.5 |")
    print("| --- | --- | --- |")
    for name, key, top in ROWS:
        if top:
            print(f"| {name} | {m[top]:.4f} | (same) |")
        else:
            print(f"| {name} | {m['at_thresholds'][key]:.4f} | {m['at_0.5'][key]:.4f} |")


if __name__ == "__main__":
    main()
