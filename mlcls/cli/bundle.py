"""`mlcls bundle create|show|archs`."""

from __future__ import annotations

import argparse
import json
import os


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="create or inspect model bundles")
    bsub = p.add_subparsers(title="bundle commands", metavar="COMMAND")
    c = bsub.add_parser("create", help="turn a torchvision architecture and a state dict into a bundle")
    c.add_argument("--arch", required=True, help="torchvision classification architecture, e.g. resnet50")
    c.add_argument("--classes", required=True, metavar="FILE_OR_CSV",
                   help="class names: a .txt (one per line), .json, .csv (name[,threshold]) or 'a,b,c'")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="state dict: .safetensors, .pth or .pt (wrapped dicts are unwrapped)")
    src.add_argument("--random-init", action="store_true", help="random weights (for tests and benchmarks)")
    c.add_argument("--out", required=True, help="bundle folder or URL to write")
    c.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    c.add_argument("--threshold", type=float, default=None, help="one threshold for every class (default 0.5)")
    c.add_argument("--size", type=int, default=224, help="model input side (default 224)")
    c.add_argument("--resize-size", type=int, default=None, help="shorter side before the crop (default size*8/7)")
    c.add_argument("--resize-mode", default="shorter", choices=["shorter", "squash"])
    c.add_argument("--interpolation", default="bilinear")
    c.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"))
    c.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"))
    c.set_defaults(handler=cmd_bundle_create)
    s = bsub.add_parser("show", help="print a bundle's classes, thresholds, preprocessing and metrics")
    s.add_argument("model", nargs="?", default=None, help="bundle folder or URL (default: the demo bundle)")
    s.set_defaults(handler=cmd_bundle_show)
    a = bsub.add_parser("archs", help="list the torchvision architectures a bundle can use")
    a.set_defaults(handler=cmd_bundle_archs)


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from mlcls.bundle import check_arch, create_bundle, read_classes, read_state_dict
    from mlcls.images.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    check_arch(args.arch)
    classes, thresholds = read_classes(args.classes)
    if args.threshold is not None:
        thresholds = [args.threshold] * len(classes)
    preprocess = Preprocess(size=args.size, resize_size=args.resize_size or round(args.size * 8 / 7),
                            resize_mode=args.resize_mode, interpolation=args.interpolation,
                            mean=tuple(args.mean or IMAGENET_MEAN), std=tuple(args.std or IMAGENET_STD))
    state_dict = None if args.random_init else read_state_dict(args.weights)
    name = args.name or os.path.basename(args.out.rstrip("/")) or "bundle"
    bundle = create_bundle(args.out, name=name, arch=args.arch, classes=classes, thresholds=thresholds,
                           preprocess=preprocess, state_dict=state_dict)
    print(f"wrote bundle {args.out}: {bundle.arch}, {len(bundle.classes)} classes, model id {bundle.model_id}")
    print(f"use it with: mlcls tag SOURCE --out OUT --model {args.out}")
    return 0


def cmd_bundle_show(args: argparse.Namespace) -> int:
    from mlcls.bundle import load_bundle, resolve_model

    bundle = load_bundle(args.model)
    pre = bundle.preprocess
    print(f"bundle   {resolve_model(args.model)}")
    print(f"model    {bundle.model_id} ({bundle.arch}, version {bundle.version}, created {bundle.created_at})")
    print(f"input    {pre.size}x{pre.size}, resize {pre.resize_mode} {pre.resize_size}, {pre.interpolation}, "
          f"mean {list(pre.mean)}, std {list(pre.std)}")
    print(f"classes  {len(bundle.classes)}, thresholds by {bundle.threshold_method}:")
    for name, threshold in zip(bundle.classes, bundle.thresholds, strict=True):
        print(f"  {name:<24} {threshold:.3f}")
    if bundle.metrics:
        print("metrics  " + json.dumps(bundle.metrics, sort_keys=True)[:2000])
    return 0


def cmd_bundle_archs(args: argparse.Namespace) -> int:
    from mlcls.bundle import list_architectures

    print("\n".join(list_architectures()))
    return 0
