"""The `mlcls` command.

Argument parsing and presentation only: every command turns its arguments
into plain values and calls the library (or, for `tag`, the Prefect flow in
`flows/`, imported lazily so that the rest of the CLI starts fast and works
without a Prefect server). Errors the user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .errors import MlclsError

EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    from .console import error

    try:
        return handler(args)
    except MlclsError as err:
        error(str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        error("interrupted; finished shards are kept: run the same command again to continue")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlcls", description="Batch multi-label image tagging.")
    parser.add_argument("--version", action="version", version=f"mlcls {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_tag(sub)
    _add_bundle(sub)
    from .cli_query import add_commands
    from .cli_train import add_commands as add_train_commands

    add_commands(sub)
    add_train_commands(sub)
    return parser


def _add_tag(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tag", help="tag a folder, bucket prefix or URI list into a Parquet dataset",
                       description="Tag every new or changed image of SOURCE into the Parquet dataset at OUT. "
                                   "Runs as the Prefect flow tag-images (local mode, or PREFECT_API_URL).")
    p.add_argument("source", help="folder, URL (s3://bucket/prefix), image, or URI list (.txt/.csv/.parquet)")
    p.add_argument("--out", required=True, help="output folder or URL for the Parquet dataset")
    p.add_argument("--model", default=None, help="bundle folder or URL (default: the embedded demo bundle)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard and part file (default: 5000)")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: half the cores on CPU)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="larger images get an error row instead of being decoded (default: 100,000,000)")
    p.add_argument("--probs", default="all", help="probabilities kept: all, top-k:N or min:P (default: all)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (auto: fp32 on CPU)")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (slower, no draft mode)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: faster steady state after a compile of 20-70 s (cached "
                        "across runs by torch); worth it for long runs, see bench/RESULTS.md")
    p.add_argument("--gpu-decode", type=float, default=1.0, metavar="SHARE",
                   help="on CUDA, the share of JPEGs decoded on the GPU (nvJPEG); the rest on CPU workers "
                        "(default 1.0)")
    p.add_argument("--fan-out", choices=["none", "deployment"], default="none",
                   help="deployment: submit shards as flow runs of --shard-deployment for Prefect workers on "
                        "any machine (needs PREFECT_API_URL and an output all workers reach, e.g. S3)")
    p.add_argument("--shard-deployment", default="tag-shard/tag-shard", help="deployment that tags shards "
                   "(default: tag-shard/tag-shard from deployments/prefect.yaml)")
    p.add_argument("--shards-per-run", type=int, default=1, help="shards per fanned-out flow run (default 1)")
    add_storage_options(p)
    p.add_argument("--no-prefect", action="store_true", help="run in this process without Prefect (same output)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    p.set_defaults(handler=cmd_tag)


def _add_bundle(sub: argparse._SubParsersAction) -> None:
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


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """`--storage-options JSON`, the same on every command that reads or writes URLs."""
    p.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                   help='fsspec options for every URL, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _tag_options(args: argparse.Namespace) -> Any:
    from .images import DEFAULT_MAX_PIXELS
    from .pipeline import TagOptions

    return TagOptions(batch_size=args.batch_size, device=args.device, workers=args.workers,
                      shard_size=args.shard_size, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                      probs=args.probs, precision=args.precision, draft=not args.no_draft,
                      gpu_decode=args.gpu_decode, compile=args.compile).validate()


def cmd_tag(args: argparse.Namespace) -> int:
    from . import pipeline
    from .console import print_summary, progress_bar
    from .engine import resolve_device
    from .sources import check_source

    options = _tag_options(args)
    _check_fan_out(args)
    resolve_device(options.device)
    check_source(args.source, args.storage_options)  # then bundle and output: all before any work
    pipeline.open_run(args.out, args.model, options, args.storage_options)
    with progress_bar(enabled=not args.quiet):
        if args.no_prefect:
            summary_dict = pipeline.tag(args.source, args.out, args.model, options, args.storage_options).to_dict()
        else:
            summary_dict = _run_flow(args, options)
    summary = pipeline.RunSummary(**{k: v for k, v in summary_dict.items() if k != "images_per_second"})
    print_summary(summary)
    return EXIT_FAILED if summary.failed_shards else 0


def _check_fan_out(args: argparse.Namespace) -> None:
    if args.fan_out == "none":
        return
    if args.no_prefect:
        raise MlclsError("--fan-out deployment runs shards on Prefect workers; drop --no-prefect")
    if not os.environ.get("PREFECT_API_URL"):
        raise MlclsError("--fan-out deployment needs a Prefect server with workers: set PREFECT_API_URL "
                         "(see 'Running at scale' in the README)")
    if args.shards_per_run < 1:
        raise MlclsError(f"--shards-per-run must be at least 1, not {args.shards_per_run}")


def _run_flow(args: argparse.Namespace, options: Any) -> dict[str, Any]:
    """Run the tag-images flow in this process (Prefect's local mode unless PREFECT_API_URL is set)."""
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A busy 2-core machine can take longer than Prefect's default 20 s to start the local server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.tag import tag_images

    try:
        return _call_flow(tag_images, args, options)
    except RuntimeError as err:
        if "ephemeral" in str(err).lower() or "connect" in str(err).lower():
            raise MlclsError(f"could not reach a Prefect API ({str(err).splitlines()[0]}); set PREFECT_API_URL "
                             "to a running server, or use --no-prefect") from None
        raise


def _call_flow(tag_images: Any, args: argparse.Namespace, options: Any) -> dict[str, Any]:
    return tag_images(source=args.source, out=args.out, model=args.model, batch_size=options.batch_size,
                      device=options.device, shard_size=options.shard_size, workers=options.workers,
                      max_pixels=options.max_pixels, probs=options.probs, precision=options.precision,
                      draft=options.draft, gpu_decode=options.gpu_decode, compile=options.compile,
                      storage_options=args.storage_options,
                      fan_out=args.fan_out, shard_deployment=args.shard_deployment,
                      shards_per_run=args.shards_per_run)


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from .bundle import check_arch, create_bundle, read_classes, read_state_dict
    from .images import IMAGENET_MEAN, IMAGENET_STD, Preprocess

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
    from .bundle import load_bundle, resolve_model

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
    from .bundle import list_architectures

    print("\n".join(list_architectures()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
