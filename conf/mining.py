"""Hard-negative mining: where OSM is trusted, and how many rounds to run."""

from __future__ import annotations

from mapgap.conf.base import Strict, resolve_path
from pydantic import Field, ValidationInfo, field_validator


class MiningConfig(Strict):
    rounds: int = Field(default=2, ge=0)
    # Stop early when the false-positive rate improves by less than this (relative).
    min_gain: float = Field(default=0.05, ge=0)
    # Where OSM is complete: a GeoJSON of polygons, or a list of tile keys z{z}_{x}_{y}.
    complete_areas: str | list[str] | None = None
    # Otherwise: tiles whose OSM feature density is at or above this percentile.
    density_percentile: float = Field(default=50, ge=0, le=100)
    threshold: float = Field(default=0.5, gt=0, lt=1)
    min_area_m2: float = Field(default=10, ge=0)
    max_negatives: int = Field(default=64, ge=1)
    finetune_epochs: int = Field(default=3, ge=1)

    @field_validator("complete_areas")
    @classmethod
    def _resolve(cls, v: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        return resolve_path(v, info) if isinstance(v, str) else v
