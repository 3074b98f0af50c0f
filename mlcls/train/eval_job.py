"""From a bundle and a labels file to a report or new thresholds: what `mlcls eval`,
`mlcls calibrate` and the `eval-bundle` flow run.

As in training, everything checkable is checked before any image is read:
the bundle, the override, the labels file and its classes, and that the
report folder can be written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mlcls.bundle import Bundle, load_bundle
from mlcls.errors import OptionError
from mlcls.storage import StorageOptions, check_folder
from mlcls.train.calibrate import calibrated, calibration_record, write_thresholds
from mlcls.train.eval_report import write_eval_report
from mlcls.train.labels import LabelsSpec
from mlcls.train.metrics import MIN_POSITIVES_FOR_OWN_THRESHOLD
from mlcls.train.scoring import Scored, missing_positive_classes, read_eval_labels, report_metrics, score_table
from mlcls.train.thresholds import override_rule

logger = logging.getLogger(__name__)


@dataclass
class Evaluated:
    """An evaluation: the metrics (as written to `metrics.json`) and the report files."""

    metrics: dict[str, Any]
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ScoreOptions:
    """How to run the bundle over the labelled images; plain values, so flows can pass them."""

    device: str = "auto"
    batch_size: int = 64
    workers: int = 8
    only_valid: bool = False


def eval_bundle(model: str, spec: LabelsSpec, *, report: str | None = None, threshold: float | None = None,
                thresholds_file: str | None = None, top_k: int | None = None,
                options: ScoreOptions = ScoreOptions(), storage_options: StorageOptions = None) -> Evaluated:
    """Measure the bundle at `model` on the images of `spec`; write the report to `report` if given."""
    bundle = load_bundle(model, storage_options)
    rule = override_rule(bundle.classes, threshold=threshold, thresholds_file=thresholds_file, top_k=top_k,
                         storage_options=storage_options)
    if report:
        check_folder(report, "--report", storage_options)
    scored = _score(bundle, spec, options, storage_options)
    result = report_metrics(bundle, scored, rule=rule, labels=spec.path)
    files = write_eval_report(report, result, scored, list(bundle.classes), bundle.thresholds,
                         storage_options) if report else []
    return Evaluated(metrics=result, files=files)


def calibrate_bundle(model: str, spec: LabelsSpec | None, *, out: str | None = None,
                     threshold: float | None = None, thresholds_file: str | None = None,
                     min_positives: int = MIN_POSITIVES_FOR_OWN_THRESHOLD, options: ScoreOptions = ScoreOptions(),
                     storage_options: StorageOptions = None) -> tuple[Bundle, Bundle]:
    """New thresholds for the bundle at `model`, written to `out` (default: in place); returns (before, after).

    With a labels file: per-class max-F1 thresholds on its images (classes
    with fewer than `min_positives` positives take the best global one).
    Without: the user's global value or per-class file.
    """
    if min_positives < 1:
        raise OptionError(f"--min-positives must be >= 1, not {min_positives}")
    bundle = load_bundle(model, storage_options)
    rule = override_rule(bundle.classes, threshold=threshold, thresholds_file=thresholds_file,
                         storage_options=storage_options)
    if (rule is None) == (spec is None):
        raise OptionError("give a labels file to recalibrate on, or --threshold / --thresholds, not both")
    if out:
        check_folder(out, "--out", storage_options)
    if rule is not None:
        assert rule.thresholds is not None
        method = "fixed" if threshold is not None else "per-class-file"
        info = {"method": method, "source": rule.name}
        return bundle, write_thresholds(model, out, rule.thresholds, method, info, storage_options)
    assert spec is not None
    scored = _score(bundle, spec, options, storage_options)
    thresholds, info = calibrated(scored, min_positives)
    info = {**info, "labels": spec.path, "images": len(scored.scores),
            "calibration": calibration_record(bundle, scored, thresholds, spec.path)}
    return bundle, write_thresholds(model, out, thresholds, info["method"], info, storage_options)


def _score(bundle: Bundle, spec: LabelsSpec, options: ScoreOptions, storage_options: StorageOptions) -> Scored:
    table = read_eval_labels(spec, bundle.classes, only_valid=options.only_valid, storage_options=storage_options)
    scored = score_table(bundle, table, device=options.device, batch_size=options.batch_size,
                         workers=options.workers, storage_options=storage_options)
    missing = missing_positive_classes(scored, bundle.classes)
    if missing:
        logger.warning("%d classes have no positive image in %s: no AP (left out of mAP), and a global threshold "
                       "if calibrating: %s", len(missing), spec.path, ", ".join(missing[:10]))
    return scored
