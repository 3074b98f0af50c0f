"""`mlcls train`, `mlcls eval` and `mlcls calibrate`: arguments in, library calls out.

Like `cli.py`, this module only parses and presents: each command turns its
arguments into plain values (`LabelsSpec`, `TrainConfig`, `Preprocess`,
`ScoreOptions`) and calls `trainjob` or `evaljob`. A user error raises an
`MlclsError` that `cli.main` prints as one line (exit 2), and every check
that can run before the first image is read does.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlcls.cli.options import add_storage_options
from mlcls.errors import OptionError

EXIT_OK = 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `eval` and `calibrate` to the `mlcls` subcommands."""
    _add_train(sub)
    _add_eval(sub)
    _add_calibrate(sub)


def _add_labels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=None, metavar="ROOT",
                   help="folder or URL the image paths are relative to (default: the labels file's folder)")
    p.add_argument("--image-col", default=None, help="image column (default: image, fname, file, path, uri, ...)")
    p.add_argument("--labels-col", default=None, help="labels column (default: labels, tags, label, classes)")
    p.add_argument("--delimiter", default=" ", help="separator inside a labels cell (default: space)")
    p.add_argument("--workers", type=int, default=8, help="image read/decode threads (default: 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_storage_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines: only warnings")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a multi-label model on a labels file and write a bundle",
                       description="Train a torchvision model with one sigmoid output per class on LABELS "
                                   "(CSV or Parquet: image, labels[, is_valid]) and write a bundle with "
                                   "per-class thresholds calibrated on the validation split.")
    p.add_argument("labels", help="labels file (.csv, .tsv or .parquet), local or URL")
    p.add_argument("--out", required=True, help="bundle folder or URL to write")
    p.add_argument("--arch", default="resnet50", help="torchvision architecture (default: resnet50)")
    p.add_argument("--weights", default="auto", metavar="FILE|ENUM|auto|none",
                   help="starting weights: a state dict file, a torchvision weights name (IMAGENET1K_V2, DEFAULT), "
                        "auto (torchvision's DEFAULT if cached locally, else random) or none (default: auto)")
    p.add_argument("--classes", default=None, metavar="FILE_OR_CSV",
                   help="class names and order (default: every label in the file, sorted)")
    p.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the data (default: about 14,400 images seen, 4 to 30)")
    p.add_argument("--freeze-epochs", type=int, default=0,
                   help="epochs training only the head, the backbone frozen (default 0: the warm-up protects "
                        "pretrained weights)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate: short warm-up, flat, cosine anneal over the last 30%% (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--loss", default="bce", choices=["bce", "focal", "asl"])
    p.add_argument("--label-smoothing", type=float, default=None, metavar="EPS",
                   help="train toward 1-EPS/2 and EPS/2 instead of 1 and 0 (default: 0.1 with --loss bce, "
                        "0 with focal and asl)")
    p.add_argument("--pos-weight", action="store_true", help="BCE pos_weight n_neg/n_pos per class (clipped to 10)")
    p.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal flips, only where a mirror image keeps every label (photos of things); "
                        "off by default: mirrored text, digits or logos teach the model shapes it never sees")
    p.add_argument("--vflip", action="store_true", help="also flip vertically (aerial, microscopy, shapes)")
    p.add_argument("--scale", type=float, default=0.85, metavar="MIN",
                   help="augmentation shrinks the whole image to between MIN and 1 of its side; it never crops "
                        "(default 0.85)")
    p.add_argument("--low-res-epochs", type=float, default=None, metavar="SHARE",
                   help="train the first SHARE of the epochs at a reduced side (--low-res), about 0.6 of a full "
                        "epoch's cost each (default: 0.5 in fp32 with the default epochs, else 0)")
    p.add_argument("--low-res", type=float, default=0.75, metavar="FRACTION",
                   help="the reduced side as a fraction of --size, rounded to a multiple of 8 (default 0.75)")
    p.add_argument("--no-amp", action="store_true", help="plain fp32 (default: bf16 autocast on CUDA and on CPUs "
                                                        "with AMX or AVX-512 BF16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on long runs)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share without is_valid (0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None,
                   help="model input side (default: the images' median shorter side, a multiple of 32, at most 224)")
    p.add_argument("--resize-mode", default=None, choices=["squash", "shorter"],
                   help="squash: the whole image resized to a square (default; no labelled object is cut off); "
                        "shorter: shorter side to --resize-size, then a centre crop (default with --resize-size)")
    p.add_argument("--resize-size", type=int, default=None,
                   help="with --resize-mode shorter: shorter side before the crop (default size*8/7)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the file)")
    _add_labels_args(p)
    p.set_defaults(handler=cmd_train)


