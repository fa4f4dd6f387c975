"""Rasterize the harvested labels into one uint8 mask PNG per tile.

Mask values (the contract with packing and training):

* ``0``: background;
* ``i + 1``: the class at index ``i`` of ``cfg.classes``; where classes overlap
  the higher ``priority`` wins (classes are drawn in list order, stably sorted
  by priority, so for equal priorities the later class in the list wins);
* ``255``: ignore: with ``labels.edge_ignore_px = N > 0``, every pixel a
  feature's outline passes through, grown by ``N - 1`` pixels; with
  ``labels.complete_areas``, background outside them (OSM may lack what is
  there: see :mod:`mapgap.tasks.complete_areas`).

Every tile of the AOI gets a mask, all-background ones included (negatives).
Per tile the stats record the number of features touching it and the
foreground fraction per class (before the ignore band). With
``labels.signed_distance`` (or any class with ``separate_instances``) a second
PNG per tile holds the truncated signed distance to the nearest label edge
(128 on the edge, 255 deep inside, 1 far outside), computed on a padded window
so it has no seams between tiles.

Which edges: with instance classes (``separate_instances``) every polygon of
those classes keeps its own outline. Each is burnt with its own id, and the
pixels of an instance next to (8-neighbour) a pixel of another instance are
edge pixels (d = 0, value 128): a wall shared by two touching houses becomes
a line of 128 between two interiors, which the model learns and vectorize
splits along. Where an instance touches only background this is exactly the
distance of the union, so lone buildings keep the old target. Without
instance classes the distance is that of the union of all classes (as before).

Cost is linear in tiles + features: a batch reads only the GeoParquet row
groups touching its bbox, indexes them in an STRtree, and each tile burns
only the features its box hits.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import cv2
import mercantile
import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio import features as rio_features
from rasterio.errors import NotGeoreferencedWarning
from scipy import ndimage
from shapely.geometry import box

from mapgap import grid, storage
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.progress import track
from mapgap.tasks.complete_areas import CompleteAreas
from mapgap.tasks.geometry import project
from mapgap.tasks.labels import read_labels

IGNORE = 255
SDT_EDGE = 128


@dataclass(frozen=True)
class RasterSpec:
    """Everything that determines the masks (and so the rasterize cache key)."""

    classes: tuple[str, ...]  # mask value i + 1 = classes[i]
    priorities: tuple[int, ...]
    tile_size: int = 256
    edge_ignore_px: int = 0
    signed_distance: bool = False
    signed_distance_clip_px: int = 16
    zoom: int = 0
    complete_areas: str | tuple[str, ...] | None = None
    complete_areas_digest: str = ""  # the file's content: new areas -> new masks
    # Classes whose polygons each keep their own outline in the distance target
    # (touching buildings: two interiors and an edge); () = the union of all classes.
    instance_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.instance_classes) - set(self.classes))
        if unknown:
            raise ValueError(f"instance classes {unknown} are not among the classes "
                             f"{list(self.classes)}")

    @classmethod
    def from_config(cls, cfg: Any) -> RasterSpec:
        areas = cfg.labels.complete_areas
        instances = tuple(c.name for c in cfg.classes if c.separate_instances)
        return cls(
            classes=tuple(c.name for c in cfg.classes),
            priorities=tuple(c.priority for c in cfg.classes),
            tile_size=cfg.tile_size,
            edge_ignore_px=cfg.labels.edge_ignore_px,
            signed_distance=cfg.labels.signed_distance or bool(instances),
            instance_classes=instances,
            signed_distance_clip_px=cfg.labels.signed_distance_clip_px,
            zoom=cfg.zoom,
            complete_areas=tuple(areas) if isinstance(areas, list) else areas,
            complete_areas_digest=storage.fingerprint([areas]) if isinstance(areas, str) else "",
        )

    @property
    def draw_order(self) -> list[int]:
        """Class indices in drawing order: the last drawn wins an overlap."""
        return sorted(range(len(self.classes)), key=lambda i: self.priorities[i])

    @property
    def pad_px(self) -> int:
        """Context around a tile: outlines just outside still ignore-band or
        set the distance of pixels inside."""
        return max(self.edge_ignore_px, self.signed_distance_clip_px if self.signed_distance else 0)

    @property
    def instance_values(self) -> list[int]:
        """Mask values (class index + 1) of the instance classes."""
        return [self.classes.index(c) + 1 for c in self.instance_classes]

    @property
    def values(self) -> dict[str, int]:
        out = {"background": 0, **{c: i + 1 for i, c in enumerate(self.classes)}}
        if self.edge_ignore_px or self.complete_areas:
            out["ignore"] = IGNORE
        return out


def burn(geoms: np.ndarray, values: np.ndarray, transform: Affine, shape: tuple[int, int],
         edge_ignore_px: int = 0) -> np.ndarray:
    """Burn geometries (already in the grid's CRS, in drawing order) onto any grid."""
    mask = np.zeros(shape, dtype=np.uint8)
    if len(geoms) == 0:
        return mask
    rio_features.rasterize(zip(geoms, values.tolist(), strict=True), out=mask,
                           transform=transform)
    if edge_ignore_px:
        mask[edge_band(shapely.boundary(geoms), transform, shape, edge_ignore_px)] = IGNORE
    return mask


def edge_band(outlines: np.ndarray, transform: Affine, shape: tuple[int, int],
              width_px: int) -> np.ndarray:
    """Pixels the outlines pass through, grown by ``width_px - 1``."""
    edges = np.zeros(shape, dtype=np.uint8)
    outlines = outlines[~shapely.is_empty(outlines)]
    if len(outlines):
        rio_features.rasterize(((g, 1) for g in outlines), out=edges, transform=transform,
                               all_touched=True)
    if width_px > 1:
        k = 2 * (width_px - 1) + 1
        edges = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return edges.astype(bool)


def signed_distance(foreground: np.ndarray, clip_px: int,
                    walls: np.ndarray | None = None) -> np.ndarray:
    """uint8 truncated signed distance: 128 + 127 * d / clip, d > 0 inside.
    ``walls``: foreground pixels that are edges themselves (d = 0)."""
    fg = foreground.astype(np.uint8)
    core = fg if walls is None else fg & ~walls.astype(bool)
    inside = cv2.distanceTransform(core.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform(1 - fg, cv2.DIST_L2, 5)
    d = np.clip(np.where(fg > 0, inside, -outside), -clip_px, clip_px)
    return np.clip(np.rint(SDT_EDGE + 127 * d / clip_px), 1, 255).astype(np.uint8)


def burn_instances(geoms: np.ndarray, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """int32 image: polygon ``i`` burnt as ``i + 1`` (in order: the last drawn wins)."""
    out = np.zeros(shape, dtype=np.int32)
    if len(geoms):
        rio_features.rasterize(zip(geoms, range(1, len(geoms) + 1), strict=True), out=out,
                               transform=transform)
    return out


def instance_walls(instances: np.ndarray) -> np.ndarray:
    """Pixels of an instance with an 8-neighbour in another instance (not background)."""
    fg = instances > 0
    above = ndimage.maximum_filter(instances, size=3)
    below = ndimage.minimum_filter(np.where(fg, instances, np.iinfo(np.int32).max), size=3)
    return fg & ((above != instances) | (below != instances))


def instance_signed_distance(instances: np.ndarray, clip_px: int) -> np.ndarray:
    """:func:`signed_distance` where every instance keeps its own outline: walls
    shared by touching instances are edges (128) between their interiors."""
    return signed_distance(instances > 0, clip_px, instance_walls(instances))


def png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - cv2 only fails on unsupported dtypes
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _mercator_bounds_lonlat(tiles: list[Tile], pad_px: int, size: int) -> tuple[float, ...]:
    """Lon/lat bbox of a batch of tiles plus ``pad_px`` pixels on every side."""
    b = [grid.tile_xy_bounds(t) for t in tiles]
    res = (b[0][2] - b[0][0]) / size
    left = min(v[0] for v in b) - pad_px * res
    bottom = min(v[1] for v in b) - pad_px * res
    right = max(v[2] for v in b) + pad_px * res
    top = max(v[3] for v in b) + pad_px * res
    w, s = mercantile.lnglat(left, bottom)
    e, n = mercantile.lnglat(right, top)
    return (w, s, e, n)


@dataclass
class BatchFeatures:
    """A batch's features in EPSG:3857, in drawing order, with an STRtree."""

    geoms: np.ndarray
    values: np.ndarray  # mask value (class index + 1)
    tree: shapely.STRtree

    @classmethod
    def load(cls, labels: dict[str, str], spec: RasterSpec,
             bbox: tuple[float, ...]) -> BatchFeatures:
        parts, values = [np.empty(0, dtype=object)], [np.empty(0, dtype=np.uint8)]
        for i in spec.draw_order:
            uri = labels.get(spec.classes[i])
            if uri is not None:
                frame = read_labels(uri, bbox=bbox)
                parts.append(frame.geometry.values.to_numpy())
                values.append(np.full(len(frame), i + 1, dtype=np.uint8))
        geoms = project(np.concatenate(parts), grid.WGS84, grid.WEB_MERCATOR)
        return cls(geoms, np.concatenate(values), shapely.STRtree(geoms))


def rasterize_tile(feats: BatchFeatures, tile: Tile, spec: RasterSpec,
                   complete: CompleteAreas | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(mask, signed distance or None, stats) for one tile."""
    size, pad = spec.tile_size, spec.pad_px
    left, bottom, right, top = grid.tile_xy_bounds(tile)
    res = (right - left) / size
    tile_box = box(left, bottom, right, top)
    window = box(left - pad * res, bottom - pad * res, right + pad * res, top + pad * res)
    idx = np.sort(feats.tree.query(window, predicate="intersects"))
    geoms, values = feats.geoms[idx], feats.values[idx]
    # Cut what reaches far beyond the window (a long road): rasterio converts
    # every vertex it is given. The rectangle is a pixel wider than the window,
    # so no cut edge lies on a pixel that is drawn.
    rect = (left - (pad + 1) * res, bottom - (pad + 1) * res,
            right + (pad + 1) * res, top + (pad + 1) * res)
    cut = shapely.clip_by_rect(geoms, *rect)
    kept = ~shapely.is_empty(cut)
    transform = grid.tile_transform(tile, size) @ Affine.translation(-pad, -pad)
    full = burn(cut[kept], values[kept], transform, (size + 2 * pad, size + 2 * pad))
    crop = (slice(pad, pad + size), slice(pad, pad + size))
    mask = full[crop].copy()

    touching = values[shapely.intersects(geoms, tile_box)] if pad else values
    n_feats = np.bincount(touching, minlength=len(spec.classes) + 1)
    n_pixels = np.bincount(mask.ravel(), minlength=len(spec.classes) + 1)
    stats = {
        "features": {c: int(n_feats[i + 1]) for i, c in enumerate(spec.classes)},
        "foreground": {c: round(float(n_pixels[i + 1]) / size**2, 6)
                       for i, c in enumerate(spec.classes)},
    }
    if spec.edge_ignore_px:
        outlines = shapely.clip_by_rect(shapely.boundary(geoms), *rect)
        band = edge_band(outlines, transform, full.shape, spec.edge_ignore_px)[crop]
        mask[band] = IGNORE
        stats["ignore"] = round(float(band.mean()), 6)
    trusted = complete.trusted(tile, size) if complete is not None else None
    if trusted is not None:
        untrusted = ~trusted & (mask == 0)
        mask[untrusted] = IGNORE
        stats["untrusted"] = round(float(untrusted.mean()), 6)
    sdt = None
    if spec.signed_distance:
        sdt = distance_target(cut[kept], values[kept], transform, full, spec)[crop]
    return mask, sdt, stats


def distance_target(geoms: np.ndarray, values: np.ndarray, transform: Affine,
                    full: np.ndarray, spec: RasterSpec) -> np.ndarray:
    """The signed distance of a padded window: per instance of the instance
    classes, or of the union of every class (``full``, the burnt window)."""
    clip = spec.signed_distance_clip_px
    if not spec.instance_classes:
        return signed_distance(full > 0, clip)
    own = np.isin(values, spec.instance_values)
    return instance_signed_distance(burn_instances(geoms[own], transform, full.shape), clip)


def order_tiles(tiles: list[Tile]) -> list[Tile]:
    """Quadkey (Z-curve) order: consecutive tiles, and so each batch, are compact
    blocks, so a batch's bbox read brings few features it does not need."""
    return sorted(tiles, key=mercantile.quadkey)


def batch_id(tile_keys: list[str]) -> str:
    return hashlib.sha1("\n".join(tile_keys).encode()).hexdigest()[:16]


def rasterize_tiles(layout: RunLayout, tiles: list[Tile], labels: dict[str, str],
                    spec: RasterSpec) -> dict[str, dict[str, Any]]:
    """Write the masks (and distance targets) of a batch; returns stats per tile key."""
    if not tiles:
        return {}
    feats = BatchFeatures.load(labels, spec, _mercator_bounds_lonlat(tiles, spec.pad_px,
                                                                      spec.tile_size))
    # rasterize() opens its in-memory dataset before giving it our transform and
    # hides the resulting warning with catch_warnings, which is not thread-safe:
    # with batches in parallel threads it leaks. It never concerns our data.
    # (Idempotent: an identical filter replaces itself.)
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning,
                            module="rasterio.features")
    complete = CompleteAreas(spec.complete_areas, spec.zoom) if spec.complete_areas else None
    out = {}
    with rasterio.Env():  # one GDAL environment, not one per rasterize() call
        for tile in track(tiles, len(tiles), "masks"):
            mask, sdt, stats = rasterize_tile(feats, tile, spec, complete)
            storage.write_bytes(layout.mask(tile), png(mask))
            if sdt is not None:
                storage.write_bytes(layout.signed_distance(tile), png(sdt))
            out[grid.tile_key(tile)] = stats
    return out


def merge_stats(part_uris: list[str], uri: str) -> dict[str, Any]:
    """One ``{tile key: stats}`` JSON from the batch parts; returns totals."""
    tiles: dict[str, Any] = {}
    for part in part_uris:
        tiles.update(storage.read_json(part))
    storage.write_json(uri, tiles)
    positive: dict[str, int] = {}
    for stats in tiles.values():
        for c, n in stats["features"].items():
            positive[c] = positive.get(c, 0) + (n > 0)
    return {"tiles": len(tiles), "tiles_with_features": positive}


@stage_task(name="rasterize")
def rasterize_batch_task(run_uri: str, tile_keys: list[str], labels: dict[str, dict[str, Any]],
                         spec: RasterSpec) -> str:
    """One batch of tiles; ``labels`` carries each class's GeoParquet content hash,
    so re-harvested labels change the cache key and the masks are redrawn."""
    layout = RunLayout(run_uri)
    tiles = [grid.parse_tile_key(k) for k in tile_keys]
    stats = rasterize_tiles(layout, tiles, {c: v["uri"] for c, v in labels.items()}, spec)
    return storage.write_json(layout.mask_stats_part(batch_id(tile_keys)), stats)
