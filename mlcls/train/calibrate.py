"""Set a bundle's thresholds: recalibrated on labelled images, or given by the user.

Only `bundle.json` changes; the weights file is kept byte for byte (copied
when writing to another folder), so a float16 demo bundle stays float16.
The digest changes with the thresholds, because the labels a run writes
do: re-tagging with a recalibrated bundle re-tags.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mlcls.bundle import META_FILE, WEIGHTS_FILE, Bundle, bundle_from_meta, digest_of, load_bundle
from mlcls.errors import BundleError
from mlcls.storage import StorageOptions, describe_os_error, join, read_file, url_to_fs, write_atomic
from mlcls.train import metrics
from mlcls.train.scoring import Scored


def calibrated(scored: Scored, min_positives: int = metrics.MIN_POSITIVES_FOR_OWN_THRESHOLD,
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-class max-F1 thresholds on these images, shrunk toward the best global one (see `metrics`)."""
    return metrics.calibrate_thresholds(scored.scores, scored.targets, min_positives=min_positives)


def calibration_record(bundle: Bundle, scored: Scored, thresholds: np.ndarray, labels: str) -> dict[str, Any]:
    """What the new thresholds do on the calibration images, next to what the old ones did."""
    before = metrics.classification_metrics(scored.scores >= np.asarray(bundle.thresholds), scored.targets)
    after = metrics.classification_metrics(scored.scores >= thresholds, scored.targets)
    return {"labels": labels, "images": len(scored.scores),
            "mAP": metrics.mean_average_precision(scored.scores, scored.targets),
            "at_new_thresholds": after, "at_previous_thresholds": before,
            "at": datetime.now(UTC).isoformat(timespec="seconds")}


def write_thresholds(src: str, out: str | None, thresholds: np.ndarray, method: str,
                     info: dict[str, Any], storage_options: StorageOptions = None) -> Bundle:
    """Rewrite `bundle.json` of the bundle at `src` (into `out`, default in place) with new thresholds."""
    out = out or src
    try:
        fs, base = url_to_fs(src, storage_options)
        meta = json.loads(read_file(fs, join(base, META_FILE)))
        weights_name = meta.get("weights", WEIGHTS_FILE)
        weights = read_file(fs, join(base, weights_name))
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read bundle {src}: {describe_os_error(err)}") from err
    meta["thresholds"] = [float(t) for t in thresholds]
    meta["threshold_method"] = method
    meta["metrics"] = {**(meta.get("metrics") or {}), "thresholds": info}
    bundle_from_meta(meta, where=out)
    try:
        ofs, obase = url_to_fs(out, storage_options)
        if (ofs, obase) != (fs, base):
            write_atomic(ofs, join(obase, weights_name), weights)
        write_atomic(ofs, join(obase, META_FILE), (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as err:
        raise BundleError(f"cannot write bundle {out}: {describe_os_error(err)}") from err
    bundle = load_bundle(out, storage_options)
    assert bundle.digest == digest_of(meta, weights)
    return bundle