def _add_override_args(p: argparse.ArgumentParser, top_k: bool) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, default=None, help="one threshold for every class")
    g.add_argument("--thresholds", default=None, metavar="FILE",
                   help="per-class thresholds: .csv (name,threshold) or .json {class: threshold}")
    if top_k:
        g.add_argument("--top-k", type=int, default=None, help="label each image with its k most probable classes")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a bundle on labelled images; write metrics JSON and an HTML report",
                       description="Tag the images of LABELS with BUNDLE exactly as `mlcls tag` would and report "
                                   "mAP, per-class AP, CP/CR/CF1, OP/OR/OF1, Hamming loss, subset accuracy and "
                                   "the false-positive rate on images with no labels.")
    p.add_argument("bundle", help="bundle folder or URL ('demo' for the embedded one)")
    p.add_argument("labels", help="labels file (.csv, .tsv or .parquet), local or URL")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="folder or URL for metrics.json, report.html and the charts")
    p.add_argument("--only-valid", action="store_true", help="only the rows with is_valid set")
    p.add_argument("--batch-size", type=int, default=64)
    _add_override_args(p, top_k=True)
    _add_labels_args(p)
    p.set_defaults(handler=cmd_eval)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="set a bundle's thresholds: max-F1 on labelled images, or given",
                       description="Recalibrate per-class thresholds (max F1; classes with few positives take "
                                   "the best global threshold) on LABELS, or set them with --threshold or "
                                   "--thresholds. Rewrites bundle.json (in place, or into --out).")
    p.add_argument("bundle", help="bundle folder or URL")
    p.add_argument("labels", nargs="?", default=None, help="labels file to calibrate on")
    p.add_argument("--out", default=None, help="write the recalibrated bundle here (default: in place)")
    p.add_argument("--min-positives", type=int, default=5,
                   help="classes with fewer positives take the global threshold (default 5)")
    p.add_argument("--only-valid", action="store_true", help="only the rows with is_valid set")
    p.add_argument("--batch-size", type=int, default=64)
    _add_override_args(p, top_k=False)
    _add_labels_args(p)
    p.set_defaults(handler=cmd_calibrate)


def _labels_spec(args: argparse.Namespace, path: str) -> Any:
    from mlcls.train.labels import LabelsSpec

    return LabelsSpec(path=path, images=args.images, image_col=args.image_col, labels_col=args.labels_col,
                      delimiter=args.delimiter, val_fraction=getattr(args, "val_fraction", 0.2),
                      seed=getattr(args, "seed", 0))


def _score_options(args: argparse.Namespace) -> Any:
    from mlcls.tag.engine import resolve_device
    from mlcls.train.eval_job import ScoreOptions

    resolve_device(args.device)
    if args.batch_size < 1 or args.workers < 1:
        raise OptionError("--batch-size and --workers must be >= 1")
    return ScoreOptions(device=args.device, batch_size=args.batch_size, workers=args.workers,
                        only_valid=args.only_valid)


def _train_config(args: argparse.Namespace) -> Any:
    from mlcls.tag.engine import resolve_device
    from mlcls.train.trainer import TrainConfig

    resolve_device(args.device)
    return TrainConfig(arch=args.arch, epochs=args.epochs, freeze_epochs=args.freeze_epochs,
                       batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                       device=args.device, augment=not args.no_augment, hflip=args.hflip, vflip=args.vflip,
                       scale=(args.scale, 1.0), loss=args.loss, pos_weight=args.pos_weight, amp=not args.no_amp,
                       label_smoothing=args.label_smoothing,
                       compile=args.compile, low_res=args.low_res,
                       low_res_share=args.low_res_epochs).validate()


def _preprocess(args: argparse.Namespace) -> Any:
    from mlcls.train.input_size import InputChoice

    return InputChoice.of(args.size, args.resize_mode, args.resize_size)


