"""`mlcls compact`: the Delta table's own maintenance, so mlcls keeps no compaction code of its own.

- A folder of parts written before the Delta table is made into one first
  (`mlcls.output.commit.adopt`: its files are committed as they are).
- `optimize.compact()` merges small files into files of about `target_bytes`
  in one commit; readers of the table see the same rows before and after.
- `vacuum` deletes files that no version younger than the retention refers
  to, and files no commit ever added (a crashed run's parts).
- A checkpoint and the expired-log cleanup keep opening the table fast.

Retention: 7 days by default (Delta's own default). Time travel
(`DeltaTable(out, version=N)`, `mlcls query --version N`) reaches every
version whose files are younger than that; a reader that globs
`**/*.parquet` instead of reading the table sees removed files until they are
vacuumed, which is one reason the README says not to glob. A shorter
retention frees space sooner and may break a long query still reading an
older version: `--retention-hours 0` is for tables nobody reads while it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mlcls.errors import OptionError, OutputError
from mlcls.output.commit import adopt
from mlcls.output.table import delta_retrying, open_table
from mlcls.storage import StorageOptions, describe_os_error, stat, url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TARGET_BYTES = 256 * 2**20
DEFAULT_RETENTION_HOURS = 168


@dataclass
class CompactResult:
    """What `compact` did, for the CLI to print."""

    out: str
    version: int
    adopted: int = 0  # part files of a pre-Delta output committed into a new table
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    vacuumed: int = 0
    seconds: float = 0.0


def compact(out: str, storage_options: StorageOptions = None, *, target_bytes: int = DEFAULT_TARGET_BYTES,
            retention_hours: float = DEFAULT_RETENTION_HOURS) -> CompactResult:
    """Adopt a pre-Delta folder if needed, merge small files, vacuum, checkpoint; see the module docstring."""
    from deltalake.exceptions import DeltaError

    if target_bytes < 1 or retention_hours < 0:
        raise OptionError("--target-size must be >= 1 MB and --retention-hours >= 0")
    started = time.perf_counter()
    fs, base = url_to_fs(out, storage_options)
    if stat(fs, base) is None:
        raise OutputError(f"output not found: {out}")
    adopted = adopt(out, storage_options).added
    table = open_table(out, storage_options)
    if table is None:
        raise OutputError(f"output {out} holds no tags; run mlcls tag SOURCE --out {out} first")
    before = len(table.file_uris())
    def fresh(step: Callable[[], T]) -> Callable[[], T]:
        """`step` on the table as stored now: after an error, a landed commit leaves nothing for it to do."""
        return lambda: (table.update_incremental(), step())[1]

    try:
        metrics = delta_retrying(fresh(lambda: table.optimize.compact(target_size=target_bytes)), f"optimize {out}")
        vacuumed = delta_retrying(fresh(lambda: table.vacuum(retention_hours=int(retention_hours), dry_run=False,
                                                             enforce_retention_duration=False, full=True)),
                                  f"vacuum {out}")
        delta_retrying(fresh(table.create_checkpoint), f"checkpoint {out}")
        delta_retrying(fresh(table.cleanup_metadata), f"clean up the log of {out}")
    except (OSError, DeltaError) as err:
        raise OutputError(f"cannot compact {out}: {describe_os_error(err)}") from err
    try:
        delta_retrying(table.update_incremental, f"read the Delta table {out}")
    except (OSError, DeltaError) as err:
        raise OutputError(f"compacted {out}, then could not read it back: {describe_os_error(err)}") from err
    log.debug("optimize of %s: %s", out, metrics)
    return CompactResult(out=out, version=table.version(), adopted=adopted, files_before=before,
                         files_after=len(table.file_uris()), rows=int(table.count()), vacuumed=len(vacuumed),
                         seconds=time.perf_counter() - started)
