"""The LightningModule: losses, optimiser and schedule, per-class validation
metrics and the preview images logged to MLflow each epoch.

Metrics (torchmetrics, accumulated over the validation sample, ignore pixels
excluded): ``val/iou_<class>``, ``val/f1_<class>``, ``val/precision_<class>``,
``val/recall_<class>``, their mean over classes ``val/iou``, ``val/loss``,
``train/loss`` (per epoch), ``train/loss_step`` and the corrupt samples skipped.
Object-level metrics (``val/object_f1``, what checkpoints are chosen by) come from
a callback that polygonizes the val tiles as predict does (see
:mod:`mapgap.tasks.objectval`).

Fine-tuning a pretrained encoder on a small data set (the usual case: a few
hundred tiles of one town) follows the recipe that keeps what pretraining
learned: the encoder is frozen for the first ``freeze_encoder_epochs`` while the
new decoder learns, then trains at ``lr * encoder_lr_factor``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassPrecision,
    MulticlassRecall,
)

from mapgap.models.encoders import build_model
from mapgap.models.losses import IGNORE, loss_for

# Overlay colours per class index (0 = background is not drawn).
PALETTE = np.array([[0, 0, 0], [255, 40, 40], [40, 120, 255], [255, 200, 0], [0, 220, 120],
                    [200, 60, 255], [255, 120, 0], [0, 230, 230]], np.uint8)
WARMUP = 0.15  # share of the schedule spent warming up (as one-cycle's pct_start)


def model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB batch -> the model's float input in 0..1 (one vectorised op per batch)."""
    return images.float().div_(255)


