"""Align labels to the imagery: per spatial block, the shift of the labels that
best matches a first model's probabilities.

Why: OSM outlines are often drawn on other imagery and sit a few metres off the
run's source. A model trained on shifted masks learns blurred, offset edges,
and dedup against shifted OSM reports mapped buildings as missing. A shift that
is the same over a block of tiles shows as the peak of the correlation between
the probabilities and the rasterized labels, moved over a window of shifts.

Method, per block (the parent tile at ``zoom - block_zoom_offset``): for every
integer shift ``c`` within ``+-max_shift_m`` (converted to pixels at the
block's latitude), the Pearson correlation between the probabilities and the
labels moved by ``c``. The sums behind it are additive over tiles, so each
tile adds one FFT cross-correlation of its probabilities with its label window
(the tile plus ``max_shift`` px of context, rasterized from the GeoParquet):
a block of any size costs the memory of one tile. The best shift is refined to
sub-pixel by a parabola through its neighbours on each axis.

A block is *trusted* when it has ``min_support`` label pixels and a clear peak:
its score exceeds the best score on the border of the search window by
``min_prominence`` (a maximum on the border, i.e. a shift beyond the window or
no peak at all, has prominence 0). Other blocks get the global offset: the
support-weighted median of the trusted blocks, or zero when none is trusted.

Conventions: an offset is the **correction to apply to the labels**, east and
north in ground metres; in pixels of the run zoom ``dx`` is +east, ``dy`` +south.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import mercantile
import numpy as np
import shapely
from affine import Affine
from pyproj import Geod
from scipy.fft import irfft2, next_fast_len, rfft2
from shapely.geometry import box

from mapgap import grid, storage
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.aligned_labels import aligned_dir
from mapgap.tasks.geometry import MERCATOR_HALF, project
from mapgap.tasks.labels import read_labels, write_geoparquet
from mapgap.tasks.predict import read_probability, stored_tiles
from mapgap.tasks.rasterize import BatchFeatures, RasterSpec, burn

_GEOD = Geod(ellps="WGS84")


class AlignmentError(ValueError):
    """Unusable alignment input or offsets file (one line naming it)."""


@dataclass(frozen=True)
class AlignSettings:
    """What determines the offsets (and so the estimate's cache key)."""

    max_shift_m: float = 3.0
    block_zoom_offset: int = 2
    min_support: int = 500  # label pixels in a block
    min_prominence: float = 0.02  # Pearson r above the best on the window border
    subpixel: bool = True


@dataclass(frozen=True)
class BlockOffset:
    """The measured correction of one block (what the labels must move by)."""

    block: str  # tile key of the block
    dx_px: float  # pixels of the run zoom, + = east
    dy_px: float  # + = south
    east_m: float
    north_m: float
    score: float  # Pearson r of probabilities and labels at the best shift
    score_zero: float  # ... without a shift
    prominence: float  # score minus the best score on the window border
    support: int  # label pixels in the block's tiles with probabilities
    trusted: bool

    @property
    def gain(self) -> float:
        return self.score - self.score_zero


@dataclass(frozen=True)
class Offsets:
    """Every block's measurement and the global fallback of one class."""

    class_name: str
    zoom: int
    tile_size: int
    block_zoom: int
    max_shift_m: float
    blocks: tuple[BlockOffset, ...]
    global_east_m: float = 0.0
    global_north_m: float = 0.0
    trusted_blocks: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted_blocks", sum(b.trusted for b in self.blocks))

    @cached_property
    def _trusted(self) -> dict[str, BlockOffset]:
        return {b.block: b for b in self.blocks if b.trusted}

    def applied(self, block: str) -> tuple[float, float]:
        """(east, north) metres the labels of ``block`` move by: its own trusted
        measurement, else the global offset (also for blocks never measured)."""
        b = self._trusted.get(block)
        return (b.east_m, b.north_m) if b else (self.global_east_m, self.global_north_m)

    def to_json(self) -> dict[str, Any]:
        blocks = {}
        for b in self.blocks:
            east, north = self.applied(b.block)
            blocks[b.block] = {**{k: v for k, v in asdict(b).items() if k != "block"},
                               "gain": b.gain, "applied_east_m": east, "applied_north_m": north}
        return {"class": self.class_name, "zoom": self.zoom, "tile_size": self.tile_size,
                "block_zoom": self.block_zoom, "max_shift_m": self.max_shift_m,
                "global": {"east_m": self.global_east_m, "north_m": self.global_north_m,
                           "trusted_blocks": self.trusted_blocks},
                "blocks": blocks}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Offsets:
        names = [f for f in BlockOffset.__dataclass_fields__ if f != "block"]
        rows = sorted(data["blocks"].items(), key=lambda kv: _row_major(kv[0]))
        blocks = tuple(BlockOffset(block=k, **{f: v[f] for f in names}) for k, v in rows)
        return cls(data["class"], data["zoom"], data["tile_size"], data["block_zoom"],
                   data["max_shift_m"], blocks, data["global"]["east_m"],
                   data["global"]["north_m"])


def _row_major(key: str) -> tuple[int, int]:
    t = grid.parse_tile_key(key)
    return t.y, t.x


# --- correlation over shifts -------------------------------------------------------------

class ShiftScores:
    """The sums of the Pearson correlation between probabilities and labels moved
    by every shift in ``+-radius`` px, accumulated tile by tile."""

    def __init__(self, radius: int) -> None:
        n = 2 * radius + 1
        self.radius = radius
        self.prob_label = np.zeros((n, n))
        self.label = np.zeros((n, n))
        self.pixels = 0
        self.prob = 0.0
        self.prob_sq = 0.0

    def add(self, prob: np.ndarray, window: np.ndarray) -> None:
        """``prob``: float [H, W] in 0..1; ``window``: the labels (0/1) of the same
        tile with ``radius`` px of context on every side."""
        h, w = prob.shape
        n = 2 * self.radius + 1
        lab = window.astype(np.float64)
        # Circular correlation on a grid at least as large as the window has no
        # wrap-around for the shifts we keep: out[k] = sum_x prob[x] * lab[x + k],
        # the labels moved by c = radius - k.
        shape = tuple(next_fast_len(d, real=True) for d in lab.shape)
        spectrum = rfft2(lab, shape) * np.conj(rfft2(prob, shape))
        self.prob_label += irfft2(spectrum, shape)[:n, :n][::-1, ::-1]
        s = np.zeros((lab.shape[0] + 1, lab.shape[1] + 1))
        s[1:, 1:] = lab.cumsum(0).cumsum(1)
        boxes = s[h:h + n, w:w + n] - s[:n, w:w + n] - s[h:h + n, :n] + s[:n, :n]
        self.label += boxes[::-1, ::-1]
        self.pixels += h * w
        self.prob += float(prob.sum())
        self.prob_sq += float(np.square(prob).sum())

    @property
    def support(self) -> int:
        """Label pixels without a shift."""
        return int(round(self.label[self.radius, self.radius]))

    def pearson(self) -> np.ndarray:
        """r per shift, indexed [dy + radius, dx + radius]; 0 where either side is flat."""
        if not self.pixels:
            return np.zeros_like(self.label)
        n = self.pixels
        cov = self.prob_label - self.prob * self.label / n
        var = (self.prob_sq - self.prob**2 / n) * (self.label - self.label**2 / n)
        # Relative floor: FFT round-off leaves ~1e-12 where a side is constant.
        flat = var <= 1e-9 * max(1.0, n) ** 2
        return np.where(flat, 0.0, cov / np.sqrt(np.where(flat, 1.0, var)))


def _parabola_peak(left: float, centre: float, right: float) -> float:
    """Sub-pixel position (-0.5..0.5) of the maximum through three samples."""
    curvature = left - 2 * centre + right
    return float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0


def peak(scores: ShiftScores, subpixel: bool) -> tuple[float, float, float, float, float]:
    """(dx, dy, score, score at zero shift, prominence) of the best shift."""
    r, rad = scores.pearson(), scores.radius
    iy, ix = np.unravel_index(int(np.argmax(r)), r.shape)  # first maximum: deterministic
    best = float(r[iy, ix])
    border = max(r[0].max(), r[-1].max(), r[:, 0].max(), r[:, -1].max())
    prominence = max(0.0, best - float(border))
    dx, dy = float(ix - rad), float(iy - rad)
    if subpixel and prominence > 0:  # an interior maximum: both neighbours exist
        dx += _parabola_peak(r[iy, ix - 1], best, r[iy, ix + 1])
        dy += _parabola_peak(r[iy - 1, ix], best, r[iy + 1, ix])
    return dx, dy, best, float(r[rad, rad]), prominence


# --- blocks ------------------------------------------------------------------------------

def _lonlat_bbox(tile: Tile, pad_m: float) -> tuple[float, float, float, float]:
    """Lon/lat bbox of a tile plus ``pad_m`` mercator metres on every side."""
    left, bottom, right, top = grid.tile_xy_bounds(tile)
    w, s = mercantile.lnglat(left - pad_m, bottom - pad_m)
    e, n = mercantile.lnglat(right + pad_m, top + pad_m)
    return (w, s, e, n)


def label_window(feats: BatchFeatures, tile: Tile, size: int, pad: int) -> np.ndarray:
    """0/1 labels of ``tile`` with ``pad`` px of context, uint8 [size + 2 pad]^2."""
    left, bottom, right, top = grid.tile_xy_bounds(tile)
    res = (right - left) / size
    window = box(left - pad * res, bottom - pad * res, right + pad * res, top + pad * res)
    idx = np.sort(feats.tree.query(window, predicate="intersects"))
    transform = grid.tile_transform(tile, size) @ Affine.translation(-pad, -pad)
    ones = np.ones(len(idx), dtype=np.uint8)
    return burn(feats.geoms[idx], ones, transform, (size + 2 * pad, size + 2 * pad))


def estimate_block(layout: RunLayout, labels_uri: str, block: Tile, tiles: list[Tile],
                   band: int, tile_size: int, settings: AlignSettings) -> BlockOffset:
    """The correction of one block from its tiles' probabilities (``layout``'s) and
    labels."""
    zoom = tiles[0].z
    mpp = grid.metres_per_pixel(block, tile_size * 2 ** (zoom - block.z))
    radius = max(1, math.ceil(settings.max_shift_m / mpp))
    res = grid.tile_xy_bounds(tiles[0])[2] - grid.tile_xy_bounds(tiles[0])[0]
    spec = RasterSpec(classes=("label",), priorities=(1,), tile_size=tile_size, zoom=zoom)
    feats = BatchFeatures.load({"label": labels_uri}, spec,
                               _lonlat_bbox(block, (radius + 1) * res / tile_size))
    scores = ShiftScores(radius)
    for tile in tiles:
        probs = read_probability(layout, band + 1, tile)
        if probs is None:  # deleted since it was listed
            continue
        if probs.shape[0] <= band or probs.shape[1:] != (tile_size, tile_size):
            raise AlignmentError(f"{layout.probability(tile)}: expected band {band} of "
                                 f"{tile_size} px, got shape {probs.shape}")
        scores.add(probs[band] / 255.0, label_window(feats, tile, tile_size, radius))
    dx, dy, score, zero, prominence = peak(scores, settings.subpixel)
    trusted = scores.support >= settings.min_support and prominence >= settings.min_prominence
    return BlockOffset(grid.tile_key(block), dx, dy, dx * mpp, -dy * mpp, score, zero,
                       prominence, scores.support, bool(trusted))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value where the cumulative weight (in value order) reaches half."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def global_offset(blocks: tuple[BlockOffset, ...]) -> tuple[float, float]:
    """Support-weighted median (east, north) of the trusted blocks, else zero."""
    trusted = [b for b in blocks if b.trusted]
    if not trusted:
        return 0.0, 0.0
    w = np.array([b.support for b in trusted], dtype=float)
    return (weighted_median(np.array([b.east_m for b in trusted]), w),
            weighted_median(np.array([b.north_m for b in trusted]), w))


def blocks_of(tiles: list[Tile], block_zoom: int) -> Iterator[tuple[Tile, list[Tile]]]:
    """(block, its tiles) in row-major block order, tiles row-major inside."""
    groups: dict[Tile, list[Tile]] = {}
    for t in sorted(tiles, key=lambda t: (t.y, t.x)):
        groups.setdefault(grid.parent(t, block_zoom), []).append(t)
    for block in sorted(groups, key=lambda b: (b.y, b.x)):
        yield block, groups[block]


def estimate_offsets(layout: RunLayout, class_name: str, *, band: int, zoom: int,
                     tile_size: int, settings: AlignSettings,
                     probs: RunLayout | None = None) -> Offsets:
    """Per block of the probability tiles (``probs``'s, default ``layout``'s), the
    correction of ``class_name``'s labels (``layout.labels``) against probability
    band ``band``; logs each block and the global offset."""
    labels_uri = layout.labels(class_name)
    if not storage.exists(labels_uri):
        raise AlignmentError(f"{labels_uri}: no labels for class {class_name!r} "
                             "(run mapgap harvest)")
    probs = probs or layout
    tiles = list(stored_tiles(probs.probabilities, zoom))
    if not tiles:
        raise AlignmentError(f"{probs.probabilities}: no zoom-{zoom} probability tiles "
                             "(predict with a first model before aligning)")
    block_zoom = max(0, zoom - settings.block_zoom_offset)
    log = get_logger()
    blocks = []
    for block, members in blocks_of(tiles, block_zoom):
        b = estimate_block(probs, labels_uri, block, members, band, tile_size, settings)
        log.info("align %s %s: east %+.2f m north %+.2f m (%+.1f, %+.1f px), r %.3f (%+.3f "
                 "vs none), prominence %.3f, support %d px%s", class_name, b.block, b.east_m,
                 b.north_m, b.dx_px, b.dy_px, b.score, b.gain, b.prominence, b.support,
                 "" if b.trusted else ": untrusted, global offset")
        blocks.append(b)
    east, north = global_offset(tuple(blocks))
    offsets = Offsets(class_name, zoom, tile_size, block_zoom, settings.max_shift_m,
                      tuple(blocks), east, north)
    log.info("align %s: median offset east %+.2f m north %+.2f m from %d of %d blocks",
             class_name, east, north, offsets.trusted_blocks, len(blocks))
    return offsets


# --- moving geometries -------------------------------------------------------------------

def block_keys(points_mercator: np.ndarray, block_zoom: int) -> list[str]:
    """Tile key at ``block_zoom`` of each EPSG:3857 point."""
    n = 2**block_zoom
    span = 2 * MERCATOR_HALF
    x = np.clip(np.floor((shapely.get_x(points_mercator) + MERCATOR_HALF) / span * n), 0, n - 1)
    y = np.clip(np.floor((MERCATOR_HALF - shapely.get_y(points_mercator)) / span * n), 0, n - 1)
    return [f"z{block_zoom}_{int(a)}_{int(b)}" for a, b in zip(x, y, strict=True)]


def shift_geometries(geoms: np.ndarray, offsets: Offsets) -> np.ndarray:
    """Lon/lat geometries moved, each rigidly in web mercator, by the offset of the
    block holding its representative point: exactly ``(east, north)`` ground
    metres there (a geodesic step), then back to lon/lat. Empties stay empty."""
    geoms = np.asarray(geoms, dtype=object)
    out = geoms.copy()
    live = np.flatnonzero(~shapely.is_empty(geoms)) if len(geoms) else np.empty(0, int)
    if not len(live):
        return out
    merc = project(geoms[live], grid.WGS84, grid.WEB_MERCATOR)
    rep = shapely.point_on_surface(merc)
    keys = block_keys(rep, offsets.block_zoom)
    cache = {k: offsets.applied(k) for k in set(keys)}
    east, north = np.array([cache[k] for k in keys], dtype=float).T
    rep_ll = project(rep, grid.WEB_MERCATOR, grid.WGS84)
    lon, lat = shapely.get_x(rep_ll), shapely.get_y(rep_ll)
    lon2, lat2, _ = _GEOD.fwd(lon, lat, np.degrees(np.arctan2(east, north)),
                              np.hypot(east, north))
    moved = project(shapely.points(lon2, lat2), grid.WGS84, grid.WEB_MERCATOR)
    delta = shapely.get_coordinates(moved) - shapely.get_coordinates(rep)
    _, owner = shapely.get_coordinates(merc, return_index=True)
    shifted = shapely.transform(merc, lambda xy: xy + delta[owner])
    out[live] = project(shifted, grid.WEB_MERCATOR, grid.WGS84)
    return out


def shift_labels(frame: Any, offsets: Offsets) -> Any:
    """A copy of a lon/lat GeoDataFrame with every geometry moved by its block's
    offset (:func:`shift_geometries`)."""
    if frame.crs is not None and not frame.crs.equals(grid.WGS84):
        raise AlignmentError(f"labels must be in {grid.WGS84} to be shifted, got {frame.crs}")
    import geopandas as gpd

    out = frame.copy()
    out[frame.geometry.name] = gpd.GeoSeries(
        shift_geometries(frame.geometry.values.to_numpy(), offsets), index=frame.index,
        crs=grid.WGS84)
    return out


# --- offsets files -----------------------------------------------------------------------

def probabilities_layout(layout: RunLayout) -> RunLayout:
    """Where the align stage writes the reference model's probabilities (its
    ``probabilities`` folder), apart from the predict stage's."""
    return RunLayout(aligned_dir(layout))


def offsets_uri(layout: RunLayout, class_name: str) -> str:
    """Where a class's offsets live in the run dir."""
    return storage.join(aligned_dir(layout), f"{class_name}.offsets.json")


def aligned_labels_uri(layout: RunLayout, class_name: str) -> str:
    """The class's labels after the shift (GeoParquet, same columns as the harvest's)."""
    return storage.join(aligned_dir(layout), f"{class_name}.parquet")


def write_offsets(uri: str, offsets: Offsets) -> str:
    return storage.write_json(uri, offsets.to_json())


def read_offsets(uri: str) -> Offsets:
    try:
        return Offsets.from_json(storage.read_json(uri))
    except storage.StorageError as err:  # missing or not JSON: the message names the file
        raise AlignmentError(str(err)) from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise AlignmentError(f"{uri}: not a mapgap offsets file ({err!r})") from None


# --- Prefect tasks -----------------------------------------------------------------------

@stage_task(name="align-estimate")
def estimate_offsets_task(run_uri: str, class_name: str, band: int, zoom: int, tile_size: int,
                          settings: AlignSettings, inputs: str) -> str:
    """Offsets of one class -> its offsets file, from the align stage's probabilities.
    ``inputs``: digest of the labels and probabilities (cache key only)."""
    layout = RunLayout(run_uri)
    offsets = estimate_offsets(layout, class_name, band=band, zoom=zoom, tile_size=tile_size,
                               settings=settings, probs=probabilities_layout(layout))
    return write_offsets(offsets_uri(layout, class_name), offsets)


@stage_task(name="align-labels")
def shift_labels_task(run_uri: str, class_name: str, offsets: str, source_sha256: str
                      ) -> dict[str, Any]:
    """The class's labels moved by its offsets -> aligned GeoParquet; returns uri,
    sha256 and features (like a harvest summary entry), the sha256 of the labels it
    was made from (also the cache key with the offsets) and the global offset."""
    layout = RunLayout(run_uri)
    moves = read_offsets(offsets)
    frame = shift_labels(read_labels(layout.labels(class_name)), moves)
    written = write_geoparquet(frame, aligned_labels_uri(layout, class_name))
    return {**written, "source_sha256": source_sha256, "offsets": offsets,
            "global_east_m": moves.global_east_m, "global_north_m": moves.global_north_m,
            "trusted_blocks": moves.trusted_blocks, "blocks": len(moves.blocks)}
