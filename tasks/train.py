"""Train the segmentation model on packed shards, tracked in MLflow.

One training is identified by a fingerprint of everything that shapes it (train
config, classes, shard list and content digest, start weights). Its files live in
``<run dir>/train/<fingerprint>/``: Lightning checkpoints (``checkpoints/last.ckpt``
is the resume point after a failure, ``best.ckpt`` the best val IoU),
``state.json`` (the MLflow run id, so a resumed training logs into the same run),
``model.pt`` (the best weights in the portable format of
:mod:`mapgap.models.inference`) and ``result.json`` (written last: a finished
training is never redone).

MLflow (see :mod:`mapgap.tracking`): the whole config as flattened params,
metrics per epoch, preview images per epoch (key ``preview``), the best
checkpoint as artifact ``checkpoint/model.pt``, and the model logged with
``mlflow.pytorch.log_model`` and registered under ``"-".join(classes)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from mapgap import storage, tracking
from mapgap.layout import RunLayout
from mapgap.models.datamodule import ShardDataModule
from mapgap.models.inference import MODEL_FILE, load_model, read_checkpoint
from mapgap.models.module import SegmentationModule
from mapgap.models.segmentation import SegmentationModel, checkpoint_dict
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.shards import trained_classes

MONITOR = "val/iou"


class TrainingError(RuntimeError):
    """Training could not produce a model (one line saying why)."""


def fingerprint(cfg: Any, classes: Sequence[str], train_shards: Sequence[str],
                val_shards: Sequence[str], data_digest: str, init_from: str | None,
                epochs: int) -> str:
    key = {
        "train": cfg.train.model_dump(mode="json", exclude={"tracking_uri", "experiment"}),
        "classes": list(classes), "tile_size": cfg.tile_size, "epochs": epochs,
        "train_shards": list(train_shards), "val_shards": list(val_shards),
        "data": data_digest, "init_from": init_from,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(cfg: Any, train_shards: Sequence[str], val_shards: Sequence[str],
             data_digest: str = "", init_from: str | None = None,
             epochs: int | None = None) -> str:
    """``<run dir>/train/<fingerprint>``: one training's checkpoints and results."""
    key = fingerprint(cfg, trained_classes(cfg), train_shards, val_shards, data_digest,
                      init_from, epochs or cfg.train.epochs)
    return storage.join(RunLayout(cfg.run_uri).train, key)


def result_uri(cfg: Any, train_shards: Sequence[str], val_shards: Sequence[str],
               data_digest: str = "", init_from: str | None = None,
               epochs: int | None = None) -> str:
    """Written last by a finished training."""
    return storage.join(work_dir(cfg, train_shards, val_shards, data_digest, init_from, epochs),
                        "result.json")


class EpochLog(Callback):
    """One line per epoch in the Prefect run log (the UI shows progress)."""

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        shown = " ".join(f"{k} {float(m[k]):.4f}" for k in ("train/loss", "val/loss", MONITOR)
                         if k in m)
        get_logger().info("epoch %d/%d %s", trainer.current_epoch + 1, trainer.max_epochs, shown)


def _check_sizes(cfg: Any) -> None:
    multiple = 2**cfg.train.depth
    for name, size in (("train.crop_size", cfg.train.crop_size), ("tile_size", cfg.tile_size)):
        if size is not None and size % multiple:
            raise TrainingError(f"{name} {size} must be a multiple of 2**train.depth = {multiple}")


def _trainer(cfg: Any, epochs: int, ckpt_dir: str, logger: MLFlowLogger,
             callbacks: Sequence[Callback]) -> tuple[L.Trainer, ModelCheckpoint]:
    t = cfg.train
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="max",
                           save_top_k=1, save_last=True, enable_version_counter=False)
    trainer = L.Trainer(
        accelerator={"cpu": "cpu", "cuda": "gpu"}.get(t.device, "auto"),
        devices=1,
        max_epochs=epochs,
        limit_train_batches=t.steps_per_epoch,
        limit_val_batches=t.val_batches or 1.0,
        max_time=timedelta(minutes=t.max_minutes) if t.max_minutes else None,
        logger=logger,
        callbacks=[best, LearningRateMonitor("epoch"), EpochLog(), *callbacks],
        log_every_n_steps=max(1, min(10, t.steps_per_epoch)),
        num_sanity_val_steps=0,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        default_root_dir=None if storage.is_remote(ckpt_dir) else ckpt_dir,
    )
    return trainer, best


def best_val_metrics(uri: str, run_id: str) -> dict[str, float]:
    """All val metrics of the epoch with the best val IoU (from MLflow's history,
    so epochs logged before a resume count too)."""
    c = tracking.client(uri)
    history = c.get_metric_history(run_id, MONITOR)
    if not history:
        raise TrainingError(f"MLflow run {run_id}: no {MONITOR} logged (training stopped "
                            "before the first validation?)")
    step = max(history, key=lambda m: (m.value, -m.step)).step
    out = {}
    for key in c.get_run(run_id).data.metrics:
        if key.startswith("val/"):
            at = [m.value for m in c.get_metric_history(run_id, key) if m.step == step]
            if at:
                out[key] = at[-1]
    return out


