"""A model's confident mistakes on one tile, and what to teach it instead.

A mistake is a connected group of pixels predicted above the threshold, at least
``min_area_m2`` on the ground (metres, so the rule means the same at every zoom
and latitude), that touches no OSM label of that class and lies wholly where OSM
is trusted to be complete. Everything here works on one tile's arrays; which
tiles to look at is :mod:`mapgap.tasks.mining`'s business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import cv2
import numpy as np
from scipy import ndimage

from mapgap import grid
from mapgap.grid import Tile
from mapgap.tasks.shards import IGNORE


@dataclass(frozen=True)
class Mistake:
    tile: str  # tile key
    class_name: str
    score: float  # mean probability over the group: "how confident"
    peak: float
    area_m2: float
    bbox: tuple[int, int, int, int]  # pixels: col0, row0, col1, row1 (exclusive)
    lon: float
    lat: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mistake:
        return cls(**{**d, "bbox": tuple(d["bbox"])})


class Groups(NamedTuple):
    """8-connected groups of predicted pixels; index 0 = not predicted."""

    ids: np.ndarray  # group id per pixel
    stats: np.ndarray  # cv2 stats per group: x, y, w, h, area (pixels)
    centroids: np.ndarray  # (col, row) per group
    unlabelled: np.ndarray  # bool per group: touches no labelled pixel


def predicted_groups(probs: np.ndarray, labelled: np.ndarray, threshold: float) -> Groups:
    fg = (probs > threshold).astype(np.uint8)
    n, ids, stats, centroids = cv2.connectedComponentsWithStats(fg, connectivity=8)
    unlabelled = np.zeros(n, bool)
    if n > 1:
        touched = ndimage.maximum(labelled.astype(np.uint8), ids, np.arange(1, n))
        unlabelled[1:] = np.asarray(touched) == 0
    return Groups(ids, stats, centroids, unlabelled)


def find_mistakes(tile: Tile, probs: np.ndarray, labelled: np.ndarray,
                  trusted: np.ndarray | None, class_name: str, threshold: float,
                  min_area_m2: float) -> list[Mistake]:
    """Groups of ``probs > threshold`` of at least ``min_area_m2`` that touch no
    ``labelled`` pixel and lie wholly inside ``trusted``."""
    size = probs.shape[-1]
    g = predicted_groups(probs, labelled, threshold)
    n = len(g.unlabelled)
    if not g.unlabelled.any():
        return []
    mpp = grid.metres_per_pixel(tile, size)
    index = np.arange(1, n)
    outside = (np.zeros(n - 1, bool) if trusted is None
               else np.asarray(ndimage.minimum(trusted.astype(np.uint8), g.ids, index)) == 0)
    areas = g.stats[1:, cv2.CC_STAT_AREA] * mpp**2
    keep = (areas >= min_area_m2) & g.unlabelled[1:] & ~outside
    if not keep.any():
        return []
    chosen = index[keep]
    means = ndimage.mean(probs, g.ids, chosen)
    peaks = ndimage.maximum(probs, g.ids, chosen)
    out = []
    for i, mean, peak in zip(chosen, means, peaks, strict=True):
        x, y, w, h = (int(v) for v in g.stats[i, :4])
        col, row = g.centroids[i]
        lon, lat = grid.pixel_to_lonlat(tile, size, col + 0.5, row + 0.5)
        out.append(Mistake(grid.tile_key(tile), class_name, round(float(mean), 4),
                           round(float(peak), 4), round(float(areas[i - 1]), 2),
                           (x, y, x + w, y + h), round(lon, 7), round(lat, 7)))
    return out


def false_positives(probs: np.ndarray, labelled: np.ndarray, truth: np.ndarray,
                    valid: np.ndarray, threshold: float) -> dict[str, int]:
    """False-positive pixels: predicted pixels (where the truth is trusted, ``valid``)
    of groups touching no label - things that are not there, not a fuzzy edge
    around a real building (val IoU measures edges) - and all trusted background."""
    g = predicted_groups(probs, labelled, threshold)
    return {"fp_pixels": int((g.unlabelled[g.ids] & valid).sum()),
            "background_pixels": int((valid & ~truth).sum())}


def negative_mask(mask: np.ndarray, trusted: np.ndarray | None) -> np.ndarray:
    """The label map a hard negative is trained on: the tile's true mask (background
    where the model fired) and "ignore" where OSM is not trusted."""
    if trusted is None:
        return mask
    out = mask.copy()
    out[~trusted] = IGNORE
    return out


def centred_offset(m: Mistake, size: int) -> tuple[int, int]:
    """(dx, dy) px from a tile to the tile-sized window centred on its mistake."""
    c0, r0, c1, r1 = m.bbox
    half = size // 2
    return (int(np.clip(round((c0 + c1) / 2) - half, -half, half)),
            int(np.clip(round((r0 + r1) / 2) - half, -half, half)))
