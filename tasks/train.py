"""Train the segmentation model on packed shards, tracked in MLflow.

One training is identified by a fingerprint of everything that shapes it (train
config, classes, shard list and content digest, start weights). Its files live in
``<run dir>/train/<fingerprint>/``: Lightning checkpoints (``checkpoints/last.ckpt``
is the resume point after a failure, ``best.ckpt`` the best epoch by
``train.select_by``), ``state.json`` (the MLflow run id, so a resumed training logs
into the same run), ``model.pt`` (the best weights in the portable format of
:mod:`mapgap.models.inference`, with the calibration) and ``result.json`` (written
last: a finished training is never redone).

Models are chosen by what mappers get: each validation epoch polygonizes a fixed
sample of val tiles exactly as predict does and scores objects at IoU 0.5
(``val/object_f1``); pixel metrics are computed on a fixed sample of val batches.
After training, the probability threshold and minimum area that maximise val
object F1 are chosen and scores are mapped to calibrated confidence (the val
precision at that score); predict uses them unless the config overrides them.

MLflow (see :mod:`mapgap.tracking`): the whole config as flattened params,
metrics per epoch, preview images per epoch (key ``preview``), the calibration,
the best checkpoint as artifact ``checkpoint/model.pt``, and the model logged with
``mlflow.pytorch.log_model`` and registered under ``"-".join(classes)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from mapgap import grid, storage, tracking
from mapgap.conf.schema import PipelineConfig
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.models.datamodule import ShardDataModule
from mapgap.models.inference import MODEL_FILE, load_model, read_checkpoint
from mapgap.models.module import SegmentationModule
from mapgap.models.precision import lightning_precision
from mapgap.models.segmentation import SegmentationModel, checkpoint_dict
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.objectval import ObjectF1Callback, calibrate, val_truth, vector_settings
from mapgap.tasks.predict import PredictSettings
from mapgap.tasks.shards import shard_keys, trained_classes

PIXEL_METRIC = "val/iou"
OBJECT_METRIC = "val/object_f1"


def selection_metric(cfg: PipelineConfig, objects: bool = True) -> str:
    """The val metric that picks the best epoch, mining's choice and the champion
    (pixel IoU when object validation cannot run: no harvested labels)."""
    return OBJECT_METRIC if cfg.train.select_by == "object_f1" and objects else PIXEL_METRIC


class TrainingError(RuntimeError):
    """Training could not produce a model (one line saying why)."""


def fingerprint(cfg: PipelineConfig, classes: Sequence[str], train_shards: Sequence[str],
                val_shards: Sequence[str], data_digest: str, init_from: str | None,
                epochs: int) -> str:
    key = {
        "train": cfg.train.model_dump(mode="json", exclude={"tracking_uri", "experiment"}),
        "classes": list(classes), "tile_size": cfg.tile_size, "epochs": epochs,
        "instances": instance_model(cfg, classes),
        "train_shards": list(train_shards), "val_shards": list(val_shards),
        "data": data_digest, "init_from": init_from,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(cfg: PipelineConfig, train_shards: Sequence[str], val_shards: Sequence[str],
             data_digest: str = "", init_from: str | None = None,
             epochs: int | None = None) -> str:
    """``<run dir>/train/<fingerprint>``: one training's checkpoints and results."""
    key = fingerprint(cfg, trained_classes(cfg), train_shards, val_shards, data_digest,
                      init_from, epochs or cfg.train.epochs)
    return storage.join(RunLayout(cfg.run_uri).train, key)


def result_uri(cfg: PipelineConfig, train_shards: Sequence[str], val_shards: Sequence[str],
               data_digest: str = "", init_from: str | None = None,
               epochs: int | None = None) -> str:
    """Written last by a finished training."""
    return storage.join(work_dir(cfg, train_shards, val_shards, data_digest, init_from, epochs),
                        "result.json")


def instance_model(cfg: PipelineConfig, classes: Sequence[str]) -> bool:
    """Whether the model learns the instance-distance band (a trained class has
    ``separate_instances``)."""
    return any(cfg.class_named(c).separate_instances for c in classes)


class EpochLog(Callback):
    """One line per epoch in the Prefect run log (the UI shows progress): the
    epoch's mean training loss and the val metrics of the same epoch, written once
    validation is complete (callback metrics included)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        shown = [f"train/loss {np.mean(self.losses):.4f}"] if self.losses else []
        shown += [f"{k} {float(m[k]):.4f}" for k in ("val/loss", PIXEL_METRIC, OBJECT_METRIC)
                  if k in m]
        self.losses = []
        get_logger().info("epoch %d/%d %s", trainer.current_epoch + 1, trainer.max_epochs,
                          " ".join(shown))


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's tips (litlogger, litmodels), device banners and the deprecation
    warnings of its dependencies flood every run's log: EpochLog says what matters.
    Warnings about mapgap's own settings (e.g. few loader workers) stay."""
    # pytorch_lightning too: once something imports that twin package, it names the
    # rank-zero logger that both packages share.
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric",
                                              "pytorch_lightning", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            # mapgap's design, not a mistake: the module converts batches after transfer,
            # and a resumed training writes into its own checkpoint folder.
            warnings.filterwarnings("ignore", message=".*on_after_batch_transfer")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_sizes(cfg: PipelineConfig, multiple: int) -> None:
    for name, size in (("train.crop_size", cfg.train.crop_size), ("tile_size", cfg.tile_size)):
        if size is not None and size % multiple:
            raise TrainingError(f"{name} {size} must be a multiple of {multiple} (the model's "
                                "input multiple: 2**train.depth, or 32 for pretrained encoders)")


