"""Packing samples into shards and training the segmentation model."""

from __future__ import annotations

from typing import Literal

from mapgap.conf.base import Strict
from pydantic import Field


class PackConfig(Strict):
    maxcount: int = Field(default=1000, ge=1)
    maxsize: int = Field(default=1_000_000_000, ge=1024)
    image_format: Literal["png", "webp"] = "png"
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    # Train/val blocks are parent tiles at (zoom - split_zoom_offset).
    split_zoom_offset: int = Field(default=3, ge=1)
    # Negative (feature-free) tiles kept per positive tile.
    negative_ratio: float = Field(default=0.3, ge=0)


class TrainConfig(Strict):
    # Classes the model learns (default: all configured). The registered MLflow
    # model is named after them: "-".join(classes), e.g. "building".
    classes: list[str] | None = None
    epochs: int = Field(default=10, ge=1)
    steps_per_epoch: int = Field(default=50, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    width: int = Field(default=16, ge=4)
    depth: int = Field(default=4, ge=1, le=6)
    loss: Literal["bce_dice", "ce_lovasz", "focal"] = "bce_dice"
    num_workers: int = Field(default=0, ge=0)
    shuffle_buffer: int = Field(default=256, ge=1)
    augment: bool = True
    seed: int = 0
    max_minutes: float | None = Field(default=None, gt=0)
    # Default: sqlite:///<run dir>/mlflow.db; or an http(s):// tracking server.
    tracking_uri: str | None = None
    experiment: str | None = None
