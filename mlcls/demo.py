"""Rebuild the embedded demo bundle and the example images.

    python -m mlcls.demo            # trains on generated shapes, writes mlcls/data/demo and examples/images

The data is generated (see `synth.py`), so the demo model rebuilds offline
and from a seed; on a 2-core CPU it trains in a few minutes.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from .bundle import Bundle, demo_bundle_url
from .images import Preprocess
from .synth import DEMO_CLASSES, SynthConfig, make_dataset
from .train import TrainConfig, eval_pixels, fit, multi_hot, train_pixels, write_bundle

DEMO_PREPROCESS = Preprocess(size=96, resize_size=102)
DEMO_TRAIN = TrainConfig(arch="mobilenet_v3_small", epochs=12, batch_size=32, lr=3e-3, weight_decay=1e-4,
                         vflip=True, seed=0)
DEMO_DATA = SynthConfig(size=128, classes=DEMO_CLASSES, min_radius=0.15, max_radius=0.28, p_blur=0.2, clutter=3)


def build_demo(out: str, *, n_train: int = 5000, n_val: int = 800, cfg: TrainConfig = DEMO_TRAIN,
               seed: int = 0) -> Bundle:
    """Generate shapes, train, calibrate, and write the demo bundle to `out`."""
    started = time.perf_counter()
    train = make_dataset(n_train, seed=seed, cfg=DEMO_DATA)
    val = make_dataset(n_val, seed=seed + 1, cfg=DEMO_DATA)
    classes = list(DEMO_CLASSES)
    train_x = train_pixels([im for im, _ in train], DEMO_PREPROCESS)
    train_y = multi_hot([lb for _, lb in train], classes)
    val_x = eval_pixels([im for im, _ in val], DEMO_PREPROCESS)
    val_y = multi_hot([lb for _, lb in val], classes)
    print(f"generated {n_train} training and {n_val} validation images in {time.perf_counter() - started:.0f} s")
    result = fit(train_x, train_y, val_x, val_y, pre=DEMO_PREPROCESS, cfg=cfg)
    bundle = write_bundle(result, out, name="shapes-demo", classes=classes, pre=DEMO_PREPROCESS, cfg=cfg,
                          extra={"train_images": n_train, "data": f"mlcls.synth shapes, seed {seed}"},
                          weights_dtype="float16")
    v = bundle.metrics["validation"]
    print(f"wrote {out}: val mAP {v['mAP']:.4f}, macro-F1 {v['at_thresholds']['macro_f1']:.4f} "
          f"(0.5: {v['at_0.5']['macro_f1']:.4f}), trained in {result.seconds:.0f} s")
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
    args = parser.parse_args()
    np.random.seed(0)
    write_examples(args.examples)
    cfg = TrainConfig(**{**DEMO_TRAIN.__dict__, "epochs": args.epochs})
    build_demo(args.out, n_train=args.train_images, cfg=cfg)


if __name__ == "__main__":
    main()
