"""The class logic every label source shares: tag filters, geometry rules,
metric buffers, AOI clipping, and the per-class GeoParquet + summary outputs.

Sources (``tasks.osm``, ``tasks.overpass``, ``tasks.vector_labels``) only turn
their raw elements into ``(kind, osm_type, osm_id, tags, geometry)`` and hand
them to a :class:`Harvester`; everything after that is one code path, so a
building from a .pbf and the same building from Overpass become the same row.

Geometry rules: polygon classes take areas (closed ways and multipolygon
relations); line classes take ways, buffered to their width **in metres** in
the local UTM zone of each feature (per-value defaults, overridden by a
feature's ``width=`` then ``lanes=`` tag); point classes take nodes buffered to
``width_m`` (a diameter). Polygons handed to a line or point class (e.g. a
vector file of already-buffered roads) are kept as they are.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import shapely
from shapely.geometry.base import BaseGeometry

from mapgap import grid, storage
from mapgap.conf.labels import ClassSpec, TagFilter
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.geometry import project

# Row groups small enough that a bbox read (GeoParquet covering column) of one
# rasterize batch skips most of a large, spatially sorted file.
ROW_GROUP_SIZE = 4096
KINDS = ("polygon", "line", "point")
_POLYGONAL = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)
_LINEAL = (shapely.GeometryType.LINESTRING, shapely.GeometryType.LINEARRING,
           shapely.GeometryType.MULTILINESTRING)
_PUNTAL = (shapely.GeometryType.POINT, shapely.GeometryType.MULTIPOINT)
_ACCEPTS = {"polygon": _POLYGONAL, "line": _POLYGONAL + _LINEAL, "point": _POLYGONAL + _PUNTAL}


class LabelError(ValueError):
    """Bad label input; the message is one line naming the file, URL or field."""


class EmptyAOIError(LabelError):
    pass


def check_aoi(aoi: BaseGeometry | None) -> BaseGeometry:
    if aoi is None or aoi.is_empty or aoi.area <= 0:
        raise EmptyAOIError(f"AOI is empty (no area): {getattr(aoi, 'wkt', aoi)!s:.120}")
    return aoi


# --- tag filters -------------------------------------------------------------------------

@dataclass(frozen=True)
class TagMatcher:
    """A compiled :class:`TagFilter` (``None`` stands for "*": any value but "no")."""

    include: tuple[tuple[str, frozenset[str] | None], ...]
    exclude: tuple[tuple[str, frozenset[str] | None], ...]

    @classmethod
    def of(cls, f: TagFilter) -> TagMatcher:
        def compile_(d: Mapping[str, Any]) -> tuple[tuple[str, frozenset[str] | None], ...]:
            return tuple((k, None if v == "*" else frozenset(v)) for k, v in d.items())

        return cls(compile_(f.include), compile_(f.exclude))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for k, _ in self.include + self.exclude))

    def match(self, tags: Any, also: tuple[str, ...] = ()) -> dict[str, str] | None:
        """The present tags among those looked at, plus the ``also`` keys (keys
        of the other include keys are read again), when ``tags`` match; else None.

        ``tags``: anything with ``.get(key)`` (dict, osmium TagList, pandas row).
        Plain loops, each exclude key read once: this runs for every candidate
        object of a country-sized file."""
        for k, allowed in self.include:
            v = tags.get(k)
            if v is not None and (v != "no" if allowed is None else v in allowed):
                break
        else:
            return None
        used = {k: v}
        for k, banned in self.exclude:
            v = used[k] if k in used else tags.get(k)
            if v is not None:
                if v != "no" if banned is None else v in banned:
                    return None
                used[k] = v
        for k in also:
            if k not in used:
                v = tags.get(k)
                if v is not None:
                    used[k] = v
        return used

    def __call__(self, tags: Any) -> bool:
        return self.match(tags) is not None


MAX_WIDTH_M = 100.0  # a width= tag above this is a typo: the class default is used
MAX_LANES = 20
_LENGTH = re.compile(r"^\s*(\d+(?:[.,]\d+)?)\s*(m|metres?|meters?|ft|feet|')?\s*$", re.I)
_FEET_INCHES = re.compile(r"^\s*(\d+)\s*'\s*(\d+(?:\.\d+)?)\s*\"\s*$")


def parse_length_m(value: str | None) -> float | None:
    """OSM length value (``7``, ``7.5 m``, ``3,5``, ``12 ft``, ``12'6"``) in metres;
    None for anything implausible, so a typo falls back to the class default."""
    if not value:
        return None
    m = _FEET_INCHES.match(value)
    if m:
        metres = int(m.group(1)) * 0.3048 + float(m.group(2)) * 0.0254
    else:
        m = _LENGTH.match(value)
        if not m:
            return None
        metres = float(m.group(1).replace(",", "."))
        if (m.group(2) or "m").lower() in ("ft", "feet", "'"):
            metres *= 0.3048
    return metres if 0 < metres <= MAX_WIDTH_M else None


def parse_lanes(value: str | None) -> int | None:
    m = re.match(r"^\s*(\d+)", value or "")
    lanes = int(m.group(1)) if m else 0
    return lanes if 0 < lanes <= MAX_LANES else None


def line_width_m(spec: ClassSpec, tags: Mapping[str, str]) -> float:
    """``width=`` tag, else ``lanes=`` x lane width, else the per-value default."""
    width = parse_length_m(tags.get("width"))
    if width is not None:
        return width
    lanes = parse_lanes(tags.get("lanes"))
    if lanes is not None:
        return lanes * spec.lane_width_m
    key = next(iter(spec.tags.include))
    return spec.widths_m.get(tags.get(key, ""), spec.width_m or 0.0)


def max_buffer_m(spec: ClassSpec) -> float:
    """The widest buffer radius a feature of this class can get: how far outside
    the AOI a line or node may lie and still reach into it (0 for polygons)."""
    if spec.geometry == "polygon":
        return 0.0
    if spec.geometry == "point":
        return (spec.width_m or 0.0) / 2
    widths = (MAX_WIDTH_M, MAX_LANES * spec.lane_width_m, spec.width_m or 0.0,
              *spec.widths_m.values())
    return max(widths) / 2


# --- collecting raw elements -------------------------------------------------------------

@dataclass
class ClassCollector:
    """Raw matched elements of one class, before any geometry work.

    ``geoms`` holds shapely geometries or WKB (bytes/hex), lon/lat.
    ``counts``: matched, skipped_geometry (wrong kind, unclosed), skipped_invalid
    (unbuildable or irreparable geometry), and per-source notes.
    """

    spec: ClassSpec
    matcher: TagMatcher = field(init=False)
    used_keys: tuple[str, ...] = field(init=False)
    osm_type: list[str] = field(default_factory=list)
    osm_id: list[int] = field(default_factory=list)
    tags: list[dict[str, str]] = field(default_factory=list)
    geoms: list[Any] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.matcher = TagMatcher.of(self.spec.tags)
        extra = ("width", "lanes") if self.spec.geometry == "line" else ()
        self.used_keys = tuple(dict.fromkeys(self.matcher.keys + extra))
        # what match() has not read once all excludes are checked
        excluded = {k for k, _ in self.matcher.exclude}
        self.extra_keys = tuple(k for k in self.used_keys if k not in excluded)

    def match(self, tags: Any) -> dict[str, str] | None:
        """The tags this class looks at (filter keys, width/lanes for lines) when
        ``tags`` pass its filter, else None."""
        return self.matcher.match(tags, self.extra_keys)

    def used(self, tags: Any) -> dict[str, str]:
        """The tags this class looks at, without filtering."""
        return {k: v for k in self.used_keys if (v := tags.get(k)) is not None}

    def add(self, osm_type: str, osm_id: int, used: dict[str, str], geom: Any) -> None:
        """``used``: from :meth:`match` or :meth:`used`."""
        self.counts["matched"] += 1
        self.osm_type.append(osm_type)
        self.osm_id.append(osm_id)
        self.tags.append(used)
        self.geoms.append(geom)

    def skip(self, reason: str) -> None:
        self.counts["matched"] += 1
        self.counts[reason] += 1


class Harvester:
    """Routes raw elements to the classes whose filter and geometry kind match."""

    def __init__(self, specs: Iterable[ClassSpec]) -> None:
        self.collectors = {s.name: ClassCollector(s) for s in specs}
        self.by_kind: dict[str, list[ClassCollector]] = {k: [] for k in KINDS}
        for c in self.collectors.values():
            self.by_kind[c.spec.geometry].append(c)
        # pre-bound, for the hot loop of a country-sized file
        self._matchers = {k: [(c, c.matcher.match, c.extra_keys) for c in cs]
                          for k, cs in self.by_kind.items()}
        self.warnings: list[str] = []

    @property
    def include_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for c in self.collectors.values()
                                   for k in c.spec.tags.include))

    def kinds(self) -> set[str]:
        return {k for k, cs in self.by_kind.items() if cs}

    def matching(self, kind: str, tags: Any) -> list[tuple[ClassCollector, dict[str, str]]]:
        """(class, its used tags) for each class of ``kind`` whose filter passes."""
        out = []
        for c, match, keys in self._matchers[kind]:
            used = match(tags, keys)
            if used is not None:
                out.append((c, used))
        return out

    def warn(self, message: str) -> None:
        get_logger().warning(message)
        self.warnings.append(message)

    def finish(self, aoi: BaseGeometry) -> HarvestResult:
        frames = {}
        counts = {}
        for name, col in self.collectors.items():
            frames[name], counts[name] = finalize(col, aoi)
            if counts[name]["features"] == 0:
                self.warn(f"class {name!r}: no features inside the AOI")
        return HarvestResult(frames, counts, list(self.warnings))


@dataclass
class HarvestResult:
    # class name -> GeoDataFrame (EPSG:4326): class, osm_id, osm_type, tags (JSON of
    # the tags the class looks at), width_m (buffer width, NaN for areas), geometry
    frames: dict[str, Any]
    counts: dict[str, dict[str, int]]
    warnings: list[str]


# --- geometry ------------------------------------------------------------------------------

def buffer_metres(geoms: np.ndarray, radius_m: np.ndarray) -> np.ndarray:
    """Buffer lon/lat geometries by radii in metres, each in its own UTM zone."""
    out = np.empty(len(geoms), dtype=object)
    if len(geoms) == 0:
        return out
    bounds = shapely.bounds(geoms)
    centre = (bounds[:, :2] + bounds[:, 2:]) / 2
    zone = (np.floor((centre[:, 0] + 180) / 6).astype(int) % 60) * 2 + (centre[:, 1] >= 0)
    for z in np.unique(zone):
        idx = np.flatnonzero(zone == z)
        crs = grid.local_metric_crs(float(centre[idx[0], 0]), float(centre[idx[0], 1]))
        metric = project(geoms[idx], grid.WGS84, crs)
        buffered = shapely.buffer(metric, radius_m[idx], quad_segs=4)
        out[idx] = project(buffered, crs, grid.WGS84)
    return out


def polygonal_part(geom: BaseGeometry) -> BaseGeometry | None:
    """The (multi)polygon inside a make_valid/intersection result, or None."""
    if shapely.get_type_id(geom) in _POLYGONAL:
        return None if geom.is_empty else geom
    polys = [p for p in shapely.get_parts(geom) if shapely.get_type_id(p) in _POLYGONAL]
    if not polys:
        return None
    merged = shapely.union_all(polys)
    return None if merged.is_empty else merged


def _as_geometries(raw: list[Any]) -> np.ndarray:
    if raw and isinstance(raw[0], str):  # hex WKB (osmium): bytes parse ~4x faster
        raw = [bytes.fromhex(h) for h in raw]
    if raw and not isinstance(raw[0], BaseGeometry):
        return shapely.from_wkb(np.asarray(raw, dtype=object))
    arr = np.empty(len(raw), dtype=object)
    arr[:] = raw
    return arr


def _single_parts(geoms: np.ndarray) -> np.ndarray:
    """MultiPolygon with one part -> Polygon (what every consumer expects)."""
    single = (shapely.get_type_id(geoms) == shapely.GeometryType.MULTIPOLYGON) & (
        shapely.get_num_geometries(geoms) == 1)
    geoms[single] = shapely.get_geometry(geoms[single], 0)
    return geoms


def finalize(col: ClassCollector, aoi: BaseGeometry) -> tuple[Any, dict[str, int]]:
    """Geometry rules, repair, metric buffers and AOI clip for one class."""
    import geopandas as gpd

    spec = col.spec
    counts = Counter({k: 0 for k in ("matched", "features", "repaired", "skipped_invalid",
                                     "skipped_geometry", "outside_aoi", "clipped")})
    counts.update(col.counts)
    geoms = _as_geometries(col.geoms)
    keep = np.ones(len(geoms), dtype=bool)
    types = shapely.get_type_id(geoms)

    bad_kind = ~np.isin(types, _ACCEPTS[spec.geometry]) | shapely.is_empty(geoms)
    counts["skipped_geometry"] += int(bad_kind.sum())
    keep &= ~bad_kind

    polygonal = np.isin(types, _POLYGONAL) & keep
    invalid = np.flatnonzero(polygonal & ~shapely.is_valid(geoms))
    for i, fixed in zip(invalid, shapely.make_valid(geoms[invalid]), strict=True):
        geoms[i] = polygonal_part(fixed)
        keep[i] = geoms[i] is not None
    counts["repaired"] += int(keep[invalid].sum())
    counts["skipped_invalid"] += int((~keep[invalid]).sum())

    widths = np.full(len(geoms), np.nan)
    to_buffer = np.flatnonzero(keep & ~polygonal)
    if spec.geometry == "line":
        widths[to_buffer] = [line_width_m(spec, col.tags[i]) for i in to_buffer]
    elif spec.geometry == "point":
        widths[to_buffer] = spec.width_m
    geoms[to_buffer] = buffer_metres(geoms[to_buffer], widths[to_buffer] / 2)

    idx = np.flatnonzero(keep)
    shapely.prepare(aoi)
    hit = shapely.intersects(aoi, geoms[idx])
    crossing = idx[hit & ~shapely.contains_properly(aoi, geoms[idx])]
    keep[idx[~hit]] = False
    for i, part in zip(crossing, shapely.intersection(geoms[crossing], aoi), strict=True):
        geoms[i] = polygonal_part(part)
        keep[i] = geoms[i] is not None
    counts["clipped"] += int(keep[crossing].sum())
    counts["outside_aoi"] += int((~hit).sum()) + int((~keep[crossing]).sum())

    idx = np.flatnonzero(keep)
    counts["features"] = len(idx)
    frame = gpd.GeoDataFrame(
        {
            "class": np.full(len(idx), spec.name, dtype=object),
            "osm_id": np.asarray(col.osm_id, dtype=np.int64)[idx],
            "osm_type": np.asarray(col.osm_type, dtype=object)[idx],
            # orjson (a Prefect dependency): 10x json.dumps on 100k small dicts
            "tags": [orjson.dumps(col.tags[i]).decode() for i in idx],
            "width_m": widths[idx],
        },
        geometry=_single_parts(geoms[idx]),
        crs=grid.WGS84,
    )
    return _spatially_sorted(frame), dict(counts)


def _spatially_sorted(frame: Any) -> Any:
    """Hilbert order (ties by type and id): deterministic bytes, and nearby features
    share row groups so bbox reads of one tile batch touch few of them."""
    if len(frame) == 0:
        return frame
    order = frame.assign(_h=frame.geometry.hilbert_distance(), _t=frame.osm_type)
    order = order.sort_values(["_h", "_t", "osm_id"], kind="stable")
    return frame.loc[order.index].reset_index(drop=True)


# --- outputs -------------------------------------------------------------------------------

def write_geoparquet(frame: Any, uri: str) -> dict[str, Any]:
    """Atomic GeoParquet write with a bbox covering column; returns uri + content hash
    (the hash goes into downstream cache keys, so re-harvested labels re-rasterize)."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False, write_covering_bbox=True, row_group_size=ROW_GROUP_SIZE)
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    return {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "features": len(frame)}


def read_labels(uri: str, bbox: tuple[float, float, float, float] | None = None) -> Any:
    """One class's labels, optionally only the row groups/rows touching a lon/lat bbox."""
    import geopandas as gpd
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    return gpd.read_parquet(path, filesystem=fs, bbox=bbox)


def write_outputs(result: HarvestResult, layout: RunLayout, source: str) -> dict[str, Any]:
    """Every class's GeoParquet, then the summary (written last: it marks completion)."""
    classes = {}
    for name, frame in result.frames.items():
        classes[name] = {**write_geoparquet(frame, layout.labels(name)), **result.counts[name]}
    summary = {"source": source, "classes": classes, "warnings": result.warnings}
    storage.write_json(layout.labels_summary, summary)
    return summary


def aoi_to_wkb(aoi: BaseGeometry) -> str:
    """Hashable, exact task input for an AOI."""
    return shapely.to_wkb(aoi, hex=True)


def aoi_from_wkb(hex_wkb: str) -> BaseGeometry:
    return shapely.from_wkb(hex_wkb)


def source_fingerprint(uri: str, class_names: Iterable[str] = ()) -> str:
    """Size + modification time (or ETag) of the source file(s): part of the
    harvest cache key, so replacing the .pbf at the same path re-harvests. A
    folder counts all its files; a "{class}" template every class's file."""
    from fsspec.core import url_to_fs

    uris = [uri.replace("{class}", c) for c in class_names] if "{class}" in uri else [uri]
    parts = []
    for u in uris:
        fs, path = url_to_fs(u)
        if not fs.exists(path):
            parts.append(f"{u}:missing")
            continue
        # a file's own info: find() on an HTTP file would download it to look for links
        found = {path: fs.info(path)} if fs.isfile(path) else fs.find(path, detail=True,
                                                                      withdirs=False)
        for name, info in sorted(found.items()):
            stamp = [info.get(k) for k in ("size", "mtime", "ETag", "LastModified",
                                           "Last-Modified", "created")]
            parts.append(f"{name}:{stamp}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
