"""The hard-negative mining pool: where OSM is trusted to be complete.

A confident prediction with no OSM label is only a *mistake* where OSM is
complete; in an unmapped area it may be a real missing building - exactly what
mapgap exists to find - and teaching the model it is background would make it
blind to it. So the pool is ``labels.complete_areas`` (GeoJSON polygons, or tile
keys where a coarser tile stands for its children; see
:mod:`mapgap.tasks.complete_areas`) or, without it, the tiles
whose OSM feature density is at or above ``mining.density_percentile`` of the AOI
(a tile without any feature is never trusted). Pixels of a pool tile outside the
GeoJSON areas are untrusted ("ignore" in negatives, not counted as errors).

The pool is split into a mined part and a held-back part, never mined, where false
positives are measured: by 2 x 2 tile blocks in a seeded order, so an object cut
by a tile border rarely counts on both sides. Val tiles are never mined either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely

from mapgap import grid, storage
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.complete_areas import area_geometry, has_trusted_pixel, listed_tiles
from mapgap.tasks.predict import stored_tiles
from mapgap.tasks.shards import shard_keys, trained_classes


class MiningError(ValueError):
    """Mining cannot start or continue (one line naming the file or field)."""


def complete_area(cfg: Any) -> shapely.Geometry | None:
    """The GeoJSON complete areas in EPSG:3857, or None (tile list or density rule)."""
    return area_geometry(cfg.labels.complete_areas)


def tile_area_km2(key: str, size: int) -> float:
    return (grid.metres_per_pixel(grid.parse_tile_key(key), size) * size) ** 2 / 1e6


def dense_tiles(stats: dict[str, Any], keys: Sequence[str], classes: Sequence[str],
                percentile: float, size: int) -> tuple[list[str], float]:
    """Tiles whose feature density (trained classes, per km2) is at or above the
    percentile over ``keys``; tiles without any feature never qualify."""
    density = {k: sum(stats[k]["features"].get(c, 0) for c in classes) / tile_area_km2(k, size)
               for k in keys}
    if not density:
        return [], 0.0
    threshold = float(np.percentile(list(density.values()), percentile))
    return [k for k, d in density.items() if d >= threshold and d > 0], threshold


def _rank(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()


def holdout_tiles(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
    """About ``fraction`` of the pool, held back in whole 2 x 2 tile blocks (an object
    cut by a tile border is then mostly on one side), in a seeded order."""
    blocks: dict[str, list[str]] = {}
    for key in keys:
        tile = grid.parse_tile_key(key)
        block = grid.parent(tile, max(tile.z - 1, 0))
        blocks.setdefault(grid.tile_key(block), []).append(key)
    if len(blocks) < 2:  # too small for blocks: hold back single tiles
        blocks = {k: [k] for k in keys}
    if len(blocks) < 2:
        raise MiningError(f"the mining pool has {len(keys)} tile(s): at least 2 are needed "
                          "(one to mine, one held back to measure false positives)")
    target = max(1, round(fraction * len(keys)))
    held: list[str] = []
    # Salted: independent of the (same-sized) val blocks that packing ranks the same way.
    for b in sorted(blocks, key=lambda b: _rank(seed, f"holdout:{b}"))[:-1]:  # keep one to mine
        if len(held) >= target:
            break
        held += blocks[b]
    return set(held)


def select_pool(cfg: Any, val_shards: Sequence[str]) -> dict[str, Any]:
    """Mined and held-back tile keys of the pool (see the module docstring)."""
    layout = RunLayout(cfg.run_uri)
    if not storage.exists(layout.mask_stats):
        raise MiningError(f"{layout.mask_stats}: no mask stats (run `mapgap pack` first)")
    stats = storage.read_json(layout.mask_stats)
    images = {grid.tile_key(t) for t in stored_tiles(layout.images, cfg.zoom)}
    aoi = [grid.tile_key(t) for t in grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom)]
    available = [k for k in aoi if k in stats and k in images]
    m, areas = cfg.mining, cfg.labels.complete_areas
    info: dict[str, Any] = {}
    if isinstance(areas, list):
        rule, listed = "tile list", listed_tiles(areas, cfg.zoom)
        pool = [k for k in available if k in listed]
    elif isinstance(areas, str):
        rule, area = f"areas in {areas}", complete_area(cfg)
        pool = [k for k in available if has_trusted_pixel(area, k, cfg.tile_size)]
    else:
        rule = f"OSM feature density >= percentile {m.density_percentile:g}"
        pool, info["density_threshold_per_km2"] = dense_tiles(
            stats, available, trained_classes(cfg), m.density_percentile, cfg.tile_size)
    if not pool:
        raise MiningError(f"mining: no AOI tile with imagery and a mask is in the pool "
                          f"({rule})")
    held = holdout_tiles(pool, m.holdout_fraction, m.seed)
    val = shard_keys(val_shards)
    mine = sorted(k for k in pool if k not in held and k not in val)
    if not mine:
        raise MiningError(f"the mining pool ({rule}, {len(pool)} tiles) has no tile left to "
                          "mine: all are held back or in the val split")
    return {"rule": rule, "mine": mine, "holdout": sorted(held),
            "excluded_val": sum(k in val for k in pool if k not in held),
            "available_tiles": len(available), **info}


def write_pool(cfg: Any, val_shards: Sequence[str]) -> dict[str, Any]:
    """``mining/pool.json``; returns its URI, content digest and counts."""
    pool = select_pool(cfg, val_shards)
    uri = RunLayout(cfg.run_uri).mining_pool
    storage.write_json(uri, pool)
    digest = hashlib.sha256(json.dumps(pool, sort_keys=True).encode()).hexdigest()[:16]
    get_logger().info("mining pool (%s): %d tiles to mine, %d held back, %d val tiles skipped",
                      pool["rule"], len(pool["mine"]), len(pool["holdout"]),
                      pool["excluded_val"])
    return {"uri": uri, "digest": digest, "rule": pool["rule"], "mine": len(pool["mine"]),
            "holdout": len(pool["holdout"])}


@stage_task(name="mining-pool")
def pool_task(cfg: Any, val_shards: list[str], inputs_digest: str) -> dict[str, Any]:
    """``inputs_digest``: mask stats, stored imagery and complete areas (changed -> new pool)."""
    return write_pool(cfg, val_shards)
