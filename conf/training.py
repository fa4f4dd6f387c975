"""Packing samples into shards and training the segmentation model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mapgap.conf.base import Strict


class PackConfig(Strict):
    maxcount: int = Field(default=1000, ge=1)
    maxsize: int = Field(default=1_000_000_000, ge=1024)
    image_format: Literal["png", "webp"] = "png"
    # WebP only: 100 = lossless, below = lossy quality.
    webp_quality: int = Field(default=90, ge=1, le=100)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    # Train/val blocks are parent tiles at (zoom - split_zoom_offset).
    split_zoom_offset: int = Field(default=3, ge=1)
    # Negative (feature-free) tiles kept per positive tile.
    negative_ratio: float = Field(default=0.3, ge=0)
    # Salt for the (deterministic) choice of val blocks, kept negatives and sample order.
    seed: int = 0
    # Tiles scanned / packed per Prefect task.
    tiles_per_task: int = Field(default=2048, ge=1)


class TrainConfig(Strict):
    # Classes the model learns (default: all configured). The registered MLflow
    # model is named after them: "-".join(classes), e.g. "building".
    classes: list[str] | None = None
    epochs: int = Field(default=10, ge=1)
    steps_per_epoch: int = Field(default=50, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    # One-cycle warms up then anneals: converges in few epochs from scratch.
    lr_schedule: Literal["onecycle", "constant"] = "onecycle"
    width: int = Field(default=16, ge=4)
    depth: int = Field(default=4, ge=1, le=6)
    norm: Literal["batch", "group"] = "batch"
    loss: Literal["bce_dice", "ce_lovasz", "focal"] = "bce_dice"
    # Random training crops (px, multiple of 2**depth); None = whole tiles.
    crop_size: int | None = Field(default=None, ge=16)
    num_workers: int = Field(default=0, ge=0)
    # Decoded samples kept per loader process (each train and val worker, or the
    # main process with num_workers 0; ~0.25 MB per 256 px sample): a data set that
    # fits is decoded once, not every epoch. 0 = off.
    decode_cache_mb: int = Field(default=256, ge=0)
    shuffle_buffer: int = Field(default=256, ge=1)
    augment: bool = True
    # Validation batches per epoch; None = the whole val split.
    val_batches: int | None = Field(default=None, ge=1)
    # Val tiles drawn as image | label | prediction in MLflow each epoch.
    preview_samples: int = Field(default=4, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    max_minutes: float | None = Field(default=None, gt=0)
    # Default: sqlite:///<run dir>/mlflow.db; or an http(s):// tracking server.
    tracking_uri: str | None = None
    experiment: str | None = None
