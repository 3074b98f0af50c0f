"""Sweep training recipes for the demo bundle: which one learns shapes fastest per sample?

Run where it is cheap (a GPU runs each recipe in seconds); the winner must
then train within a few minutes on a 2-core CPU, so compare recipes at equal
numbers of training samples, not equal wall time.

    python bench/demo_sweep.py --epochs 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlcls.demo.synth import DEMO_CLASSES, SynthConfig, make_dataset
from mlcls.images.preprocess import Preprocess
from mlcls.train.trainer import TrainConfig, eval_pixels, fit, multi_hot, train_pixels

DATA = {
    "demo": SynthConfig(size=160, classes=DEMO_CLASSES),
    "easy": SynthConfig(size=128, classes=DEMO_CLASSES, min_radius=0.15, max_radius=0.28, p_blur=0.2, clutter=3),
}
RECIPES = [
    # (name, arch, size, lr, weight decay, batch)
    ("mnv3s-96-3e-3", "mobilenet_v3_small", 96, 3e-3, 1e-4, 32),
    ("mnv3s-96-1e-2", "mobilenet_v3_small", 96, 1e-2, 0.0, 64),
    ("mnv3s-128-3e-3", "mobilenet_v3_small", 128, 3e-3, 1e-4, 32),
    ("shuf1-96-5e-3", "shufflenet_v2_x1_0", 96, 5e-3, 1e-4, 32),
    ("mnv2-96-3e-3", "mobilenet_v2", 96, 3e-3, 1e-4, 32),
    ("mnas075-96-3e-3", "mnasnet0_75", 96, 3e-3, 1e-4, 32),
    ("res18-96-3e-3", "resnet18", 96, 3e-3, 1e-4, 32),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--data", nargs="*", default=list(DATA))
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    rows = []
    for data_name in args.data:
        t = time.time()
        train = make_dataset(args.train, 0, DATA[data_name])
        val = make_dataset(800, 1, DATA[data_name])
        print(f"data {data_name}: {time.time() - t:.0f} s", flush=True)
        for name, arch, size, lr, wd, bs in RECIPES:
            if args.only and name not in args.only:
                continue
            pre = Preprocess(size=size, resize_size=round(size * 17 / 16))
            cl = list(DEMO_CLASSES)
            tx, ty = train_pixels([i for i, _ in train], pre), multi_hot([lb for _, lb in train], cl)
            vx, vy = eval_pixels([i for i, _ in val], pre), multi_hot([lb for _, lb in val], cl)
            cfg = TrainConfig(arch=arch, epochs=args.epochs, lr=lr, weight_decay=wd, batch_size=bs, vflip=True)
            r = fit(tx, ty, vx, vy, pre=pre, cfg=cfg)
            maps = [h["val_mAP"] for h in r.history]
            rows.append((data_name, name, maps, r.seconds))
            print(f"{data_name:5} {name:18} " + " ".join(f"{m:.3f}" for m in maps) + f"  {r.seconds:.0f}s",
                  flush=True)
    print("\ndata  recipe             best   @25%   @50%   @75%")
    for data_name, name, maps, _ in rows:
        q = [maps[max(0, int(len(maps) * f) - 1)] for f in (0.25, 0.5, 0.75)]
        print(f"{data_name:5} {name:18} {max(maps):.3f}  " + "  ".join(f"{v:.3f}" for v in q))


if __name__ == "__main__":
    main()