def register_model(cfg: Any, run_id: str, model: SegmentationModel, model_file: Path,
                   val_iou: float, promote: bool = True) -> dict[str, Any]:
    """``mlflow.pytorch.log_model`` (pt2, no pickle) with the portable checkpoint as
    extra file; registered under the class names; candidate/champion aliases unless
    ``promote`` is False (the version is still tagged with its val IoU)."""
    import mlflow

    uri = tracking.tracking_uri(cfg)
    name = tracking.model_name(model.classes)
    size = max(64, 2 * model.multiple)
    with tracking.active_tracking(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model.cpu().eval(), name="model", registered_model_name=name,
            serialization_format="pt2",
            input_example=np.zeros((1, 3, size, size), np.float32),
            extra_files=[str(model_file)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version = str(info.registered_model_version)
    c = tracking.client(uri)
    if promote:
        aliases = tracking.promote(c, name, version, val_iou)
    else:
        c.set_model_version_tag(name, version, tracking.METRIC_TAG, f"{val_iou:.6f}")
        aliases = []
    return {"registered_model": name, "version": version, "aliases": aliases,
            "model_uri": f"models:/{name}/{version}", "logged_model_uri": info.model_uri}


def _start_run(cfg: Any, work: str, run_name: str, tags: dict[str, str],
               extra_params: dict[str, str]) -> MLFlowLogger:
    """The MLflow logger; a resumed training continues its earlier run."""
    state_uri = storage.join(work, "state.json")
    run_id = storage.read_json(state_uri)["run_id"] if storage.exists(state_uri) else None
    tracking.ensure_experiment(cfg)
    logger = MLFlowLogger(
        experiment_name=tracking.experiment_name(cfg), run_name=run_name,
        tracking_uri=tracking.tracking_uri(cfg), tags=tags, run_id=run_id,
        artifact_location=tracking.artifact_location(cfg),
    )
    if run_id is None:
        logger.log_hyperparams({**tracking.flat_params(cfg), **extra_params})
        storage.write_json(state_uri, {"run_id": logger.run_id})
    return logger


def train_model(cfg: Any, train_shards: Sequence[str], val_shards: Sequence[str], *,
                data_digest: str = "", init_from: str | None = None,
                epochs: int | None = None, run_name: str | None = None,
                tags: dict[str, str] | None = None, promote: bool = True,
                callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) one training.

    ``init_from``: a model spec (see ``load_model``) to fine-tune from, e.g. for
    hard-negative mining rounds; ``epochs`` overrides ``train.epochs``;
    ``promote=False`` registers the model without candidate/champion aliases (a
    caller that picks among several models promotes its choice itself).
    Returns run id, model URI, aliases, best val metrics and checkpoint URI.
    """
    t0 = time.monotonic()
    log = get_logger()
    t = cfg.train
    classes = trained_classes(cfg)
    epochs = epochs or t.epochs
    _check_sizes(cfg)
    work = work_dir(cfg, train_shards, val_shards, data_digest, init_from, epochs)
    key = work.rsplit("/", 1)[-1]
    done = storage.join(work, "result.json")
    if storage.exists(done):
        log.info("training %s already finished: %s", key, done)
        return storage.read_json(done)

    L.seed_everything(t.seed, workers=True, verbose=False)
    dm = ShardDataModule.from_config(cfg, train_shards, val_shards)
    module = SegmentationModule(classes, width=t.width, depth=t.depth, norm=t.norm,
                                loss=t.loss, lr=t.lr, weight_decay=t.weight_decay,
                                lr_schedule=t.lr_schedule,
                                total_steps=epochs * t.steps_per_epoch)
    if init_from:
        start = load_model(init_from, tracking.tracking_uri(cfg))
        try:
            module.model.load_state_dict(start.state_dict())
        except RuntimeError:
            raise TrainingError(f"{init_from}: its architecture ({start.hparams}) does not "
                                "match train.width/depth/norm/loss") from None
    module.preview = dm.preview_batch()

    name = tracking.model_name(classes)
    logger = _start_run(cfg, work, run_name or f"train-{name}",
                        {"mapgap.fingerprint": key, **(tags or {})},
                        {"data.train_shards": str(len(train_shards)),
                         "data.val_shards": str(len(val_shards)), "data.digest": data_digest,
                         "train.init_from": str(init_from), "train.epochs_run": str(epochs)})
    ckpt_dir = storage.join(work, "checkpoints")
    last = storage.join(ckpt_dir, "last.ckpt")
    resume = last if storage.exists(last) else None
    if resume:
        log.info("resuming training %s from %s", key, resume)
    trainer, best = _trainer(cfg, epochs, ckpt_dir, logger, callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)

    run_id = logger.run_id
    uri = tracking.tracking_uri(cfg)
    metrics = best_val_metrics(uri, run_id)
    model = read_checkpoint(best.best_model_path or storage.join(ckpt_dir, "best.ckpt"))
    with tempfile.TemporaryDirectory(prefix="mapgap-train-") as tmp:
        model_file = Path(tmp, MODEL_FILE)
        buf = io.BytesIO()
        torch.save(checkpoint_dict(model, metrics=metrics, run_id=run_id), buf)
        model_file.write_bytes(buf.getvalue())
        checkpoint_uri = storage.write_bytes(storage.join(work, MODEL_FILE), buf.getvalue())
        tracking.client(uri).log_artifact(run_id, str(model_file), "checkpoint")
        registered = register_model(cfg, run_id, model, model_file, metrics[MONITOR], promote)
    result = {
        "run_id": run_id,
        "experiment": tracking.experiment_name(cfg),
        "tracking_uri": uri,
        **registered,
        "val_metrics": metrics,
        "checkpoint_uri": checkpoint_uri,
        "epochs": trainer.current_epoch,
        "resumed": resume is not None,
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    storage.write_json(done, result)
    log.info("trained %s: val IoU %.3f, %s (%s)", name, metrics[MONITOR], result["model_uri"],
             ", ".join(registered["aliases"]))
    return result


@stage_task(name="train")
def train_task(cfg: Any, train_shards: list[str], val_shards: list[str],
               data_digest: str) -> dict[str, Any]:
    return train_model(cfg, train_shards, val_shards, data_digest=data_digest)
