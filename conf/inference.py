"""Batch inference, polygon extraction and deduplication against OSM."""

from __future__ import annotations

from typing import Literal

from mapgap.conf.base import Strict
from pydantic import Field


class InferenceConfig(Strict):
    # models:/<name>@champion, a checkpoint path, or None for this run's champion.
    model: str | None = None
    tiles_per_task: int = Field(default=1024, ge=1)
    batch_size: int = Field(default=8, ge=1)
    threads: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Context read from neighbour tiles on each side (mirrored where missing).
    margin_px: int = Field(default=32, ge=0)
    tta: bool = False
    threshold: float = Field(default=0.5, gt=0, lt=1)
    open_m: float = Field(default=1.0, ge=0)
    close_m: float = Field(default=1.0, ge=0)
    simplify_m: float = Field(default=0.5, ge=0)
    min_area_m2: float = Field(default=10.0, ge=0)
    orthogonalize: bool = True


class DedupConfig(Strict):
    # A prediction is a candidate when IoU with touched OSM < iou AND the share
    # of its area covered by OSM < overlap.
    iou: float = Field(default=0.3, ge=0, le=1)
    overlap: float = Field(default=0.5, ge=0, le=1)
    # OSM features whose area is predicted below this share are "unsupported".
    support: float = Field(default=0.2, ge=0, le=1)
