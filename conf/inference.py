"""Batch inference, polygon extraction and deduplication against OSM."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from mapgap.conf.base import Strict, resolve_path


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
    # Probability threshold and smallest polygon kept. Default (None): the values
    # training calibrated on val for the model (maximum object F1), else 0.5 and
    # 10 m2. A value set here overrides the model's.
    threshold: float | None = Field(default=None, gt=0, lt=1)
    open_m: float = Field(default=1.0, ge=0)
    close_m: float = Field(default=1.0, ge=0)
    simplify_m: float = Field(default=0.5, ge=0)
    min_area_m2: float | None = Field(default=None, ge=0)
    orthogonalize: bool = True
    # DataLoader worker processes that decode tiles while the model runs (0: in the
    # task's own thread), and how many batches each keeps ready.
    loader_workers: int = Field(default=1, ge=0)
    prefetch_batches: int = Field(default=2, ge=1)
    # Upper bound on decoded tiles kept for their neighbours' margins (per worker).
    tile_cache: int = Field(default=128, ge=9)

    @field_validator("model")
    @classmethod
    def _resolve_checkpoint(cls, v: str | None, info: ValidationInfo) -> str | None:
        # A checkpoint path is relative to the config file; its absence is reported
        # by the predict stage (training may create it after the config is written).
        if v is None or v.startswith("models:/"):
            return v
        return resolve_path(v, info, must_exist=False)


class DedupConfig(Strict):
    # A prediction is a candidate when IoU with touched OSM < iou AND the share
    # of its area covered by OSM < overlap.
    iou: float = Field(default=0.3, ge=0, le=1)
    overlap: float = Field(default=0.5, ge=0, le=1)
    # OSM features whose area is predicted below this share are "unsupported".
    support: float = Field(default=0.2, ge=0, le=1)
    # Zoom of the quality grid cells (default: the run's tile zoom).
    grid_zoom: int | None = Field(default=None, ge=0, le=24)
    # XYZ template of the imagery layer in review.html (default: the run's own
    # tiles, relative to the page so the run dir can be zipped and shared).
    review_imagery: str | None = None
