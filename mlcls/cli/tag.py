"""`mlcls tag`: arguments in, the tag-images flow (or the in-process job) out."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from mlcls.cli import STARTED
from mlcls.cli.local_server import LocalServer
from mlcls.cli.options import EXIT_FAILED, add_storage_options
from mlcls.errors import MlclsError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tag", help="tag a folder, bucket prefix or URI list into a Parquet dataset",
                       description="Tag every new or changed image of SOURCE into the Parquet dataset at OUT. "
                                   "Runs as the Prefect flow tag-images (local mode, or PREFECT_API_URL).")
    p.add_argument("source", help="folder, URL (s3://bucket/prefix), image, or URI list (.txt/.csv/.parquet)")
    p.add_argument("--out", required=True, help="output folder or URL for the Parquet dataset")
    p.add_argument("--model", default=None, help="bundle folder or URL (default: the embedded demo bundle)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard and part file (default: 5000)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode workers (default: half the cores on CPU, all but one on GPU)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="larger images get an error row instead of being decoded (default: 100,000,000)")
    p.add_argument("--probs", default="all", help="probabilities kept: all, top-k:N or min:P (default: all)")
    p.add_argument("--precision", default="auto",
                   help="fp32, bf16, fp16 or auto (auto: bf16 on CUDA and on a CPU with AMX or avx512_bf16, else fp32)")
    p.add_argument("--no-draft", action="store_true",
                   help="decode JPEGs at full size and resize whole images: torchvision's pixels exactly (slower)")
    p.add_argument("--retry-errors", action="store_true",
                   help="tag again the images whose rows are decode, empty or too_large errors (read errors are "
                        "always tagged again)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model: auto (default) compiles on a GPU when the run is long enough to win "
                        "back the compile (cached under ~/.cache/mlcls), and runs eager on a CPU (measured faster "
                        "end to end); --compile alone means on")
    p.add_argument("--gpu-decode", type=float, default=1.0, metavar="SHARE",
                   help="on CUDA, the share of JPEGs decoded on the GPU (nvJPEG); the rest on CPU workers "
                        "(default 1.0)")
    p.add_argument("--fan-out", choices=["none", "deployment"], default="none",
                   help="deployment: hand shards to warm flow runs of --shard-deployment for Prefect workers "
                        "on any machine (needs PREFECT_API_URL and an output all workers reach, e.g. S3)")
    p.add_argument("--shard-deployment", default="tag-shard/tag-shard", help="deployment that tags shards "
                   "(default: tag-shard/tag-shard from deployments/prefect.yaml)")
    p.add_argument("--slots", type=int, default=0, help="fanned-out slot runs, each tagging shard after shard in "
                   "one warm process (default 0: one per online worker of the deployment's pool)")
    add_storage_options(p)
    p.add_argument("--no-prefect", action="store_true", help="run in this process without Prefect (same output)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; of mlcls's messages only warnings")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    p.set_defaults(handler=cmd_tag)


def _tag_options(args: argparse.Namespace) -> Any:
    from mlcls.images.decode import DEFAULT_MAX_PIXELS
    from mlcls.tag.job import TagOptions

    return TagOptions(batch_size=args.batch_size, device=args.device, workers=args.workers,
                      shard_size=args.shard_size, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                      probs=args.probs, precision=args.precision, draft=not args.no_draft,
                      gpu_decode=args.gpu_decode, compile=args.compile, retry_errors=args.retry_errors).validate()


def cmd_tag(args: argparse.Namespace) -> int:
    from mlcls.bundle_meta import bundle_folder, read_meta
    from mlcls.sources import check_source

    _check_fan_out(args)
    check_source(args.source, args.storage_options)  # cheap (no torch yet): a wrong source exits at once
    read_meta(bundle_folder(args.model), args.storage_options)  # and so does a --model that is not a bundle
    # Then Prefect's local server boots in a subprocess while this one imports torch, checks and loads.
    server = None if args.no_prefect else _local_server(args.verbose)
    try:
        return _tag(args, server)
    except BaseException:
        if server is not None and not server.used:
            server.stop(graceful=False)  # an early error: nothing ran on it that needs a clean shutdown
        raise
    finally:
        if server is not None:
            server.release()


def _tag(args: argparse.Namespace, server: LocalServer | None) -> int:
    from mlcls.cli.console import print_summary, progress_bar
    from mlcls.tag import job
    from mlcls.tag.engine import resolve_device

    options = _tag_options(args)
    resolve_device(options.device)
    job.open_run(args.out, args.model, options, args.storage_options)
    with progress_bar(enabled=not args.quiet):
        if server is None:
            summary_dict = job.tag_images(args.source, args.out, args.model, options, args.storage_options).to_dict()
        else:
            server.wait()
            summary_dict = _run_flow(args, options)
    summary = job.RunSummary(**{k: v for k, v in summary_dict.items() if k != "images_per_second"})
    print_summary(summary, wall=time.perf_counter() - STARTED)
    return EXIT_FAILED if summary.failed_shards else 0


def _check_fan_out(args: argparse.Namespace) -> None:
    if args.fan_out == "none":
        return
    if args.no_prefect:
        raise MlclsError("--fan-out deployment runs shards on Prefect workers; drop --no-prefect")
    if not os.environ.get("PREFECT_API_URL"):
        raise MlclsError("--fan-out deployment needs a Prefect server with workers: set PREFECT_API_URL "
                         "(see 'Running at scale' in the README)")
    if args.slots < 0:
        raise MlclsError(f"--slots must be 0 (one per online worker) or more, not {args.slots}")


def _local_server(verbose: bool) -> LocalServer:
    """Prefect's settings, then its local server booting in a subprocess while the CLI imports, checks and loads."""
    _prefect_env(verbose)
    return LocalServer().start()


def _prefect_env(verbose: bool) -> None:
    """Prefect's settings for a CLI run, set before Prefect is first imported (it reads some only then)."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _add_extra_logger("mlcls")
    # A busy 2-core machine can take longer than Prefect's default 20 s to start the local server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _run_flow(args: argparse.Namespace, options: Any) -> dict[str, Any]:
    """Run the tag-images flow in this process (Prefect's local mode unless PREFECT_API_URL is set)."""
    from flows.tag import tag_images

    try:
        return _call_flow(tag_images, args, options)
    except RuntimeError as err:
        if "ephemeral" in str(err).lower() or "connect" in str(err).lower():
            raise MlclsError(f"could not reach a Prefect API ({str(err).splitlines()[0]}); set PREFECT_API_URL "
                             "to a running server, or use --no-prefect") from None
        raise


def _add_extra_logger(name: str) -> None:
    """Have Prefect give the library's loggers its API handler when it sets up logging (on first import).

    Added to the user's own PREFECT_LOGGING_EXTRA_LOGGERS, if any. `flows.logs` does the same at flow start
    in a process where Prefect's logging was set up before this ran.
    """
    names = [n.strip() for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n.strip()]
    if name not in names:
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*names, name])


def _call_flow(tag_images: Any, args: argparse.Namespace, options: Any) -> dict[str, Any]:
    return tag_images(source=args.source, out=args.out, model=args.model, batch_size=options.batch_size,
                      device=options.device, shard_size=options.shard_size, workers=options.workers,
                      max_pixels=options.max_pixels, probs=options.probs, precision=options.precision,
                      draft=options.draft, gpu_decode=options.gpu_decode, compile=options.compile,
                      retry_errors=options.retry_errors, storage_options=args.storage_options,
                      fan_out=args.fan_out, shard_deployment=args.shard_deployment,
                      slots=args.slots)
