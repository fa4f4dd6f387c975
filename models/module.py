"""The LightningModule: loss, optimiser, per-class validation metrics and the
preview images logged to MLflow each epoch.

Metrics (torchmetrics, accumulated over the whole val set, ignore pixels
excluded): ``val/iou_<class>``, ``val/f1_<class>``, ``val/precision_<class>``,
``val/recall_<class>``, their mean over classes ``val/iou`` (checkpoint
selection and champion promotion), ``val/loss``, ``train/loss`` (per epoch),
``train/loss_step`` and the corrupt samples skipped.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassPrecision,
    MulticlassRecall,
)

from mapgap.models.losses import IGNORE, loss_for
from mapgap.models.segmentation import SegmentationModel

# Overlay colours per class index (0 = background is not drawn).
PALETTE = np.array([[0, 0, 0], [255, 40, 40], [40, 120, 255], [255, 200, 0], [0, 220, 120],
                    [200, 60, 255], [255, 120, 0], [0, 230, 230]], np.uint8)


def model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB batch -> the model's float input in 0..1 (one vectorised op per batch)."""
    return images.float().div_(255)


def labels_from_logits(logits: torch.Tensor, activation: str,
                       threshold: float = 0.5) -> torch.Tensor:
    """[B,C(+1),H,W] logits -> [B,H,W] label map (0 background, c+1 class c)."""
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


class SegmentationModule(L.LightningModule):
    def __init__(self, classes: list[str], width: int = 16, depth: int = 4,
                 norm: str = "batch", loss: str = "bce_dice", lr: float = 2e-3,
                 weight_decay: float = 1e-4, lr_schedule: str = "onecycle",
                 total_steps: int = 500) -> None:
        super().__init__()
        self.save_hyperparameters()  # all JSON-able: a checkpoint loads weights-only
        self.loss_fn, activation = loss_for(loss)
        self.model = SegmentationModel(classes, width=width, depth=depth, norm=norm,
                                       activation=activation)
        self.classes = list(classes)
        n = len(classes) + 1
        kw = {"num_classes": n, "average": None, "ignore_index": IGNORE}
        self.val_metrics = MetricCollection({
            "iou": MulticlassJaccardIndex(**kw),
            "f1": MulticlassF1Score(**kw),
            "precision": MulticlassPrecision(**kw),
            "recall": MulticlassRecall(**kw),
        })
        self.preview: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, masks, skipped = batch
        return model_input(images), masks.long(), skipped

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, masks, skipped = batch
        loss = self.loss_fn(self.model.logits(images), masks)
        n = images.shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/skipped_samples", skipped.float(), on_step=False, on_epoch=True,
                 reduce_fx="sum", batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, masks, skipped = batch
        logits = self.model.logits(images)
        self.log("val/loss", self.loss_fn(logits, masks), on_epoch=True,
                 batch_size=images.shape[0])
        self.log("val/skipped_samples", skipped.float(), on_epoch=True, reduce_fx="sum",
                 batch_size=images.shape[0])
        self.val_metrics.update(labels_from_logits(logits, self.model.activation), masks)

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
            preds = labels_from_logits(self.model.logits(images), self.model.activation)
        experiment.log_image(self.logger.run_id, preview_grid(images, labels, preds),
                             key="preview", step=self.current_epoch)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr,
                                                    total_steps=max(hp.total_steps, 2),
                                                    pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
