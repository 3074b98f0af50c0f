"""The `train-bundle` and `eval-bundle` flows: scheduled retraining and evaluation.

Thin, like `flows/tag.py`: each flow runs one task that calls the library
(`mlcls.train.train_job`, `mlcls.train.eval_job`) and returns a small summary; Prefect
adds parameters, retries, logs and an artifact. A retried training task
resumes from the checkpoint the failed attempt left in the bundle folder,
so a lost worker costs at most one epoch. The library's own log records
(checks, one line per epoch, warnings) reach the run's logs through
`flows.logs.route_library_logs`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from flows.logs import route_library_logs
from mlcls.errors import MlclsError
from mlcls.train.eval_job import ScoreOptions, eval_bundle
from mlcls.train.eval_report import json_safe
from mlcls.train.input_size import InputChoice
from mlcls.train.labels import LabelsSpec
from mlcls.train.train_job import has_checkpoint, train_from_labels
from mlcls.train.trainer import TrainConfig

TRAIN_ARTIFACT = "train-bundle-metrics"
EVAL_ARTIFACT = "eval-bundle-metrics"
METRIC_KEYS = ("CF1", "OF1", "macro_f1", "hamming_loss", "subset_accuracy", "empty_fpr")


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """A bad labels file or option fails the same way twice: retry only other failures (a lost worker, I/O)."""
    return not isinstance(getattr(state, "data", None), MlclsError)


@task(name="train", cache_policy=NONE, retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error)
def train_task(spec: LabelsSpec, out: str, cfg: dict[str, Any], pre: dict[str, Any], weights: str | None,
               classes: list[str] | None, name: str | None, storage_options: dict[str, Any] | None,
               ) -> dict[str, Any]:
    """Train and write the bundle; a retry resumes from the checkpoint of the failed attempt."""
    resume = task_run.get_run_count() > 1 and has_checkpoint(out, storage_options)
    trained = train_from_labels(spec, out, cfg=TrainConfig.from_dict(cfg), pre=InputChoice(**pre).check(),
                                classes=classes, weights=weights, name=name, resume=resume,
                                storage_options=storage_options)
    v = trained.bundle.metrics["validation"]
    return json_safe({"bundle": out, "model": trained.bundle.model_id, "train_images": trained.train_images,
            "val_images": trained.val_images, "best_epoch": trained.result.best_epoch,
            "seconds": round(trained.result.seconds, 1), "val_mAP": v["mAP"],
            "val_macro_f1": v["at_thresholds"]["macro_f1"], "val_macro_f1_at_0.5": v["at_0.5"]["macro_f1"],
            "val_hamming_loss": v["at_thresholds"]["hamming_loss"]})


@flow(name="train-bundle", log_prints=False)
def train_bundle(labels: str, out: str, images: str | None = None, arch: str = "resnet50",
                 weights: str | None = "auto", epochs: int | None = None, freeze_epochs: int | None = 0,
                 batch_size: int = 64, lr: float = 1e-3, loss: str = "bce", pos_weight: bool = False,
                 hflip: bool = False, size: int | None = None, resize_mode: str | None = None,
                 resize_size: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                 device: str = "auto", classes: list[str] | None = None, name: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune `arch` on the labels file and write a bundle with calibrated thresholds to `out`.

    `freeze_epochs=None`, which deployments made before it defaulted to 0 may pass, trains with none frozen
    (`TrainConfig` reads it as 0).
    """
    route_library_logs()
    cfg = TrainConfig(arch=arch, epochs=epochs, freeze_epochs=freeze_epochs, batch_size=batch_size, lr=lr,
                      loss=loss, pos_weight=pos_weight, hflip=hflip, seed=seed, device=device).validate()
    pre = InputChoice.of(size, resize_mode, resize_size)  # as `mlcls train`
    spec = LabelsSpec(path=labels, images=images, val_fraction=val_fraction, seed=seed)
    summary = train_task(spec, out, cfg.to_dict(), asdict(pre), weights, classes, name, storage_options)
    create_table_artifact(key=TRAIN_ARTIFACT, table=[{"item": k, "value": v} for k, v in summary.items()],
                          description=f"`{summary['model']}` trained on `{labels}`")
    return summary


@task(name="eval", cache_policy=NONE, retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error)
def eval_task(model: str, spec: LabelsSpec, report: str | None, threshold: float | None,
              thresholds_file: str | None, top_k: int | None, options: ScoreOptions,
              storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Measure the bundle and write the report; returns the headline metrics."""
    logger = get_run_logger()
    evaluated = eval_bundle(model, spec, report=report, threshold=threshold, thresholds_file=thresholds_file,
                            top_k=top_k, options=options, storage_options=storage_options)
    m = evaluated.metrics
    logger.info("%s on %d images: mAP %.4f, macro-F1 %.4f at the bundle's thresholds", m["model"], m["images"],
                m["mAP"], m["at_thresholds"]["macro_f1"])
    headline = {"model": m["model"], "images": m["images"], "mAP": m["mAP"], "files": evaluated.files}
    for rule in ("at_thresholds", "at_0.5", "at_top3", "override"):
        if rule in m:
            headline[rule] = {k: m[rule][k] for k in METRIC_KEYS}
    return json_safe(headline)


@flow(name="eval-bundle", log_prints=False)
def eval_bundle_flow(model: str, labels: str, images: str | None = None, report: str | None = None,
                     threshold: float | None = None, thresholds_file: str | None = None, top_k: int | None = None,
                     only_valid: bool = False, device: str = "auto", batch_size: int = 64,
                     storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure the bundle at `model` on a labels file; write metrics JSON and the HTML report to `report`."""
    route_library_logs()
    spec = LabelsSpec(path=labels, images=images)
    options = ScoreOptions(device=device, batch_size=batch_size, only_valid=only_valid)
    headline = eval_task(model, spec, report, threshold, thresholds_file, top_k, options, storage_options)
    rows = [{"labels by": rule, **headline[rule]} for rule in ("at_thresholds", "at_0.5", "at_top3", "override")
            if rule in headline]
    create_table_artifact(key=EVAL_ARTIFACT, table=rows,
                          description=f"`{headline['model']}` on `{labels}`: mAP {headline['mAP']:.4f}")
    if headline["files"]:
        create_markdown_artifact(key=f"{EVAL_ARTIFACT}-report",
                                 markdown="Report files:\n\n" + "\n".join(f"- `{f}`" for f in headline["files"]))
    return headline
