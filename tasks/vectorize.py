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

Touching objects (classes with ``separate_instances`` and a model with a
"distance" band, the predicted instance distance of :mod:`mapgap.tasks.rasterize`):
seeds are pixels predicted at least ``seed_px`` inside; a connected component
of the cleaned mask holding two or more seed components is split by a
watershed on the predicted distance, so every pixel goes to one instance and
neighbouring instances share exact edges.
The watershed runs on the tile plus ``split_context_px`` of context from the
neighbours, so both tiles at a border see the same seeds, and it is a flood
whose every step looks only at a pixel's neighbours (see :func:`flood`), so
both tiles draw the same split line where their windows overlap.

Merging such pieces across tiles must not fuse two houses whose wall lies on
or crosses a tile border, so an instance piece records its *continuing
edges*: the stretches of its tile edge where its own window labels the pixel
across the border as the same instance. Two pieces from different tiles are
merged only where both claim the shared stretch (so a wall on the border,
where each side sees another instance across, never merges), and only when
that agreed length is at least half the continuing edge the smaller of them
has along that border: a split line one pixel off between the two windows
leaves a one-pixel agreement with the wrong neighbour, which this rejects.
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

DEFAULT_THRESHOLD = 0.5  # without a calibrated model or a configured value
DEFAULT_MIN_AREA_M2 = 10.0
DISTANCE = "distance"  # band name of the predicted instance distance (model.band_names)
MERGE_SHARE = 0.5  # agreed continuing edge / the smaller piece's continuing edge there


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
    distance_band: int | None = None  # index of the "distance" band in the PNGs
    instance_classes: tuple[str, ...] = ()  # classes split into touching instances
    sdt_clip_px: int = 16  # the distance encoding: 128 + 127 * d / clip_px
    seed_px: float = 2.0  # seeds: pixels predicted at least this deep inside
    split_context_px: int = 64  # context the watershed sees beyond each tile border
    # (mean probability, calibrated confidence) knots from the model's calibration:
    # a polygon's ``score`` is its confidence; without knots, its mean probability.
    confidence: tuple[tuple[float, float], ...] = ()

    @classmethod
    def from_config(cls, cfg: Any, classes: list[str],
                    bands: list[str] | None = None) -> VectorSettings:
        """``bands``: the probability PNGs' bands (predict_meta.json "bands");
        default: the classes only (no distance band)."""
        c = cfg.aoi_geometry.centroid
        mpp = pixel_resolution(cfg.zoom, cfg.tile_size) * math.cos(math.radians(c.y))
        inf = cfg.inference
        square = tuple(n for n in classes if inf.orthogonalize and _is_building(cfg, n))
        names = {k.name for k in cfg.classes}
        bands = list(classes) if bands is None else list(bands)
        return cls(classes=tuple(classes), zoom=cfg.zoom, tile_size=cfg.tile_size,
                   threshold=DEFAULT_THRESHOLD if inf.threshold is None else inf.threshold,
                   open_px=kernel_px(inf.open_m, mpp), close_px=kernel_px(inf.close_m, mpp),
                   simplify_m=inf.simplify_m,
                   min_area_m2=DEFAULT_MIN_AREA_M2 if inf.min_area_m2 is None
                   else inf.min_area_m2, orthogonalize=square,
                   area_crs=equal_area_proj(c.x, c.y), tile_cache=inf.tile_cache,
                   distance_band=bands.index(DISTANCE) if DISTANCE in bands else None,
                   instance_classes=tuple(n for n in classes if n in names
                                          and cfg.class_named(n).separate_instances),
                   sdt_clip_px=cfg.labels.signed_distance_clip_px)

    @property
    def split_classes(self) -> tuple[str, ...]:
        """Classes split into instances: only with a distance band to split along."""
        return self.instance_classes if self.distance_band is not None else ()

    @property
    def n_bands(self) -> int:
        """Bands to decode from each probability PNG."""
        if self.distance_band is None:
            return len(self.classes)
        return max(len(self.classes), self.distance_band + 1)

    @property
    def seed_level(self) -> float:
        """``seed_px`` in the uint8 distance encoding."""
        return 128 + 127 * self.seed_px / self.sdt_clip_px

    @property
    def margin(self) -> int:
        """Context an open followed by a close needs to match the whole mosaic,
        plus the watershed's context when instances are split."""
        filters = (self.open_px - 1) + (self.close_px - 1)
        return filters + (self.split_context_px if self.split_classes else 0)


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
    # Instance pieces only: each piece's continuing edges (lines on its tile's
    # border, see the module docstring); None for a class that is not split.
    open: list[Any] | None = None

    @classmethod
    def empty(cls, instances: bool = False) -> Pieces:
        return cls([], [], [], [], [] if instances else None)

    def add(self, geom: Any, total: float, count: int, tiles: list[str],
            edges: Any = None) -> None:
        self.geoms.append(geom)
        self.sums.append(total)
        self.counts.append(count)
        self.tiles.append(tiles)
        if self.open is not None:
            self.open.append(edges if edges is not None else shapely.MultiLineString())

    def extend(self, other: Pieces) -> None:
        self.geoms += other.geoms
        self.sums += other.sums
        self.counts += other.counts
        self.tiles += other.tiles
        if self.open is not None and other.open is not None:
            self.open += other.open


