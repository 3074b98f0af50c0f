"""What a bundle is on storage, without torch: its file names, its `bundle.json`, its digest.

Kept apart from `mlcls.bundle` (which imports torch and torchvision) so that
the CLI can check `--model` in a fraction of a second, before the torch
import and Prefect's local server start: a wrong path fails at once.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from mlcls.errors import BundleError
from mlcls.storage import StorageOptions, describe_os_error, join, probe, read_file, url_to_fs

FORMAT = "mlcls-bundle"
FORMAT_VERSION = 1
META_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
DEMO_NAME = "demo"


def demo_bundle_url() -> str:
    """The bundled demo model shipped in the package."""
    return str(resources.files("mlcls.demo") / "bundle")


def resolve_model(model: str | None) -> str:
    """`None` or `"demo"` means the embedded demo bundle; anything else is a path or URL."""
    return demo_bundle_url() if model in (None, "", DEMO_NAME) else model


def digest_of(meta: dict[str, Any], weights: bytes) -> str:
    """Content hash of a bundle: canonical JSON (formatting-proof) plus the weight bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    h.update(hashlib.sha256(weights).digest())
    return h.hexdigest()[:16]


def bundle_folder(url: str | None) -> str:
    """The bundle folder a `--model` value names (`None`/`demo`: the demo; a path to `bundle.json`: its folder)."""
    url = resolve_model(url)
    if url.rstrip("/").endswith(META_FILE):
        url = url.rstrip("/")[: -len(META_FILE)].rstrip("/")
    return url


def read_bundle_file(url: str, name: str, storage_options: StorageOptions) -> bytes:
    """A bundle file's bytes, as long as the store says it is (a short read is read again, never
    taken for a malformed bundle); what fails to parse after that is malformed, and fails at once."""
    try:
        fs, base = url_to_fs(url, storage_options)
        return read_file(fs, join(base, name))
    except FileNotFoundError:
        if name == META_FILE:
            raise BundleError(f"no {META_FILE} in {url}: not an mlcls bundle "
                              "(make one with `mlcls bundle create`)") from None
        raise BundleError(f"bundle {url} has no weights file {name}") from None
    except (OSError, ValueError, ImportError) as err:
        raise BundleError(f"cannot read bundle {url}: {describe_os_error(err)}") from err


def read_meta(url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """The parsed `bundle.json` of the bundle folder `url`; a missing or foreign file fails with one line."""
    try:
        probe(url, storage_options)
    except OSError as err:
        raise BundleError(f"cannot read bundle {url}: {describe_os_error(err)}") from err
    raw = read_bundle_file(url, META_FILE, storage_options)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{META_FILE} in {url} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{META_FILE} in {url} is not an mlcls bundle (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"bundle {url} has format version {meta['format_version']}; this mlcls "
                          f"reads up to {FORMAT_VERSION}: upgrade mlcls")
    return meta
