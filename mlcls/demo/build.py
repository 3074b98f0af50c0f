"""Rebuild the embedded demo bundle and the example images.

    python -m mlcls.demo            # trains on generated shapes, writes mlcls/demo/bundle and examples/images

The data is generated (see `mlcls.demo.synth`), so the demo model rebuilds offline
and from a seed. It is written as JPEGs with a fastai-style `labels.csv`
and trained by `trainjob.train_from_labels`, the code path of `mlcls train`:
the shipped bundle is what a user's own training would produce.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from mlcls.bundle import Bundle, demo_bundle_url
from mlcls.demo.synth import DEMO_CLASSES, SynthConfig, make_dataset, write_dataset
from mlcls.images.preprocess import Preprocess
from mlcls.train.labels import LabelsSpec
from mlcls.train.train_job import train_from_labels
from mlcls.train.trainer import TrainConfig

DEMO_PREPROCESS = Preprocess(size=96, resize_size=102)
DEMO_TRAIN = TrainConfig(arch="mobilenet_v3_small", epochs=12, batch_size=32, lr=3e-3, weight_decay=1e-4,
                         vflip=True, scale=(0.85, 1.0), seed=0)
DEMO_DATA = SynthConfig(size=128, classes=DEMO_CLASSES, min_radius=0.15, max_radius=0.28, p_blur=0.2, clutter=3)


def build_demo(out: str, *, n_train: int = 5000, n_val: int = 800, cfg: TrainConfig = DEMO_TRAIN,
               seed: int = 0, workdir: str | None = None) -> Bundle:
    """Generate shapes as JPEGs and a labels file, train with `train_from_labels`, write the bundle to `out`."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        labels = write_dataset(tmp, n_train + n_val, seed, DEMO_DATA, val_fraction=n_val / (n_train + n_val))
        print(f"generated {n_train} training and {n_val} validation images in {time.perf_counter() - started:.0f} s")
        trained = train_from_labels(LabelsSpec(labels), out, cfg=cfg, pre=DEMO_PREPROCESS,
                                    classes=list(DEMO_CLASSES), weights=None, name="shapes-demo",
                                    weights_dtype="float16",
                                    extra={"labels": f"generated: mlcls.demo.synth shapes (DEMO_DATA), seed {seed}"})
    bundle = trained.bundle
    v = bundle.metrics["validation"]
    print(f"wrote {out}: val mAP {v['mAP']:.4f}, macro-F1 {v['at_thresholds']['macro_f1']:.4f} "
          f"(0.5: {v['at_0.5']['macro_f1']:.4f}), trained in {trained.result.seconds:.0f} s")
    return bundle


def write_examples(folder: str, n: int = 12, seed: int = 2026) -> None:
    """A few small example images (JPEG and PNG) for `mlcls tag examples/images`."""
    os.makedirs(folder, exist_ok=True)
    cfg = SynthConfig(**{**DEMO_DATA.__dict__, "size": 320})
    for i, (img, labels) in enumerate(make_dataset(n, seed=seed, cfg=cfg)):
        name = "-".join(labels) or "none"
        if i % 4 == 3:
            img.save(os.path.join(folder, f"{i:02d}-{name}.png"), optimize=True)
        else:
            img.save(os.path.join(folder, f"{i:02d}-{name}.jpg"), quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=demo_bundle_url(), help="bundle folder (default: the package's demo)")
    parser.add_argument("--examples", default="examples/images", help="where to write the example images")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=DEMO_TRAIN.epochs)
    parser.add_argument("--workdir", default=None, help="where to write the generated images (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is faster on a CPU shared with other work)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    np.random.seed(0)
    write_examples(args.examples)
    cfg = TrainConfig(**{**DEMO_TRAIN.__dict__, "epochs": args.epochs})
    build_demo(args.out, n_train=args.train_images, cfg=cfg, workdir=args.workdir)


if __name__ == "__main__":
    main()
