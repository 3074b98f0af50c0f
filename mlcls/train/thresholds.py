"""How probabilities become labels, and how a user overrides a bundle's thresholds.

A bundle carries per-class thresholds (calibrated at training, or set by
`mlcls calibrate`); `mlcls tag` applies them. Evaluation and calibration
take the same overrides, so what one measures is what one then ships:

- one global value (`--threshold 0.4`);
- a per-class file (`--thresholds FILE`): a `.csv` with `name` (or
  `class`) and `threshold` columns, the format `mlcls bundle create
  --classes` reads, or a `.json` object `{"cat": 0.3, ...}`;
- top-k (`--top-k 3`): each image's k most probable classes. This is a rule
  for measuring; a bundle stores thresholds, and `mlcls tag --probs top-k:N`
  keeps each image's top N probabilities in the output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlcls.bundle import read_classes
from mlcls.errors import BundleError, OptionError
from mlcls.storage import StorageOptions, describe_os_error, read_bytes, url_to_fs
from mlcls.train.metrics import top_k_predictions


@dataclass(frozen=True)
class LabelRule:
    """Per-class thresholds (`thresholds`) or top-k (`top_k`), and a name for reports."""

    name: str
    thresholds: np.ndarray | None = None
    top_k: int | None = None

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Boolean (N, C) label sets for (N, C) probabilities."""
        if self.top_k is not None:
            return top_k_predictions(scores, self.top_k)
        assert self.thresholds is not None
        return scores >= self.thresholds


def override_rule(classes: Sequence[str], *, threshold: float | None = None, thresholds_file: str | None = None,
                  top_k: int | None = None, storage_options: StorageOptions = None) -> LabelRule | None:
    """The rule the user asked for instead of the bundle's thresholds, or None; checks before any work."""
    given = [x is not None for x in (threshold, thresholds_file, top_k)]
    if sum(given) > 1:
        raise OptionError("give one of --threshold, --thresholds and --top-k")
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise OptionError(f"--threshold must be between 0 and 1, not {threshold}")
        return LabelRule(f"threshold {threshold:g}", thresholds=np.full(len(classes), float(threshold)))
    if thresholds_file is not None:
        values = read_threshold_file(thresholds_file, classes, storage_options)
        return LabelRule(f"thresholds from {thresholds_file}", thresholds=values)
    if top_k is not None:
        if top_k < 1:
            raise OptionError(f"--top-k must be >= 1, not {top_k}")
        return LabelRule(f"top-{top_k}", top_k=top_k)
    return None


def read_threshold_file(path: str, classes: Sequence[str], storage_options: StorageOptions = None) -> np.ndarray:
    """One threshold per class, in `classes` order, from a `.csv` or `.json` file that names every class."""
    if path.lower().endswith(".json"):
        mapping = _read_json(path, storage_options)
    elif path.lower().endswith(".csv"):
        try:
            names, values = read_classes(path)
        except (BundleError, OSError, ValueError, KeyError) as err:
            raise OptionError(f"--thresholds {path}: {err}") from None
        if values is None:
            raise OptionError(f"--thresholds {path} has no 'threshold' column (columns: name, threshold)")
        mapping = dict(zip(names, values, strict=True))
    else:
        raise OptionError(f"--thresholds {path}: use a .csv (name,threshold) or a .json object")
    missing = [c for c in classes if c not in mapping]
    unknown = [c for c in mapping if c not in set(classes)]
    if missing or unknown:
        what = f"no threshold for {', '.join(missing[:5])}" if missing else f"unknown classes {', '.join(unknown[:5])}"
        raise OptionError(f"--thresholds {path}: {what}; give one threshold for each of the bundle's "
                          f"{len(classes)} classes")
    out = np.array([float(mapping[c]) for c in classes])
    if not ((out >= 0) & (out <= 1)).all():
        raise OptionError(f"--thresholds {path}: thresholds must be between 0 and 1")
    return out


def _read_json(path: str, storage_options: StorageOptions) -> dict[str, float]:
    try:
        fs, p = url_to_fs(path, storage_options)
        value = json.loads(read_bytes(fs, p))
    except FileNotFoundError:
        raise OptionError(f"--thresholds file not found: {path}") from None
    except OSError as err:
        raise OptionError(f"cannot read --thresholds {path}: {describe_os_error(err)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OptionError(f"--thresholds {path} is not valid JSON: {err}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise OptionError(f"--thresholds {path} must be a JSON object of class name to threshold")
    return {str(k): float(v) for k, v in value.items()}