def labels_from_logits(logits: torch.Tensor, activation: str,
                       threshold: float = 0.5) -> torch.Tensor:
    """[B,C(+1),H,W] class logits -> [B,H,W] label map (0 background, c+1 class c)."""
    if activation == "softmax":
        return logits.argmax(dim=1)
    probs = logits.sigmoid()
    best, idx = probs.max(dim=1)
    return torch.where(best > threshold, idx + 1, torch.zeros_like(idx))


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 with classes tinted in; ignore pixels greyed."""
    out = image.astype(np.float32)
    fg = (labels > 0) & (labels != IGNORE)
    colours = PALETTE[np.clip(labels, 0, len(PALETTE) - 1)].astype(np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    out[labels == IGNORE] = 0.5 * out[labels == IGNORE] + 64
    return out.clip(0, 255).astype(np.uint8)


def preview_grid(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> np.ndarray:
    """One row per sample: image | label overlay | prediction overlay."""
    rows = []
    for img, lab, pred in zip(images, labels, preds, strict=True):
        rgb = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        lab, pred = lab.cpu().numpy(), pred.cpu().numpy()
        rows.append(np.concatenate([rgb, overlay(rgb, lab), overlay(rgb, pred)], axis=1))
    return np.concatenate(rows, axis=0)


def distance_loss(logit: torch.Tensor, distance: torch.Tensor,
                  masks: torch.Tensor) -> torch.Tensor:
    """BCE of the instance-distance band against the harvested distance (uint8,
    1..255, 0 = no target), where the mask is not ignored: outside complete areas
    the distance of unmapped buildings is unknown."""
    valid = ((distance > 0) & (masks != IGNORE)).float()
    target = distance.float() / 255
    bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1)


def schedule_factor(progress: float) -> float:
    """One-cycle shape on progress 0..1: linear warm-up from 1/25 of the peak, then
    cosine annealing to 1/10^4 of it."""
    p = min(max(progress, 0.0), 1.0)
    if p < WARMUP:
        return 0.04 + 0.96 * p / WARMUP
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (p - WARMUP) / (1 - WARMUP)))


class SegmentationModule(L.LightningModule):
    """``model``: the keyword arguments of :func:`build_model` except the weights
    (classes, arch, encoder, width, depth, norm, instances); the built model's own
    hparams are saved as ``model_hparams`` so a Lightning checkpoint opens as a model."""

    def __init__(self, model: dict[str, Any], encoder_weights: str = "none",
                 loss: str = "bce_dice", lr: float = 2e-3, weight_decay: float = 1e-4,
                 lr_schedule: str = "onecycle", total_steps: int = 500,
                 encoder_lr_factor: float = 1.0, freeze_encoder_epochs: int = 0,
                 distance_loss_weight: float = 1.0, time_budget_s: float | None = None
                 ) -> None:
        super().__init__()
        self.loss_fn, activation = loss_for(loss)
        self.model = build_model(**model, activation=activation, encoder_weights=encoder_weights)
        # All JSON-able: a checkpoint loads weights-only.
        self.save_hyperparameters()
        self.hparams["model_hparams"] = dict(self.model.hparams)
        self.classes = list(self.model.classes)
        n = len(self.classes) + 1
        kw = {"num_classes": n, "average": None, "ignore_index": IGNORE}
        self.val_metrics = MetricCollection({
            "iou": MulticlassJaccardIndex(**kw),
            "f1": MulticlassF1Score(**kw),
            "precision": MulticlassPrecision(**kw),
            "recall": MulticlassRecall(**kw),
        })
        self.preview: tuple[torch.Tensor, torch.Tensor] | None = None
        self._started: float | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, masks, distance, skipped = batch
        return model_input(images), masks.long(), distance, skipped

    def losses(self, logits: torch.Tensor, masks: torch.Tensor,
               distance: torch.Tensor) -> torch.Tensor:
        """Class loss, plus the weighted distance loss when the model has that band."""
        classes, dist = self.model.split_logits(logits)
        loss = self.loss_fn(classes, masks)
        if dist is not None:
            loss = loss + self.hparams.distance_loss_weight * distance_loss(
                dist[:, 0], distance, masks)
        return loss

    def on_train_epoch_start(self) -> None:
        frozen = self.current_epoch < self.hparams.freeze_encoder_epochs
        for p in self.model.encoder_parameters():
            p.requires_grad_(not frozen)
        if self._started is None:
            self._started = time.monotonic()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, masks, distance, skipped = batch
        loss = self.losses(self.model.logits(images), masks, distance)
        n = images.shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/skipped_samples", skipped.float(), on_step=False, on_epoch=True,
                 reduce_fx="sum", batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, masks, distance, skipped = batch
        logits = self.model.logits(images)
        n = images.shape[0]
        self.log("val/loss", self.losses(logits, masks, distance), on_epoch=True, batch_size=n)
        self.log("val/skipped_samples", skipped.float(), on_epoch=True, reduce_fx="sum",
                 batch_size=n)
        self.val_metrics.update(self.predicted_labels(logits), masks)

    def predicted_labels(self, logits: torch.Tensor) -> torch.Tensor:
        return labels_from_logits(self.model.split_logits(logits)[0], self.model.activation)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, per_class in values.items():
            for i, cls in enumerate(self.classes):
                self.log(f"val/{name}_{cls}", per_class[i + 1])
        self.log("val/iou", values["iou"][1:].mean(), prog_bar=True)
        self.log_preview()

    def log_preview(self) -> None:
        """Image | label | prediction of the fixed preview tiles, as an MLflow image."""
        experiment = getattr(self.logger, "experiment", None)
        if self.preview is None or not hasattr(experiment, "log_image"):
            return
        images, labels = self.preview
        images, labels = model_input(images.to(self.device)), labels.to(self.device).long()
        with torch.no_grad():
            preds = self.predicted_labels(self.model.logits(images))
        experiment.log_image(self.logger.run_id, preview_grid(images, labels, preds),
                             key="preview", step=self.current_epoch)

    def progress(self, step: int) -> float:
        """How far training is: steps done, or the time budget spent if further."""
        hp = self.hparams
        done = step / max(hp.total_steps, 1)
        if hp.time_budget_s and self._started is not None:
            done = max(done, (time.monotonic() - self._started) / hp.time_budget_s)
        return done

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        encoder = self.model.encoder_parameters()
        ids = {id(p) for p in encoder}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        groups = [{"params": rest, "lr": hp.lr}]
        if encoder:
            groups.append({"params": encoder, "lr": hp.lr * hp.encoder_lr_factor})
        opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: schedule_factor(self.progress(step)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