def clean_mask(prob: np.ndarray, s: VectorSettings) -> np.ndarray:
    mask = (prob >= s.threshold * 255).astype(np.uint8)
    for op, d in ((cv2.MORPH_OPEN, s.open_px), (cv2.MORPH_CLOSE, s.close_px)):
        if d > 1:
            mask = cv2.morphologyEx(mask, op, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d)))
    return mask


def tile_pieces(tile: Tile, prob: np.ndarray, labels: np.ndarray,
                edges: dict[int, Any] | None = None) -> tuple[Pieces, Pieces]:
    """(interior, border) pieces of one tile: ``labels`` holds one id per
    4-connected piece (0 = background); ``edges``: continuing edges by id, for
    an instance class (its border pieces then carry them)."""
    n = int(labels.max(initial=0))
    interior, border = Pieces.empty(), Pieces.empty(instances=edges is not None)
    if n == 0:
        return interior, border
    sums = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    edge = set(np.unique(np.concatenate(
        [labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    size = labels.shape[0]
    origin = Affine.translation(tile.x * size, tile.y * size)
    key = tile_key(tile)
    for geom, value in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=4,
                              transform=origin):
        i = int(value)
        if i in edge:
            border.add(shape(geom), float(sums[i]), int(counts[i]), [key],
                       None if edges is None else edges.get(i))
        else:
            interior.add(shape(geom), float(sums[i]), int(counts[i]), [key])
    return interior, border


# --- instances -----------------------------------------------------------------------------

def split_instances(mask: np.ndarray, distance: np.ndarray, s: VectorSettings) -> np.ndarray:
    """Instance ids (0 = background) of a window's cleaned mask: components with
    two or more seeds split by a watershed on the predicted distance, the others
    kept whole."""
    comps, n = ndimage.label(mask)
    seeds, k = ndimage.label((mask > 0) & (distance >= s.seed_level))
    if k < 2:
        return comps
    seed_comp = np.zeros(k + 1, dtype=np.int64)
    seed_comp[seeds.ravel()] = comps.ravel()
    split = np.bincount(seed_comp[1:], minlength=n + 1) >= 2
    split[0] = False
    inside = split[comps]
    if not inside.any():
        return comps
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    out = comps.astype(np.int32)
    flooded = flood(np.where(inside, seeds, 0)[box], distance[box], inside[box], s)
    out[box][inside[box]] = flooded[inside[box]] + n
    return out


def flood(seeds: np.ndarray, distance: np.ndarray, inside: np.ndarray,
          s: VectorSettings) -> np.ndarray:
    """Watershed by immersion: the water level falls from the seed level in
    half-pixel steps of the distance encoding; at each level every labelled
    region grows, one pixel per pass, into the unlabelled pixels at or above
    it. A pixel reached by two regions in the same pass joins its deepest
    labelled 4-neighbour (ties: the first of up, down, left, right). Every step
    looks only at a pixel's neighbours (no queue order, unlike OpenCV's or
    scipy's watersheds), so windows that share a strip split it alike."""
    labels = seeds.astype(np.int32)
    depth = np.where(inside, distance.astype(np.int16), -1)
    step = max(1, round(127 / s.sdt_clip_px / 2))
    for level in range(int(s.seed_level), -step, -step):
        todo = inside & (depth >= level) & (labels == 0)
        while todo.any():
            grown = _deepest_neighbour(labels, depth, todo)
            if not grown.any():
                break
            labels = np.where(grown > 0, grown, labels)
            todo &= grown == 0
    return labels


_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _deepest_neighbour(labels: np.ndarray, depth: np.ndarray, todo: np.ndarray) -> np.ndarray:
    """For each ``todo`` pixel the label of its deepest labelled 4-neighbour (0: none)."""
    h, w = labels.shape
    padded = np.pad(labels, 1)
    padded_depth = np.pad(np.where(labels > 0, depth, -1), 1, constant_values=-1)
    best = np.zeros_like(labels)
    best_depth = np.full(labels.shape, -1, dtype=np.int16)
    for dr, dc in _STEPS:
        near = padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
        near_depth = padded_depth[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
        better = todo & (near > 0) & (near_depth > best_depth)
        best[better] = near[better]
        best_depth[better] = near_depth[better]
    return best


def connected_parts(instances: np.ndarray) -> np.ndarray:
    """One id per 4-connected part of each instance (a tile's crop can cut one in two)."""
    out = np.zeros(instances.shape, dtype=np.int32)
    n = 0
    for i, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        part, m = ndimage.label(instances[box] == i)
        out[box][part > 0] = part[part > 0] + n
        n += m
    return out


def continuing_edges(instances: np.ndarray, parts: np.ndarray, m: int,
                     origin: tuple[int, int]) -> dict[int, Any]:
    """Per part id: the stretches of the tile edge where the window labels the
    pixel across the border as the same instance (lines in global pixels).
    ``instances``: the window's ids; ``parts``: the tile crop's part ids;
    ``origin``: the tile's top-left (col, row) in global pixels."""
    size = parts.shape[0]
    inner = slice(m, m + size)
    x0, y0 = origin
    sides = [  # (inside ids, outside ids, part ids, segment from offsets a..b)
        (instances[m, inner], instances[m - 1, inner], parts[0],
         lambda a, b: ((x0 + a, y0), (x0 + b, y0))),
        (instances[m + size - 1, inner], instances[m + size, inner], parts[-1],
         lambda a, b: ((x0 + a, y0 + size), (x0 + b, y0 + size))),
        (instances[inner, m], instances[inner, m - 1], parts[:, 0],
         lambda a, b: ((x0, y0 + a), (x0, y0 + b))),
        (instances[inner, m + size - 1], instances[inner, m + size], parts[:, -1],
         lambda a, b: ((x0 + size, y0 + a), (x0 + size, y0 + b))),
    ]
    lines: dict[int, list[Any]] = defaultdict(list)
    for inside, outside, ids, segment in sides:
        run = np.r_[0, np.where((inside == outside) & (inside > 0), ids, 0), 0]
        bounds = np.flatnonzero(run[1:] != run[:-1])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if run[a + 1]:
                lines[int(run[a + 1])].append(shapely.LineString(segment(int(a), int(b))))
    return {i: shapely.MultiLineString(v) for i, v in lines.items()}


def vectorize_tiles(layout: RunLayout, tiles: list[Tile],
                    s: VectorSettings) -> tuple[dict[str, Pieces], dict[str, Pieces]]:
    """Components per class of every tile, split into (interior, border)."""
    ordered = row_major(tiles)
    cache = TileCache(lambda t: _hwc(read_probability(layout, s.n_bands, t)),
                      cache_capacity(ordered, s.tile_cache))
    m, size = s.margin, s.tile_size
    crop = (slice(m, m + size), slice(m, m + size))
    interior = {name: Pieces.empty() for name in s.classes}
    border = {name: Pieces.empty(instances=name in s.split_classes) for name in s.classes}
    for tile in ordered:
        window = with_margin(tile, cache, m)
        origin = (tile.x * size, tile.y * size)
        for c, name in enumerate(s.classes):
            prob = window[..., c]
            mask = clean_mask(prob, s)
            edges = None
            if name in s.split_classes:
                instances = split_instances(mask, window[..., s.distance_band], s)
                labels = connected_parts(instances[crop])
                edges = continuing_edges(instances, labels, m, origin)
            else:
                labels = ndimage.label(mask[crop])[0]
            inner, edge = tile_pieces(tile, prob[crop], labels, edges)
            interior[name].extend(inner)
            border[name].extend(edge)
    return interior, border


def _hwc(probs: np.ndarray | None) -> np.ndarray | None:
    return None if probs is None else probs.transpose(1, 2, 0)


# --- cross-tile merge ----------------------------------------------------------------------

def merge_border_pieces(p: Pieces) -> Pieces:
    """Union pieces from different tiles that share an edge (connected components of
    an STRtree 'intersects' graph; corner-only contacts stay apart, as inside a tile).
    Instance pieces (``p.open``) must also agree on their continuing edges."""
    n = len(p.geoms)
    if n == 0:
        return p
    geoms = np.asarray(p.geoms, dtype=object)
    owner = np.array([t[0] for t in p.tiles])
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = (a < b) & (owner[a] != owner[b])
    a, b = a[keep], b[keep]
    contact = shapely.intersection(geoms[a], geoms[b])
    shared = shapely.length(contact) > 0
    if p.open is not None:
        shared[shared] = _agree(geoms, np.asarray(p.open, dtype=object), a[shared],
                                b[shared], contact[shared])
    merged, groups = union_groups(geoms, a[shared], b[shared])
    sums, counts = np.asarray(p.sums), np.asarray(p.counts)
    out = Pieces.empty()
    for geom, group in zip(merged, groups, strict=True):
        out.add(geom, float(sums[group].sum()), int(counts[group].sum()),
                sorted({k for i in group for k in p.tiles[i]}))
    return out


def _agree(geoms: np.ndarray, edges: np.ndarray, a: np.ndarray, b: np.ndarray,
           contact: np.ndarray) -> np.ndarray:
    """Pairs of instance pieces (touching across a tile border along ``contact``)
    that are one instance: both claim a stretch of the border as continuing, at
    least MERGE_SHARE of the smaller claim either makes along that border line."""
    x0, y0, x1, y1 = shapely.bounds(contact).T
    lo = np.minimum(shapely.bounds(geoms[a]), shapely.bounds(geoms[b]))
    hi = np.maximum(shapely.bounds(geoms[a]), shapely.bounds(geoms[b]))
    vertical = x0 == x1  # the border between the two tiles is a vertical line
    line = shapely.linestrings(np.stack([
        np.where(vertical, x0, np.minimum(lo[:, 0], x0)),
        np.where(vertical, np.minimum(lo[:, 1], y0), y0),
        np.where(vertical, x0, np.maximum(hi[:, 2], x1)),
        np.where(vertical, np.maximum(hi[:, 3], y1), y0)], axis=1).reshape(-1, 2, 2))
    agreed = shapely.length(shapely.intersection(edges[a], edges[b]))
    claims = np.minimum(shapely.length(shapely.intersection(edges[a], line)),
                        shapely.length(shapely.intersection(edges[b], line)))
    return (agreed > 0) & (agreed >= MERGE_SHARE * claims)


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
    mean = np.asarray(p.sums)[keep] / np.asarray(p.counts)[keep] / 255
    score = np.interp(mean, *zip(*s.confidence, strict=True)) if s.confidence else mean
    props = [{"class": class_name, "score": round(float(score[j]), 4),
              "area_m2": round(float(area[i]), 2), "tiles": p.tiles[i]}
             for j, i in enumerate(keep)]
    return lonlat[keep], props


# --- batch files ---------------------------------------------------------------------------

_SCHEMA = pa.schema([("kind", pa.string()), ("class", pa.string()), ("wkb", pa.binary()),
                     ("sum", pa.float64()), ("count", pa.int64()), ("score", pa.float64()),
                     ("area_m2", pa.float64()), ("tiles", pa.list_(pa.string())),
                     ("open", pa.binary())])  # continuing edges of instance border pieces


def batch_name(tile_keys: list[str], version: str) -> str:
    """Names change with the tiles, the upstream probabilities and the settings."""
    return hashlib.sha1("\n".join([version, *tile_keys]).encode()).hexdigest()[:16]


def write_pieces(uri: str, finished: dict[str, tuple[np.ndarray, list[dict[str, Any]]]],
                 border: dict[str, Pieces]) -> str:
    cols: dict[str, list[Any]] = {f.name: [] for f in _SCHEMA}
    for name, (geoms, props) in finished.items():
        for g, pr in zip(shapely.to_wkb(geoms), props, strict=True):
            _append(cols, "final", name, g, None, None, pr["score"], pr["area_m2"], pr["tiles"],
                    None)
    for name, p in border.items():
        edges = [None] * len(p.geoms) if p.open is None else \
            shapely.to_wkb(np.asarray(p.open, dtype=object)).tolist()
        for g, sm, ct, tl, op in zip(shapely.to_wkb(np.asarray(p.geoms, dtype=object)), p.sums,
                                     p.counts, p.tiles, edges, strict=True):
            _append(cols, "border", name, g, sm, ct, None, None, tl, op)
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
    border = {name: Pieces.empty(instances=name in s.split_classes) for name in s.classes}
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
                    edges = None if r["open"] is None else shapely.from_wkb(r["open"])
                    border[r["class"]].add(shapely.from_wkb(r["wkb"]), r["sum"], r["count"],
                                           r["tiles"], edges)
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
