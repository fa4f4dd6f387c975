"""Probability tiles -> clean polygons, one feature per object even across tiles.

Per tile: threshold, open/close (sizes in metres; the mask gets context from
the neighbour tiles so the filters agree on both sides of a border), then
connected components are traced with ``rasterio.features.shapes`` in *global
pixel coordinates* of the zoom level. Integer pixel corners make the edge two
neighbouring tiles share exactly the same coordinates, so the pieces of an
object cut by borders union into one polygon with no sliver or gap. Pieces
that do not touch a border are finished inside their batch task; only border
pieces wait for the merge, which links them with an STRtree (n log n, never
all pairs). Finishing = Douglas-Peucker in metres, optional squaring of
buildings, area in m2 (equal-area CRS), minimum area, lon/lat output.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from affine import Affine
from rasterio.features import shapes
from scipy import ndimage
from shapely.geometry import Polygon, shape

from mapgap import storage
from mapgap.grid import WGS84, Tile, parse_tile_key, tile_key
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.geometry import (
    equal_area_proj,
    geojson_writer,
    metres_per_pixel_at,
    pixel_resolution,
    pixels_to_lonlat,
    project,
    union_groups,
)
from mapgap.tasks.neighbourhood import TileCache, cache_capacity, row_major, with_margin
from mapgap.tasks.predict import read_probability


@dataclass(frozen=True)
class VectorSettings:
    """Everything that shapes the polygons. Kernel sizes are pixels derived once
    per run from metres, so every tile uses the same filter (no seams)."""

    classes: tuple[str, ...]  # band order of the probability PNGs
    zoom: int
    tile_size: int
    threshold: float = 0.5
    open_px: int = 1  # odd kernel diameters; 1 = no filtering
    close_px: int = 1
    simplify_m: float = 0.5
    min_area_m2: float = 10.0
    orthogonalize: tuple[str, ...] = ()  # classes whose corners are squared
    area_crs: str = "+proj=laea +lat_0=0 +lon_0=0 +datum=WGS84 +units=m +no_defs"
    tile_cache: int = 128

    @classmethod
    def from_config(cls, cfg: Any, classes: list[str]) -> VectorSettings:
        c = cfg.aoi_geometry.centroid
        mpp = pixel_resolution(cfg.zoom, cfg.tile_size) * math.cos(math.radians(c.y))
        inf = cfg.inference
        square = tuple(n for n in classes if inf.orthogonalize and _is_building(cfg, n))
        return cls(classes=tuple(classes), zoom=cfg.zoom, tile_size=cfg.tile_size,
                   threshold=inf.threshold, open_px=kernel_px(inf.open_m, mpp),
                   close_px=kernel_px(inf.close_m, mpp), simplify_m=inf.simplify_m,
                   min_area_m2=inf.min_area_m2, orthogonalize=square,
                   area_crs=equal_area_proj(c.x, c.y), tile_cache=inf.tile_cache)

    @property
    def margin(self) -> int:
        """Context an open followed by a close needs to match the whole mosaic."""
        return (self.open_px - 1) + (self.close_px - 1)


def _is_building(cfg: Any, name: str) -> bool:
    names = {c.name for c in cfg.classes}
    return name in names and "building" in cfg.class_named(name).tags.include


def kernel_px(size_m: float, metres_per_px: float) -> int:
    """Odd structuring-element diameter in pixels for a size in metres."""
    d = max(1, round(size_m / metres_per_px))
    return d + 1 - d % 2


# --- per tile ------------------------------------------------------------------------------

@dataclass
class Pieces:
    """Connected components of one class in global pixel coordinates."""

    geoms: list[Any]
    sums: list[float]  # sum of probability x 255 over the component's pixels
    counts: list[int]
    tiles: list[list[str]]

    @classmethod
    def empty(cls) -> Pieces:
        return cls([], [], [], [])

    def add(self, geom: Any, total: float, count: int, tiles: list[str]) -> None:
        self.geoms.append(geom)
        self.sums.append(total)
        self.counts.append(count)
        self.tiles.append(tiles)

    def extend(self, other: Pieces) -> None:
        self.geoms += other.geoms
        self.sums += other.sums
        self.counts += other.counts
        self.tiles += other.tiles


def clean_mask(prob: np.ndarray, s: VectorSettings) -> np.ndarray:
    mask = (prob >= s.threshold * 255).astype(np.uint8)
    for op, d in ((cv2.MORPH_OPEN, s.open_px), (cv2.MORPH_CLOSE, s.close_px)):
        if d > 1:
            mask = cv2.morphologyEx(mask, op, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d)))
    return mask


def tile_pieces(tile: Tile, prob: np.ndarray, mask: np.ndarray) -> tuple[Pieces, Pieces]:
    """(interior, border) components of one tile's cleaned mask."""
    labels, n = ndimage.label(mask)
    interior, border = Pieces.empty(), Pieces.empty()
    if n == 0:
        return interior, border
    sums = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    edge = set(np.unique(np.concatenate(
        [labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    size = mask.shape[0]
    origin = Affine.translation(tile.x * size, tile.y * size)
    key = tile_key(tile)
    for geom, value in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=4,
                              transform=origin):
        i = int(value)
        (border if i in edge else interior).add(shape(geom), float(sums[i]), int(counts[i]),
                                                 [key])
    return interior, border


def vectorize_tiles(layout: RunLayout, tiles: list[Tile],
                    s: VectorSettings) -> tuple[dict[str, Pieces], dict[str, Pieces]]:
    """Components per class of every tile, split into (interior, border)."""
    ordered = row_major(tiles)
    n = len(s.classes)
    cache = TileCache(lambda t: _hwc(read_probability(layout, n, t)),
                      cache_capacity(ordered, s.tile_cache))
    m, size = s.margin, s.tile_size
    interior: dict[str, Pieces] = defaultdict(Pieces.empty)
    border: dict[str, Pieces] = defaultdict(Pieces.empty)
    for tile in ordered:
        window = with_margin(tile, cache, m)
        for c, name in enumerate(s.classes):
            prob = window[..., c]
            mask = clean_mask(prob, s)[m:m + size, m:m + size]
            inner, edge = tile_pieces(tile, prob[m:m + size, m:m + size], mask)
            interior[name].extend(inner)
            border[name].extend(edge)
    return interior, border


def _hwc(probs: np.ndarray | None) -> np.ndarray | None:
    return None if probs is None else probs.transpose(1, 2, 0)


# --- cross-tile merge ----------------------------------------------------------------------

def merge_border_pieces(p: Pieces) -> Pieces:
    """Union pieces from different tiles that share an edge (connected components of
    an STRtree 'intersects' graph; corner-only contacts stay apart, as inside a tile)."""
    n = len(p.geoms)
    if n == 0:
        return p
    geoms = np.asarray(p.geoms, dtype=object)
    owner = np.array([t[0] for t in p.tiles])
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = (a < b) & (owner[a] != owner[b])
    a, b = a[keep], b[keep]
    shared = shapely.length(shapely.intersection(geoms[a], geoms[b])) > 0
    merged, groups = union_groups(geoms, a[shared], b[shared])
    sums, counts = np.asarray(p.sums), np.asarray(p.counts)
    out = Pieces.empty()
    for geom, group in zip(merged, groups, strict=True):
        out.add(geom, float(sums[group].sum()), int(counts[group].sum()),
                sorted({k for i in group for k in p.tiles[i]}))
    return out


# --- finishing -----------------------------------------------------------------------------

def dominant_angle(coords: np.ndarray) -> tuple[float, float]:
    """(direction in radians modulo 90 degrees, rectilinearity 0..1) of a ring's
    edges, weighted by length: 1 when every edge is parallel or perpendicular to
    the direction, near 0 for a round shape."""
    e = np.diff(coords, axis=0)
    length = np.hypot(e[:, 0], e[:, 1])
    z = (length * np.exp(4j * np.arctan2(e[:, 1], e[:, 0]))).sum()
    return float(np.angle(z) / 4), float(abs(z) / max(length.sum(), 1e-12))


def _square_ring(pts: np.ndarray) -> np.ndarray | None:
    """Snap a ring (rotated so walls are near the axes) to alternating horizontal
    and vertical walls; each wall sits at the length-weighted mean of its edges."""
    e = np.roll(pts, -1, axis=0) - pts
    horiz = np.abs(e[:, 0]) >= np.abs(e[:, 1])
    changes = np.flatnonzero(horiz != np.roll(horiz, 1))
    if len(changes) < 4:
        return None
    length = np.hypot(e[:, 0], e[:, 1]) + 1e-12
    mid = pts + e / 2
    walls: list[tuple[bool, float]] = []
    for lo, hi in zip(changes, np.r_[changes[1:], changes[0] + len(pts)], strict=True):
        idx = np.arange(lo, hi) % len(pts)
        axis = 1 if horiz[lo] else 0
        walls.append((bool(horiz[lo]), float(np.average(mid[idx, axis], weights=length[idx]))))
    corners = []
    for (h, v), (_, w) in zip(walls, walls[1:] + walls[:1], strict=True):
        corners.append((w, v) if h else (v, w))
    return np.array(corners)


def orthogonalize(poly: Any, min_rectilinear: float = 0.6, max_area_change: float = 0.15) -> Any:
    """Square the corners of a building outline. Shapes that are not rectilinear
    enough (round tanks, curved walls), whose area would change too much, or that
    would become invalid are kept as they are."""
    if poly.geom_type != "Polygon" or poly.is_empty:
        return poly
    ext = np.asarray(poly.exterior.coords)
    theta, rectilinear = dominant_angle(ext)
    if rectilinear < min_rectilinear:
        return poly
    centre = ext[:-1].mean(axis=0)
    cos, sin = math.cos(theta), math.sin(theta)
    rot = np.array([[cos, -sin], [sin, cos]])
    rings = []
    for ring in [poly.exterior, *poly.interiors]:
        squared = _square_ring((np.asarray(ring.coords)[:-1] - centre) @ rot)
        if squared is None:
            return poly
        rings.append(squared @ rot.T + centre)
    out = Polygon(rings[0], rings[1:])
    if not out.is_valid or abs(out.area - poly.area) > max_area_change * poly.area:
        return poly
    return out


def finish(p: Pieces, class_name: str,
           s: VectorSettings) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Simplify, square, measure and filter pieces -> lon/lat geometries + properties."""
    if not p.geoms:
        return np.empty(0, dtype=object), []
    geoms = np.asarray(p.geoms, dtype=object)
    rows = shapely.get_y(shapely.centroid(geoms))
    tolerance = s.simplify_m / metres_per_pixel_at(rows, s.zoom, s.tile_size)
    geoms = shapely.simplify(geoms, tolerance, preserve_topology=True)
    if class_name in s.orthogonalize:
        geoms = np.array([orthogonalize(g) for g in geoms], dtype=object)
    lonlat = pixels_to_lonlat(geoms, s.zoom, s.tile_size)
    area = shapely.area(project(lonlat, WGS84, s.area_crs))
    keep = np.flatnonzero(area >= max(s.min_area_m2, 1e-9))
    props = [{"class": class_name, "score": round(p.sums[i] / p.counts[i] / 255, 4),
              "area_m2": round(float(area[i]), 2), "tiles": p.tiles[i]} for i in keep]
    return lonlat[keep], props


# --- batch files ---------------------------------------------------------------------------

_SCHEMA = pa.schema([("kind", pa.string()), ("class", pa.string()), ("wkb", pa.binary()),
                     ("sum", pa.float64()), ("count", pa.int64()), ("score", pa.float64()),
                     ("area_m2", pa.float64()), ("tiles", pa.list_(pa.string()))])


def batch_name(tile_keys: list[str], version: str) -> str:
    """Names change with the tiles, the upstream probabilities and the settings."""
    return hashlib.sha1("\n".join([version, *tile_keys]).encode()).hexdigest()[:16]


def write_pieces(uri: str, finished: dict[str, tuple[np.ndarray, list[dict[str, Any]]]],
                 border: dict[str, Pieces]) -> str:
    cols: dict[str, list[Any]] = {f.name: [] for f in _SCHEMA}
    for name, (geoms, props) in finished.items():
        for g, pr in zip(shapely.to_wkb(geoms), props, strict=True):
            _append(cols, "final", name, g, None, None, pr["score"], pr["area_m2"], pr["tiles"])
    for name, p in border.items():
        for g, sm, ct, tl in zip(shapely.to_wkb(np.asarray(p.geoms, dtype=object)), p.sums,
                                 p.counts, p.tiles, strict=True):
            _append(cols, "border", name, g, sm, ct, None, None, tl)
    with storage.atomic_open(uri, "wb") as f:
        pq.write_table(pa.table(cols, schema=_SCHEMA), f)
    return uri


def _append(cols: dict[str, list[Any]], *values: Any) -> None:
    for key, v in zip(cols, values, strict=True):
        cols[key].append(v)


def read_pieces(uri: str) -> pa.Table:
    with storage.local_file(uri) as path:
        return pq.read_table(path)


def merge_and_write(layout: RunLayout, piece_uris: list[str], s: VectorSettings) -> dict[str, int]:
    """Stream finished polygons batch by batch into predictions.geojson, then merge
    and finish the border pieces of the whole run."""
    border: dict[str, Pieces] = defaultdict(Pieces.empty)
    counts: dict[str, int] = dict.fromkeys(s.classes, 0)
    with geojson_writer(layout.predictions) as write:
        for uri in piece_uris:
            rows = read_pieces(uri).to_pylist()
            finals = [r for r in rows if r["kind"] == "final"]
            write(shapely.from_wkb([r["wkb"] for r in finals]),
                  [{"class": r["class"], "score": r["score"], "area_m2": r["area_m2"],
                    "tiles": r["tiles"]} for r in finals])
            for r in rows:
                if r["kind"] == "final":
                    counts[r["class"]] += 1
                else:
                    border[r["class"]].add(shapely.from_wkb(r["wkb"]), r["sum"], r["count"],
                                           r["tiles"])
        for name in s.classes:
            geoms, props = finish(merge_border_pieces(border[name]), name, s)
            write(geoms, props)
            counts[name] += len(props)
    return counts


@stage_task(name="vectorize-tiles")
def vectorize_batch(run_uri: str, tile_keys: list[str], settings: VectorSettings,
                    version: str) -> str:
    """Polygons of a batch of tiles -> a pieces file (finished + border pieces).
    ``version`` identifies the probabilities (model + inference settings)."""
    layout = RunLayout(run_uri)
    interior, border = vectorize_tiles(layout, [parse_tile_key(k) for k in tile_keys], settings)
    finished = {name: finish(p, name, settings) for name, p in interior.items()}
    uri = layout.vector_pieces(batch_name(tile_keys, f"{version}|{settings}"))
    return write_pieces(uri, finished, border)


@stage_task(name="merge-polygons")
def merge_batches(run_uri: str, piece_uris: list[str], settings: VectorSettings) -> dict[str, int]:
    """One predictions.geojson for the run, objects cut by tile borders made whole."""
    counts = merge_and_write(RunLayout(run_uri), piece_uris, settings)
    get_logger().info("polygons per class: %s", counts)
    return counts
