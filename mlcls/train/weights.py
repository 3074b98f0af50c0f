"""Starting weights for fine-tuning: a state dict file, torchvision's weights enum, or none.

A pretrained checkpoint has a head for its own classes (ImageNet's 1000);
the new model needs one logit per class of the labels file. The backbone is
loaded and an old head of another shape dropped (the caller reports which
keys), so the new head starts from torchvision's own initialisation. A head
of the right shape (weights of an earlier run on the same classes) is kept:
throwing away what it learnt would make fine-tuning start over. Which parameters form
the head is found by building the architecture with two class counts and
comparing shapes: no per-architecture table, and no guessing from layer
widths (a model with 64 classes has many 64-channel layers).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from mlcls.bundle import build_model, read_state_dict
from mlcls.errors import BundleError, OptionError
from mlcls.storage import StorageOptions

logger = logging.getLogger(__name__)
_ENUM_NAME = re.compile(r"^(?:[A-Za-z0-9_]+_Weights\.)?[A-Z0-9_]+$")
_WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass
class InitWeights:
    """Backbone weights ready for `build_model(..., strict=False)`, and what was dropped to get them."""

    state_dict: dict[str, torch.Tensor]
    source: str
    dropped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.dropped:
            return f"weights from {self.source}"
        return f"weights from {self.source}; new head: dropped {', '.join(self.dropped)}"


def head_shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The state-dict keys whose shape depends on the number of classes (the classifier head), with their shapes."""
    try:
        with torch.device("meta"):
            a = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).state_dict()
            b = torchvision.models.get_model(arch, weights=None, num_classes=num_classes + 1).state_dict()
    except NotImplementedError:  # regnets compute their widths with tensors: not on the meta device
        a = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).state_dict()
        b = torchvision.models.get_model(arch, weights=None, num_classes=num_classes + 1).state_dict()
    return {k: tuple(a[k].shape) for k in a if a[k].shape != b[k].shape}


def head_keys(arch: str, num_classes: int) -> set[str]:
    """The state-dict keys whose shape depends on the number of classes: the classifier head(s)."""
    return set(head_shapes(arch, num_classes))


def head_parameters(model: nn.Module, arch: str, num_classes: int) -> list[nn.Parameter]:
    """The parameters of the classifier head (trained while the backbone is frozen)."""
    keys = head_keys(arch, num_classes)
    params = [p for name, p in model.named_parameters() if name in keys]
    if not params:
        raise OptionError(f"cannot find the classifier head of {arch}")
    return params


def is_enum_name(spec: str) -> bool:
    """`IMAGENET1K_V2`, `DEFAULT` or `ResNet50_Weights.IMAGENET1K_V2` (and not an existing file)."""
    return bool(_ENUM_NAME.match(spec)) and not os.path.exists(spec) and not spec.lower().endswith(_WEIGHT_FILES)


def load_init_weights(spec: str | None, arch: str, num_classes: int,
                      storage_options: StorageOptions = None) -> InitWeights | None:
    """Read `spec` (file, URL or torchvision enum name), check it fits `arch`, drop its head.

    `None`, `none` or `random` is a random init. `auto` takes torchvision's
    DEFAULT weights when they are already in the local torch hub cache and
    otherwise falls back to a random init with a warning: it never starts a
    download on its own, so a machine without internet trains all the same.
    """
    if not spec or spec.lower() in ("none", "random"):
        return None
    if spec.lower() == "auto":
        spec = cached_default_weights(arch)
        if spec is None:
            logger.warning("no torchvision weights for %s in the local cache (%s): training from random init; "
                           "pass --weights FILE.pth (or --weights DEFAULT to download them)", arch,
                           torch.hub.get_dir())
            return None
    if is_enum_name(spec):
        state, source = torchvision_state_dict(spec, arch), f"torchvision {spec}"
    else:
        state, source = read_state_dict(spec, storage_options), spec
    head = head_shapes(arch, num_classes)
    if all(k in state and tuple(state[k].shape) == shape for k, shape in head.items()):
        head = {}  # the head fits these classes: keep what it learnt
    dropped = sorted(k for k in state if k in head)
    backbone = {k: v for k, v in state.items() if k not in head}
    init = InitWeights(state_dict=backbone, source=source,
                       dropped=[f"{k} {tuple(state[k].shape)}" for k in dropped])
    init_model(arch, num_classes, init)  # fails here with a message, not later
    return init


def cached_default_weights(arch: str) -> str | None:
    """The name of `arch`'s DEFAULT torchvision weights if their file is in the torch hub cache."""
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (KeyError, ValueError, AttributeError):
        return None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return weights.name if os.path.isfile(cached) else None


def torchvision_state_dict(name: str, arch: str) -> dict[str, torch.Tensor]:
    """torchvision's pretrained weights (from the local torch hub cache or its download site)."""
    try:
        weights = (torchvision.models.get_weight(name) if "." in name
                   else torchvision.models.get_model_weights(arch)[name])
    except (KeyError, ValueError) as err:
        try:
            known = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
        except (KeyError, ValueError):
            known = "none"
        raise OptionError(f"--weights {name}: not a torchvision weights name for {arch} (it has: {known}); "
                          f"or give a state dict file ({err.__class__.__name__})") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001 - urllib, OSError, hash mismatch: all mean "not reachable"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OptionError(f"--weights {name}: cannot fetch torchvision's {weights} from {weights.url} ({reason}); "
                          "download that file where it is reachable and pass it: --weights FILE.pth") from None


def init_model(arch: str, num_classes: int, init: InitWeights | None) -> nn.Module:
    """`arch` with `num_classes` outputs: random, or the backbone from `init` and a fresh head."""
    model = build_model(arch, num_classes, None)
    if init is None:
        return model
    expected = model.state_dict()
    head = head_keys(arch, num_classes)
    wrong = [f"{k} is {tuple(v.shape)} in the weights but {tuple(expected[k].shape)} in {arch}"
             for k, v in init.state_dict.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in init.state_dict and k not in head]
    unexpected = [k for k in init.state_dict if k not in expected]
    if wrong or missing or unexpected:
        parts = wrong[:2]
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise BundleError(f"the weights from {init.source} do not fit {arch}: {'; '.join(parts)}")
    model.load_state_dict(init.state_dict, strict=False)
    return model
