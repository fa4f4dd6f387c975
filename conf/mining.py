"""Hard-negative mining: where OSM is trusted, and how many rounds to run.

The mining pool must lie where OSM is complete: in an unmapped area a confident
"false positive" may be a real missing building, and teaching the model that it
is background would train it to miss exactly what mapgap looks for.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from mapgap.conf.base import Strict, resolve_path

# Set to a round number (e.g. 2) to make that round fail at its start: lets
# tests (and users trying the resume) interrupt a mining run on purpose.
FAIL_ROUND_ENV = "MAPGAP_FAIL_MINING_ROUND"
_TILE_KEY = re.compile(r"^z\d+_\d+_\d+$")


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
    # Fine-tuning starts from a trained model: a smaller peak learning rate
    # (train.lr x this) keeps what it learned while it learns the negatives.
    finetune_lr_factor: float = Field(default=0.3, gt=0, le=1)
    # Share of the pool held back (never mined) to measure false positives on.
    holdout_fraction: float = Field(default=0.3, gt=0, lt=1)
    # A negative is a tile-sized sample with its true mask: the tile itself, or a
    # window centred on its most confident mistake (context from the neighbours),
    # so that random training crops (train.crop_size) keep the mistake in view.
    negative_sample: Literal["tile", "centred"] = "centred"
    # The final model is the round with the fewest false positives whose val IoU
    # is at most this much below the trained model's.
    max_iou_drop: float = Field(default=0.02, ge=0)
    # Salt of the (deterministic) choice of held-back pool tiles.
    seed: int = 0

    @field_validator("complete_areas")
    @classmethod
    def _resolve(cls, v: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        if isinstance(v, str):
            return resolve_path(v, info)
        if v is not None:
            bad = [k for k in v if not _TILE_KEY.match(k)]
            if bad:
                raise ValueError(f"not a tile key (expected z<z>_<x>_<y>): {bad[0]!r}")
            if not v:
                raise ValueError("an empty tile list: no area where OSM is complete")
        return v