def _trainer(cfg: PipelineConfig, epochs: int, ckpt_dir: str, logger: MLFlowLogger,
             callbacks: Sequence[Callback], metric: str) -> tuple[L.Trainer, ModelCheckpoint]:
    t = cfg.train
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=metric,
                           mode="max", save_top_k=1, save_last=True,
                           enable_version_counter=False)
    trainer = L.Trainer(
        accelerator={"cpu": "cpu", "cuda": "gpu"}.get(t.device, "auto"),
        devices=1,
        precision=lightning_precision(t.device),
        max_epochs=epochs,
        limit_train_batches=t.steps_per_epoch,
        limit_val_batches=t.val_batches or 1.0,
        max_time=timedelta(minutes=t.max_minutes) if t.max_minutes else None,
        logger=logger,
        callbacks=[*callbacks, best, LearningRateMonitor("epoch"), EpochLog()],
        log_every_n_steps=max(1, min(10, t.steps_per_epoch)),
        num_sanity_val_steps=0,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        default_root_dir=None if storage.is_remote(ckpt_dir) else ckpt_dir,
    )
    return trainer, best


def best_val_metrics(uri: str, run_id: str, metric: str) -> dict[str, float]:
    """All val metrics of the epoch with the best ``metric`` (from MLflow's history,
    so epochs logged before a resume count too)."""
    c = tracking.client(uri)
    history = c.get_metric_history(run_id, metric)
    if not history:
        raise TrainingError(f"MLflow run {run_id}: no {metric} logged (training stopped "
                            "before the first validation?)")
    step = max(history, key=lambda m: (m.value, -m.step)).step
    out = {}
    for key in c.get_run(run_id).data.metrics:
        if key.startswith("val/"):
            at = [m.value for m in c.get_metric_history(run_id, key) if m.step == step]
            if at:
                out[key] = at[-1]
    return out


def register_model(cfg: PipelineConfig, run_id: str, model: SegmentationModel,
                   model_file: Path, score: float, promote: bool = True) -> dict[str, Any]:
    """``mlflow.pytorch.log_model`` (pt2, no pickle) with the portable checkpoint as
    extra file; registered under the class names; candidate/champion aliases by
    ``score`` (the selection metric) unless ``promote`` is False (the version is
    still tagged with it)."""
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
        aliases = tracking.promote(c, name, version, score)
    else:
        c.set_model_version_tag(name, version, tracking.METRIC_TAG, f"{score:.6f}")
        aliases = []
    return {"registered_model": name, "version": version, "aliases": aliases,
            "model_uri": f"models:/{name}/{version}", "logged_model_uri": info.model_uri}


