"""What the CLI shows: the library's log messages, a progress bar fed by library events, and run summaries."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleRenderable, Group
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from mlcls import progress

if TYPE_CHECKING:  # a type only: `mlcls query` and friends start without importing torch
    from mlcls.tag.job import RunSummary

console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)
LIBRARY_LOGGER = "mlcls"


class MessageHandler(RichHandler):
    """Log records on the stderr console as the CLI has always shown them: the message alone, warnings and
    errors after a `mlcls: warning:` / `mlcls: error:` prefix; no time, level or path columns, no markup.

    Printed through the same console as the progress bars, so a message lands above a live bar.
    """

    PREFIXES = ((logging.ERROR, "mlcls: error: ", "red"), (logging.WARNING, "mlcls: warning: ", "yellow"))

    def __init__(self, level: int = logging.NOTSET, stream: Console | None = None) -> None:
        super().__init__(level, stream or console, show_time=False, show_level=False, show_path=False,
                         markup=False, highlighter=NullHighlighter(), keywords=[])

    def render_message(self, record: logging.LogRecord, message: str) -> ConsoleRenderable:
        text = Text(message)
        for level, prefix, style in self.PREFIXES:
            if record.levelno >= level:
                return Text.assemble((prefix, style), text)
        return text

    def render(self, *, record: logging.LogRecord, traceback: ConsoleRenderable | None,
               message_renderable: ConsoleRenderable) -> ConsoleRenderable:
        """The message as a plain line (wrapped at words like any console print), not a padded table row."""
        return Group(message_renderable, traceback) if traceback else message_renderable


@contextmanager
def library_logs(quiet: bool = False) -> Iterator[MessageHandler]:
    """Show the `mlcls` loggers' records on stderr while the block runs: INFO and up, WARNING and up if `quiet`.

    The `mlcls` logger stays at INFO either way (other handlers on it, such as Prefect's API handler during a
    flow run, still get the progress lines) and stops propagating, so nothing is shown twice. Put back as it
    was afterwards, so that `main` can run many times in one process (the tests do).
    """
    lib = logging.getLogger(LIBRARY_LOGGER)
    handler = MessageHandler(logging.WARNING if quiet else logging.INFO)
    saved = lib.level, lib.propagate
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    lib.propagate = False
    try:
        yield handler
    finally:
        lib.removeHandler(handler)
        lib.setLevel(saved[0])
        lib.propagate = saved[1]


class RateColumn(ProgressColumn):
    """Images per second, averaged by rich over its speed window."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} img/s" if speed else "   -- img/s", style="cyan")


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[None]:
    """Show a live bar while the block runs, driven by `mlcls.progress` events."""
    if not enabled:
        yield
        return
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   RateColumn(), TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    task_id = bar.add_task("listing", total=None, errors=0)

    def on_event(event: progress.Event) -> None:
        if event.kind == "planned":
            bar.update(task_id, total=event.total, description="tagging")
        elif event.kind == "images":
            errors = bar.tasks[0].fields["errors"] + event.errors
            bar.update(task_id, advance=event.count, errors=errors)

    unsubscribe = progress.subscribe(on_event)
    try:
        with bar:
            yield
    finally:
        unsubscribe()


def print_summary(summary: RunSummary, wall: float | None = None) -> None:
    """The short report after `mlcls tag`; with `wall`, where the command's time went."""
    if summary.new == 0:
        out_console.print(f"0 new images: all {summary.listed} listed images are already tagged by "
                          f"{summary.model} in {summary.out}")
        _print_wall(summary, wall)
        return
    out_console.print(
        f"[bold]tagged {summary.tagged} of {summary.new} new images[/bold] in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s), {summary.errors} errors, "
        f"{summary.already_done} already tagged -> {summary.out}"
        + (f" (Delta table version {summary.version}"
           + (f", {summary.superseded} older row{'s' * (summary.superseded != 1)} replaced)"
              if summary.superseded else ")")
           if summary.version is not None else ""))
    if summary.label_counts:
        top = ", ".join(f"{label} {n}" for label, n in list(summary.label_counts.items())[:12])
        out_console.print(f"labels: {top}")
    if summary.errors:
        kinds = ", ".join(f"{kind} {n}" for kind, n in summary.error_kinds.items())
        out_console.print(f"errors: {kinds}; e.g. {summary.error_sample[0][0]}: {summary.error_sample[0][1]}")
    if summary.failed_shards:
        out_console.print(f"[red]{len(summary.failed_shards)} shards failed[/red]; run the same command again "
                          "to retry them")
    _print_wall(summary, wall)


def _print_wall(summary: RunSummary, wall: float | None) -> None:
    """Wall time split: start-up (imports, checks, Prefect's local server) and the run itself."""
    if wall is not None:
        out_console.print(f"wall {wall:.1f} s: {max(0.0, wall - summary.seconds):.1f} s start-up "
                          f"(imports, checks, Prefect), {summary.seconds:.1f} s planning and tagging")


def error(message: str) -> None:
    console.print(f"[red]mlcls: error:[/red] {message}", soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