def cmd_train(args: argparse.Namespace) -> int:
    from mlcls.bundle import read_classes
    from mlcls.train.train_job import train_from_labels

    cfg, pre = _train_config(args), _preprocess(args)
    if args.workers < 1:
        raise OptionError("--workers must be >= 1")
    classes = read_classes(args.classes)[0] if args.classes else None
    with training_progress(enabled=not args.quiet):
        trained = train_from_labels(_labels_spec(args, args.labels), args.out, cfg=cfg, pre=pre, classes=classes,
                                    weights=args.weights, name=args.name, resume=args.resume,
                                    workers=args.workers, storage_options=args.storage_options,
                                    weights_dtype="float16" if args.half else "float32")
    v = trained.bundle.metrics["validation"]
    say(f"[bold]wrote bundle {args.out}[/bold]: {trained.bundle.model_id}, "
        f"{len(trained.bundle.classes)} classes, {trained.bundle.preprocess.size} px, best epoch "
        f"{trained.result.best_epoch} of {trained.result.cfg.epochs}, {trained.result.seconds:.0f} s")
    say(f"validation ({trained.val_images} images): mAP {v['mAP']:.4f}, macro-F1 "
        f"{v['at_thresholds']['macro_f1']:.4f} at calibrated thresholds "
        f"({v['at_0.5']['macro_f1']:.4f} at 0.5), Hamming loss {v['at_thresholds']['hamming_loss']:.4f}")
    say(f"use it with: mlcls tag SOURCE --out OUT --model {args.out}")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from mlcls.train.eval_job import eval_bundle

    options = _score_options(args)
    with training_progress(enabled=not args.quiet):
        evaluated = eval_bundle(args.bundle, _labels_spec(args, args.labels), report=args.report,
                                threshold=args.threshold, thresholds_file=args.thresholds, top_k=args.top_k,
                                options=options, storage_options=args.storage_options)
    print_eval(evaluated.metrics)
    if evaluated.files:
            say(f"report: {', '.join(evaluated.files)}")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mlcls.train.eval_job import calibrate_bundle

    options = _score_options(args)
    spec = _labels_spec(args, args.labels) if args.labels else None
    with training_progress(enabled=not args.quiet):
        before, after = calibrate_bundle(args.bundle, spec, out=args.out, threshold=args.threshold,
                                         thresholds_file=args.thresholds, min_positives=args.min_positives,
                                         options=options, storage_options=args.storage_options)
    say(f"[bold]wrote {args.out or args.bundle}[/bold]: {after.model_id}, thresholds by "
        f"{after.threshold_method} (were {before.threshold_method})")
    for name, old, new in zip(after.classes, before.thresholds, after.thresholds, strict=True):
        say(f"  {name:<24} {old:.3f} -> {new:.3f}")
    record = after.metrics.get("thresholds", {}).get("calibration")
    if record:
        say(f"on {record['images']} images: macro-F1 {record['at_previous_thresholds']['macro_f1']:.4f}"
            f" -> {record['at_new_thresholds']['macro_f1']:.4f}")
    return EXIT_OK


def say(text: str) -> None:
    """One line on stdout, never wrapped at the terminal's width (it is meant to be grepped and copied)."""
    from mlcls.cli.console import out_console

    out_console.print(text, soft_wrap=True, highlight=False)


def print_eval(m: dict[str, Any]) -> None:
    """The eval summary: mAP, then one line of metrics per labelling rule."""
    say(f"[bold]{m['model']}[/bold] on {m['images']} images ({m['labels']}): mAP {m['mAP']:.4f}")
    rules = [("thresholds", m["at_thresholds"]), ("0.5", m["at_0.5"]), ("top-3", m["at_top3"])]
    if "override" in m:
        rules.append((m["override"]["rule"], m["override"]))
    for name, r in rules:
        fpr = "-" if r["empty_fpr"] != r["empty_fpr"] else f"{r['empty_fpr']:.4f}"
        say(f"  at {name:<12} CF1 {r['CF1']:.4f}  OF1 {r['OF1']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
                          f"Hamming {r['hamming_loss']:.4f}  subset acc {r['subset_accuracy']:.4f}  "
                          f"FPR on no-label images {fpr}")


@contextmanager
def training_progress(enabled: bool = True) -> Iterator[None]:
    """Progress bars for reading images and for each epoch (loss, then val mAP) while the block runs.

    The library's own lines (one per epoch, warnings) are log records, which `main` shows on the same console.
    Only on a terminal: the bars are transient, so into a pipe or a CI log they would leave nothing but the
    blank line rich writes when a live display stops (before an error, `\nmlcls: error: ...`).
    """
    from mlcls.cli.console import console
    from mlcls.cli.train_progress import TrainProgress

    if not enabled or not console.is_terminal:
        yield
        return
    with TrainProgress(console):
        yield
