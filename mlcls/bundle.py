"""Model bundles: weights plus everything needed to use them correctly.

A bundle is a folder (local or at any fsspec URL) with two files:

- `bundle.json`: format version, name, torchvision architecture, ordered
  class names, per-class thresholds (and how they were chosen),
  preprocessing, training metrics;
- `model.safetensors`: the state dict, one logit per class.

Its digest (a hash of both) names the model in the output, so re-running with
the same bundle skips what is already tagged and a new bundle re-tags.
A bundle that does not fit its weights fails at load with a message that
says how, never at the first batch.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import torch
import torchvision
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from mlcls.bundle_meta import (  # noqa: F401 - re-exported: the names bundle users import from here
    DEMO_NAME,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    bundle_folder,
    demo_bundle_url,
    digest_of,
    read_bundle_file,
    read_meta,
    resolve_model,
)
from mlcls.errors import BundleError
from mlcls.images.preprocess import Preprocess
from mlcls.storage import (
    StorageOptions,
    describe_os_error,
    is_local,
    join,
    read_bytes,
    read_file,
    url_to_fs,
    write_atomic,
)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: metadata, weights (CPU tensors) and content digest."""

    name: str
    arch: str
    classes: tuple[str, ...]
    thresholds: tuple[float, ...]
    preprocess: Preprocess
    threshold_method: str = "fixed"
    version: str = "1"
    metrics: dict[str, Any] = field(default_factory=dict, compare=False)
    created_at: str | None = None
    digest: str = ""
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def model_id(self) -> str:
        """`name@digest`, the value of the output's `model` column."""
        return f"{self.name}@{self.digest}"

    def meta(self) -> dict[str, Any]:
        """The content of `bundle.json`."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "arch": self.arch,
            "classes": list(self.classes),
            "thresholds": [float(t) for t in self.thresholds],
            "threshold_method": self.threshold_method,
            "preprocess": self.preprocess.to_dict(),
            "weights": WEIGHTS_FILE,
            "metrics": self.metrics,
            "created_at": self.created_at,
        }

    def build_model(self) -> nn.Module:
        """The torchvision model with this bundle's weights, on the CPU, in eval mode."""
        return build_model(self.arch, len(self.classes), self.state_dict).eval()


def list_architectures() -> list[str]:
    """Every torchvision classification architecture name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Raise a `BundleError` with suggestions for an unknown architecture."""
    known = list_architectures()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BundleError(f"unknown architecture {arch!r}{hint}; `mlcls bundle archs` lists them")


