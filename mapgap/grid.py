"""The web-mercator tile grid every stage shares (mercantile does the tile math).

Tiles are ``mercantile.Tile(x, y, z)``. Pixel <-> coordinate affines are built
from tile bounds in EPSG:3857 so that rasterio can burn and vectorize directly.
Distances in metres are measured in a local UTM zone, never in degrees.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache

import mercantile
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

Tile = mercantile.Tile
WEB_MERCATOR = "EPSG:3857"
WGS84 = "EPSG:4326"
MAX_LAT = 85.051129  # web-mercator's limit, as mercantile clamps it
_KEY = re.compile(r"^z(\d+)_(\d+)_(\d+)$")


def tile_key(tile: Tile) -> str:
    """Sample key without dots (WebDataset treats dots as extension separators)."""
    return f"z{tile.z}_{tile.x}_{tile.y}"


def parse_tile_key(key: str) -> Tile:
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not a tile key (expected z<z>_<x>_<y>): {key!r}")
    z, x, y = (int(v) for v in m.groups())
    return Tile(x, y, z)


_EDGE_EPS = 1e-9  # mercantile includes tiles that only touch the bbox edge; shrink by a hair


def tiles_for_bbox(bbox: tuple[float, float, float, float], zoom: int) -> list[Tile]:
    """All tiles touching a lon/lat bbox, in a stable (z, x, y) order."""
    w, s, e, n = bbox
    eps = _EDGE_EPS
    return sorted(mercantile.tiles(w + eps, s + eps, e - eps, n - eps, zooms=[zoom]),
                  key=lambda t: (t.z, t.x, t.y))


def bbox_tile_count(bbox: tuple[float, float, float, float], zoom: int) -> int:
    """How many tiles :func:`tiles_for_bbox` returns, from the corner tiles alone
    (a continent at zoom 18 is billions of tiles: never list them to count)."""
    w, s, e, n = bbox
    eps = _EDGE_EPS
    w, e = max(-180.0, w + eps), min(180.0, e - eps)
    s, n = max(-MAX_LAT, s + eps), min(MAX_LAT, n - eps)  # as mercantile.tiles() clamps
    if w > e or s > n:
        return 0
    top_left, bottom_right = mercantile.tile(w, n, zoom), mercantile.tile(e, s, zoom)
    return (bottom_right.x - top_left.x + 1) * (bottom_right.y - top_left.y + 1)


def geometry_tile_bound(geom: BaseGeometry, zoom: int) -> int:
    """An upper bound of ``len(tiles_for_geometry(geom, zoom))`` without listing
    tiles: the smaller of the whole bbox's count and the sum over the parts' bboxes."""
    parts = shapely.get_parts(geom)
    whole = bbox_tile_count(geom.bounds, zoom)
    return min(whole, sum(bbox_tile_count(p.bounds, zoom) for p in parts)) if len(parts) else 0


def tiles_for_geometry(geom: BaseGeometry, zoom: int) -> list[Tile]:
    """Tiles whose footprint intersects a lon/lat geometry (not just its bbox)."""
    candidates = tiles_for_bbox(geom.bounds, zoom)
    if geom.equals(box(*geom.bounds)):
        return candidates
    return [t for t in candidates if geom.intersects(box(*tile_bounds(t)))]


def tile_bounds(tile: Tile) -> tuple[float, float, float, float]:
    """Lon/lat bounds (w, s, e, n)."""
    b = mercantile.bounds(tile)
    return (b.west, b.south, b.east, b.north)


def tile_xy_bounds(tile: Tile) -> tuple[float, float, float, float]:
    """EPSG:3857 bounds (left, bottom, right, top) in metres of mercator."""
    b = mercantile.xy_bounds(tile)
    return (b.left, b.bottom, b.right, b.top)


def tile_transform(tile: Tile, size: int) -> Affine:
    """Pixel (col, row) -> EPSG:3857 affine for a ``size`` px tile."""
    left, bottom, right, top = tile_xy_bounds(tile)
    return Affine((right - left) / size, 0.0, left, 0.0, -(top - bottom) / size, top)


def pixel_to_lonlat(tile: Tile, size: int, col: float, row: float) -> tuple[float, float]:
    x, y = tile_transform(tile, size) @ (col, row)
    return mercantile.lnglat(x, y)


def lonlat_to_pixel(tile: Tile, size: int, lon: float, lat: float) -> tuple[float, float]:
    x, y = mercantile.xy(lon, lat)
    return ~tile_transform(tile, size) @ (x, y)


def neighbours(tile: Tile) -> list[Tile]:
    """The 8 surrounding tiles, row by row (x wraps around the antimeridian)."""
    n = 2**tile.z
    out = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            y = tile.y + dy
            if (dx, dy) == (0, 0) or not 0 <= y < n:
                continue
            out.append(Tile((tile.x + dx) % n, y, tile.z))
    return out


def parent(tile: Tile, zoom: int) -> Tile:
    """Ancestor at ``zoom`` (<= tile.z)."""
    if zoom > tile.z:
        raise ValueError(f"parent zoom {zoom} is below tile zoom {tile.z}")
    return mercantile.parent(tile, zoom=zoom) if zoom < tile.z else tile


def children(tile: Tile, zoom: int) -> list[Tile]:
    return sorted(mercantile.children(tile, zoom=zoom), key=lambda t: (t.y, t.x))


def metres_per_pixel(tile: Tile, size: int) -> float:
    """Ground resolution at the tile centre (mercator units shrink by cos(lat))."""
    w, s, e, n = tile_bounds(tile)
    lat = math.radians((s + n) / 2)
    left, _, right, _ = tile_xy_bounds(tile)
    return (right - left) / size * math.cos(lat)


@lru_cache(maxsize=64)
def local_metric_crs(lon: float, lat: float) -> CRS:
    """The UTM zone containing (lon, lat): a projected CRS where buffers are metres."""
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


@lru_cache(maxsize=64)
def _transformer(src: str, dst: str) -> Transformer:
    return Transformer.from_crs(src, dst, always_xy=True)


def reproject(geom: BaseGeometry, src: str | CRS, dst: str | CRS) -> BaseGeometry:
    return shapely.transform(geom, _transformer(str(src), str(dst)).transform, interleaved=False)


def to_metric(geom: BaseGeometry) -> tuple[BaseGeometry, CRS]:
    """Lon/lat geometry -> (same in local UTM metres, that CRS)."""
    c = geom.centroid if not geom.is_empty else None
    crs = local_metric_crs(round(c.x, 1) if c else 0.0, round(c.y, 1) if c else 0.0)
    return reproject(geom, WGS84, crs.to_string()), crs


def iter_batches(tiles: Iterable[Tile], size: int) -> Iterator[list[Tile]]:
    """Fixed-size batches: Prefect tasks take many tiles each, never one."""
    batch: list[Tile] = []
    for t in tiles:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
