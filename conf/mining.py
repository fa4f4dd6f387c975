"""Hard-negative mining: where OSM is trusted, and how many rounds to run.

The mining pool must lie where OSM is complete (``labels.complete_areas``): in an
unmapped area a confident "false positive" may be a real missing building, and
teaching the model that it is background would train it to miss exactly what
mapgap looks for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mapgap.conf.base import Strict

# Set to a round number (e.g. 2) to make that round fail at its start: lets
# tests (and users trying the resume) interrupt a mining run on purpose.
FAIL_ROUND_ENV = "MAPGAP_FAIL_MINING_ROUND"


class MiningConfig(Strict):
    rounds: int = Field(default=2, ge=0)
    # Stop early when the false-positive rate improves by less than this (relative).
    min_gain: float = Field(default=0.05, ge=0)
    # The pool is labels.complete_areas; without them, the tiles whose OSM feature
    # density is at or above this percentile.
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
    # The final model is the round with the fewest false positives whose val pixel
    # IoU and val object F1 are each at most this much below the trained model's.
    max_iou_drop: float = Field(default=0.02, ge=0)
    # Salt of the (deterministic) choice of held-back pool tiles.
    seed: int = 0
