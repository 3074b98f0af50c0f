"""Progress bars for training and evaluation, fed by `mlcls.progress` events.

One bar while images are read (`loading`/`loaded`), then one per epoch
(`epoch`/`step`) showing the running loss; `validated` closes the epoch's
bar with its validation mAP. The bars are transient: what stays on screen
is the job's own log, one line per epoch. The library only emits events; this is the
CLI's view of them (a flow logs the same events instead).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mlcls import progress


class TrainProgress:
    """A context manager: subscribes to progress events and draws rich bars while the block runs."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console, transient=True)
        self.task: TaskID | None = None
        self.loss_sum = 0.0
        self.seen = 0
        self.unsubscribe = None

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        self.unsubscribe = progress.subscribe(self.on_event)
        return self

    def __exit__(self, *exc) -> None:
        if self.unsubscribe:
            self.unsubscribe()
        self.bar.__exit__(*exc)

    def on_event(self, event: progress.Event) -> None:
        kind, v = event.kind, event.values
        if kind == "loading":
            self.task = self.bar.add_task("reading images", total=event.total, info="")
        elif kind == "loaded" and self.task is not None:
            self.bar.advance(self.task, event.count)
            if event.errors:
                self.bar.update(self.task, info=f"{event.errors} undecodable")
        elif kind == "epoch":
            self.loss_sum, self.seen = 0.0, 0
            self.task = self.bar.add_task(f"epoch {int(v['epoch'])}/{int(v['epochs'])}", total=event.total,
                                          info="loss -")
        elif kind == "step" and self.task is not None:
            self.loss_sum += v["loss"] * event.count
            self.seen += event.count
            self.bar.update(self.task, advance=1, info=f"loss {self.loss_sum / self.seen:.4f}")
        elif kind == "validated" and self.task is not None:
            best = "  best" if v.get("best") else ""
            self.bar.update(self.task, info=f"loss {v['loss']:.4f}  val mAP {v['val_mAP']:.4f}{best}")
