"""The `mlcls` command: the parser, built from one module per command group, and the exit codes.

Argument parsing and presentation only: every command turns its arguments into plain values and
calls the library (or, for `tag`, the Prefect flow in `flows/`, imported lazily so that the rest of
the CLI starts fast and works without a Prefect server). Errors the user can fix print one line
and exit 2. The library reports through `logging` (loggers under `mlcls`) and configures no
handlers: `main` is where they are shown (`console.library_logs`), once, for every command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mlcls import __version__
from mlcls.cli import bundle, query, tag, train
from mlcls.cli.console import error, library_logs
from mlcls.cli.options import EXIT_USAGE
from mlcls.errors import MlclsError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    with library_logs(quiet=getattr(args, "quiet", False)):
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
    for group in (tag, bundle, query, train):
        group.add_commands(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
