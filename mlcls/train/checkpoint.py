"""Training checkpoints: the whole run state after an epoch, written atomically, read back only by
the same run.

A checkpoint carries a fingerprint of the settings, the classes and the
number of training and validation images; resuming with anything else would
silently train a different model, so it is refused with a one-line error.
Only tensors and plain values are stored (`torch.load(weights_only=True)`
reads it back), never pickled code.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import torch

from mlcls.errors import OptionError
from mlcls.storage import StorageOptions, describe_os_error, read_file, url_to_fs, write_atomic


def fingerprint(settings: dict[str, Any], classes: Sequence[str], n_train: int, n_val: int) -> str:
    """What a checkpoint must match to be resumed: the settings, the classes and the data's shape."""
    d = {**settings, "classes": list(classes), "n": [n_train, n_val]}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(url: str, state: dict[str, Any], storage_options: StorageOptions = None) -> None:
    """Write the run state atomically: a crash mid-write leaves the previous checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        fs, path = url_to_fs(url, storage_options)
        write_atomic(fs, path, buf.getvalue())
    except OSError as err:
        raise OptionError(f"cannot write checkpoint {url}: {describe_os_error(err)}") from err


def load_checkpoint(url: str, key: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """A checkpoint of this very run (same data shape and settings), or a one-line error."""
    try:
        fs, path = url_to_fs(url, storage_options)
        data = read_file(fs, path)
    except FileNotFoundError:
        raise OptionError(f"no checkpoint at {url} to resume from; run without --resume to start afresh") from None
    except OSError as err:
        raise OptionError(f"cannot read checkpoint {url}: {describe_os_error(err)}") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise OptionError(f"checkpoint {url} is not readable ({str(err).splitlines()[0]})") from None
    if state.get("fingerprint") != key:
        raise OptionError(f"checkpoint {url} is from a run with other data or settings; "
                          "resume with the same command, or run without --resume to start afresh")
    return state