def _start_run(cfg: PipelineConfig, work: str, run_name: str, tags: dict[str, str],
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


def build_module(cfg: PipelineConfig, classes: list[str], epochs: int,
                 init_from: str | None) -> SegmentationModule:
    """The LightningModule of ``train``; a fine-tune (``init_from``) starts from that
    model's weights and architecture, with its encoder never frozen."""
    t = cfg.train
    scratch = t.architecture == "scratch"
    model = {"classes": classes, "arch": t.architecture, "encoder": None if scratch else t.encoder,
             "width": t.width, "depth": t.depth, "norm": t.norm,
             "instances": instance_model(cfg, classes)}
    module = SegmentationModule(
        model, encoder_weights="none" if scratch or init_from else t.encoder_weights,
        loss=t.loss, lr=t.lr, weight_decay=t.weight_decay, lr_schedule=t.lr_schedule,
        total_steps=epochs * t.steps_per_epoch, encoder_lr_factor=t.encoder_lr_factor,
        freeze_encoder_epochs=0 if init_from else t.freeze_encoder_epochs,
        distance_loss_weight=t.distance_loss_weight,
        time_budget_s=t.max_minutes * 60 if t.max_minutes else None)
    if init_from:
        start = load_model(init_from, tracking.tracking_uri(cfg))
        try:
            module.model.load_state_dict(start.state_dict())
        except RuntimeError:
            raise TrainingError(f"{init_from}: its architecture ({start.hparams}) does not "
                                "match the train config") from None
    return module


def val_tiles(layout: RunLayout, val_shards: Sequence[str], limit: int) -> list[Tile]:
    """A fixed sample of val tiles for object validation: whole val blocks (the
    split's parent tiles), in a stable order, until ``limit`` tiles."""
    block_zoom = storage.read_json(layout.manifest)["block_zoom"]
    tiles = [grid.parse_tile_key(k) for k in shard_keys(val_shards)]
    tiles.sort(key=lambda t: (grid.tile_key(grid.parent(t, block_zoom)), t.y, t.x))
    return tiles[:limit]


def object_validation(cfg: PipelineConfig, classes: list[str], val_shards: Sequence[str],
                      bands: list[str]) -> ObjectF1Callback | None:
    """The callback that polygonizes the val sample each epoch as predict would, or
    None (with a warning) when the run has no harvested labels to score against,
    e.g. shards packed from masks made elsewhere."""
    layout = RunLayout(cfg.run_uri)
    missing = [c for c in classes if not storage.exists(layout.labels(c))]
    if missing:
        get_logger().warning("no object validation: %s not found (no harvested labels); "
                             "models are chosen by pixel IoU", layout.labels(missing[0]))
        return None
    tiles = val_tiles(layout, val_shards, cfg.train.object_val_tiles)
    vector = vector_settings(cfg, classes, bands)
    truth = val_truth(layout, classes, tiles, vector.min_area_m2)
    return ObjectF1Callback(layout, tiles, truth, vector, PredictSettings.from_config(cfg))


def train_model(cfg: PipelineConfig, train_shards: Sequence[str], val_shards: Sequence[str], *,
                data_digest: str = "", init_from: str | None = None,
                epochs: int | None = None, run_name: str | None = None,
                tags: dict[str, str] | None = None, promote: bool = True,
                callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) one training.

    ``init_from``: a model spec (see ``load_model``) to fine-tune from, e.g. for
    hard-negative mining rounds; ``epochs`` overrides ``train.epochs``;
    ``promote=False`` registers the model without candidate/champion aliases (a
    caller that picks among several models promotes its choice itself).
    Returns run id, model URI, aliases, best val metrics, calibration and checkpoint URI.
    """
    t0 = time.monotonic()
    log = get_logger()
    t = cfg.train
    classes = trained_classes(cfg)
    epochs = epochs or t.epochs
    work = work_dir(cfg, train_shards, val_shards, data_digest, init_from, epochs)
    key = work.rsplit("/", 1)[-1]
    done = storage.join(work, "result.json")
    if storage.exists(done):
        log.info("training %s already finished: %s", key, done)
        return storage.read_json(done)

    torch.set_num_threads(t.threads)
    L.seed_everything(t.seed, workers=True, verbose=False)
    dm = ShardDataModule.from_config(cfg, train_shards, val_shards)
    module = build_module(cfg, classes, epochs, init_from)
    _check_sizes(cfg, module.model.multiple)
    module.preview = dm.preview_batch()
    judge = object_validation(cfg, classes, val_shards, module.model.band_names)
    metric = selection_metric(cfg, judge is not None)
    if t.val_batches:
        log.info("validating on a fixed sample: the first %d val batches and %d val tiles "
                 "(train.val_batches, train.object_val_tiles)", t.val_batches,
                 len(judge.tiles) if judge else 0)

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
    with quiet_lightning():
        trainer, best = _trainer(cfg, epochs, ckpt_dir, logger,
                                 [*([judge] if judge else []), *callbacks], metric)
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)

    run_id = logger.run_id
    uri = tracking.tracking_uri(cfg)
    metrics = best_val_metrics(uri, run_id, metric)
    model = read_checkpoint(best.best_model_path or storage.join(ckpt_dir, "best.ckpt"))
    calibration = calibrate(judge.layout, judge.tiles, model, judge.truth, judge.vector,
                            judge.settings) if t.calibrate and judge else None
    if calibration is not None:
        tracking.client(uri).log_dict(run_id, calibration.to_dict(), "calibration.json")
    with tempfile.TemporaryDirectory(prefix="mapgap-train-") as tmp:
        model_file = Path(tmp, MODEL_FILE)
        buf = io.BytesIO()
        torch.save(checkpoint_dict(model, metrics=metrics, run_id=run_id,
                                   calibration=calibration and calibration.to_dict()), buf)
        model_file.write_bytes(buf.getvalue())
        checkpoint_uri = storage.write_bytes(storage.join(work, MODEL_FILE), buf.getvalue())
        tracking.client(uri).log_artifact(run_id, str(model_file), "checkpoint")
        registered = register_model(cfg, run_id, model, model_file, metrics[metric], promote)
    result = {
        "run_id": run_id,
        "experiment": tracking.experiment_name(cfg),
        "tracking_uri": uri,
        **registered,
        "val_metrics": metrics,
        "selected_by": metric,
        "calibration": calibration and calibration.to_dict(),
        "checkpoint_uri": checkpoint_uri,
        "epochs": trainer.current_epoch,
        "resumed": resume is not None,
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    storage.write_json(done, result)
    log.info("trained %s: val %s %.3f, pixel IoU %.3f, %s (%s)", name, metric, metrics[metric],
             metrics.get(PIXEL_METRIC, float("nan")), result["model_uri"],
             ", ".join(registered["aliases"]))
    return result


@stage_task(name="train")
def train_task(cfg: PipelineConfig, train_shards: list[str], val_shards: list[str],
               data_digest: str) -> dict[str, Any]:
    return train_model(cfg, train_shards, val_shards, data_digest=data_digest)