def build_model(arch: str, num_classes: int, state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """Build `arch` with `num_classes` outputs and load `state_dict` strictly.

    The model is built on the meta device and the bundle's tensors are
    assigned, not copied, so loading a large model costs no random init.
    """
    check_arch(arch)
    if state_dict is None:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except NotImplementedError:  # regnets compute their widths with tensors: not on the meta device
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise BundleError(f"the weights do not fit {arch} with {num_classes} classes: "
                          f"{_mismatch(err, state_dict, model)}") from None
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        real = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        real.load_state_dict(state_dict, strict=True)
        return real
    return model


def _mismatch(err: RuntimeError, state_dict: dict[str, torch.Tensor], model: nn.Module) -> str:
    """Summarise a failed strict load in one line: shapes first, then missing/unexpected keys."""
    expected = model.state_dict()
    shapes = [f"{k} is {tuple(v.shape)} in the weights but {tuple(expected[k].shape)} in the model"
              for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    parts = shapes[:2]
    if missing:
        parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    return "; ".join(parts) or str(err).splitlines()[0]


def load_bundle(url: str | None, storage_options: StorageOptions = None) -> Bundle:
    """Load and validate the bundle at `url` (a folder, or its `bundle.json`)."""
    url = bundle_folder(url)
    meta = read_meta(url, storage_options)
    bundle_from_meta(meta, where=url)  # a malformed bundle.json fails before the weights are read
    weights = read_bundle_file(url, meta.get("weights", WEIGHTS_FILE), storage_options)
    bundle = bundle_from_meta(meta, where=url, digest=digest_of(meta, weights))
    try:
        state_dict = load_safetensors(weights)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise BundleError(f"the weights of bundle {url} are not a readable safetensors file: {err}") from None
    state_dict = _as_float32(state_dict)
    build_model(bundle.arch, len(bundle.classes), state_dict)  # fails here, not at the first batch
    return replace(bundle, state_dict=state_dict)


def _as_float32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Half-precision weights are a storage format; models run from float32."""
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state_dict.items()}


def bundle_from_meta(meta: dict[str, Any], *, where: str, digest: str = "") -> Bundle:
    """Validate `bundle.json` content and turn it into a `Bundle` (without weights)."""
    for key in ("name", "arch", "classes", "preprocess"):
        if key not in meta:
            raise BundleError(f"{META_FILE} in {where} lacks the field {key!r}")
    classes = meta["classes"]
    check_classes(classes, where)
    thresholds = meta.get("thresholds", [0.5] * len(classes))
    check_thresholds(thresholds, len(classes), where)
    check_arch(meta["arch"])
    if not isinstance(meta["preprocess"], dict):
        raise BundleError(f"{META_FILE} in {where}: 'preprocess' must be an object")
    return Bundle(
        name=str(meta["name"]),
        arch=meta["arch"],
        classes=tuple(classes),
        thresholds=tuple(float(t) for t in thresholds),
        preprocess=Preprocess.from_dict(meta["preprocess"]),
        threshold_method=str(meta.get("threshold_method", "fixed")),
        version=str(meta.get("version", "1")),
        metrics=meta.get("metrics") or {},
        created_at=meta.get("created_at"),
        digest=digest,
    )


def check_classes(classes: Any, where: str) -> None:
    if not isinstance(classes, list) or not classes:
        raise BundleError(f"{where}: classes must be a non-empty list of names")
    bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
    if bad:
        raise BundleError(f"{where}: class names must be non-empty strings, not {bad[0]!r}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise BundleError(f"{where}: class names must be unique; repeated: {', '.join(dupes[:5])}")


def check_thresholds(thresholds: Any, n: int, where: str) -> None:
    if not isinstance(thresholds, list) or len(thresholds) != n:
        count = len(thresholds) if isinstance(thresholds, list) else "no list of"
        raise BundleError(f"{where}: {count} thresholds for {n} classes; give one per class")
    bad = [t for t in thresholds if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0]
    if bad:
        raise BundleError(f"{where}: thresholds must be numbers between 0 and 1, not {bad[0]!r}")


def save_bundle(
    out: str,
    *,
    name: str,
    arch: str,
    classes: list[str],
    state_dict: dict[str, torch.Tensor],
    preprocess: Preprocess,
    thresholds: list[float] | None = None,
    threshold_method: str = "fixed",
    metrics: dict[str, Any] | None = None,
    version: str = "1",
    weights_dtype: str = "float32",
    storage_options: StorageOptions = None,
) -> Bundle:
    """Validate and write a bundle to `out`; return it loaded, digest included.

    `weights_dtype="float16"` halves the file (the demo bundle ships so);
    weights are always loaded as float32. The weights are written before
    `bundle.json`, so a folder with a `bundle.json` is complete even if the
    process died while writing.
    """
    thresholds = [0.5] * len(classes) if thresholds is None else [float(t) for t in thresholds]
    bundle = Bundle(name=name, arch=arch, classes=tuple(classes), thresholds=tuple(thresholds),
                    preprocess=preprocess, threshold_method=threshold_method, version=version,
                    metrics=metrics or {}, created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    meta = bundle.meta()
    bundle_from_meta(meta, where=out)
    if weights_dtype not in ("float32", "float16"):
        raise BundleError(f"weights_dtype must be float32 or float16, not {weights_dtype!r}")
    dtype = getattr(torch, weights_dtype)
    tensors = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in state_dict.items()}
    build_model(arch, len(classes), tensors)
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    try:
        fs, base = url_to_fs(out, storage_options)
        if is_local(fs):
            fs.makedirs(base, exist_ok=True)
        write_atomic(fs, join(base, WEIGHTS_FILE), weights)
        write_atomic(fs, join(base, META_FILE), (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as err:
        raise BundleError(f"cannot write bundle to {out}: {describe_os_error(err)}") from err
    return replace(bundle, digest=digest_of(meta, weights), state_dict=_as_float32(tensors))


def create_bundle(out: str, *, name: str, arch: str, classes: list[str], preprocess: Preprocess,
                  thresholds: list[float] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                  storage_options: StorageOptions = None) -> Bundle:
    """A bundle from an architecture and a state dict (or random init), checked by one forward pass."""
    check_arch(arch)
    check_classes(list(classes), "--classes")
    model = build_model(arch, len(classes), state_dict).eval()
    check_forward(model, arch, preprocess.size, len(classes))
    return save_bundle(out, name=name, arch=arch, classes=list(classes), state_dict=model.state_dict(),
                       preprocess=preprocess, thresholds=thresholds, storage_options=storage_options)


def check_forward(model: nn.Module, arch: str, size: int, num_classes: int) -> None:
    """Run one blank image through the model: input size and head must fit."""
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, 3, size, size))
    except Exception as err:  # noqa: BLE001 - any failure here means the input size does not fit
        raise BundleError(f"{arch} cannot take {size}x{size} input: {str(err).splitlines()[0]} "
                          "(set --size to what the architecture expects)") from None
    if tuple(out.shape) != (1, num_classes):
        raise BundleError(f"{arch} gives output of shape {tuple(out.shape)}, expected (1, {num_classes})")


def read_state_dict(path: str, storage_options: StorageOptions = None) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch checkpoint (`.pth`, `.pt`, `.bin`).

    Checkpoints that wrap the state dict (`{"state_dict": ...}`, `{"model": ...}`)
    or carry DataParallel's `module.` prefix are unwrapped. Never unpickles code.
    """
    try:
        fs, p = url_to_fs(path, storage_options)
        data = read_file(fs, p)
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read weights {path}: {describe_os_error(err)}") from err
    try:
        if path.endswith(".safetensors"):
            obj: Any = load_safetensors(data)
        else:
            import io

            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types
        raise BundleError(f"cannot load weights {path}: {str(err).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BundleError(f"weights {path} do not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_classes(spec: str) -> tuple[list[str], list[float] | None]:
    """Class names (and thresholds, if given) from a file or an inline comma list.

    Files: `.txt` (one name per line), `.json` (a list), or `.csv` with a
    `name` or `class` column and an optional `threshold` column. Anything
    that is not an existing file is read as `cat,dog,boat`.
    """
    if not os.path.isfile(spec) and "://" not in spec:
        if os.path.splitext(spec)[1].lower() in (".txt", ".csv", ".json"):
            raise BundleError(f"classes file not found: {spec}")
        return [c.strip() for c in spec.split(",") if c.strip()], None
    fs, p = url_to_fs(spec)
    text = read_bytes(fs, p).decode("utf-8")
    if spec.endswith(".json"):
        return list(json.loads(text)), None
    if spec.endswith(".csv"):
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(text)))
        cols = {c.lower(): c for c in (rows[0].keys() if rows else [])}
        name_col = cols.get("name") or cols.get("class")
        if name_col is None:
            raise BundleError(f"classes file {spec} needs a 'name' or 'class' column")
        names = [r[name_col].strip() for r in rows]
        thr = cols.get("threshold")
        return names, ([float(r[thr]) for r in rows] if thr else None)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")], None
