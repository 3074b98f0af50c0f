"""Options shared by several commands; a leaf module, so every command module can import it."""

from __future__ import annotations

import argparse
import json
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """`--storage-options JSON`, the same on every command that reads or writes URLs."""
    p.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                   help='fsspec options for every URL, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value
