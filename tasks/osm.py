"""Harvest labels from a .osm.pbf / .osm / .osm.bz2 file with pyosmium.

One streaming pass for all classes (after a quick relations-only pass). osmium
does the heavy lifting in C++: node locations, multipolygon assembly of the
wanted relations, and tag pre-filtering (``KeyFilter`` on the classes' include
keys), so only candidate objects ever reach Python. A candidate whose bbox
misses the AOI's is only counted (``outside_aoi``), so what is kept in memory
follows the AOI, not the file. Exact matching and every geometry rule then run
in the shared :mod:`mapgap.tasks.labels` code path.

Nothing is silently lost: a matching way whose nodes are missing from the
extract, or a multipolygon relation osmium cannot assemble (missing members,
broken rings) counts as ``skipped_invalid``; a matching way of a polygon class
that is not closed counts as ``skipped_geometry``; a self-intersecting ring is
repaired (``repaired``).
"""

from __future__ import annotations

import contextlib
import math
import struct
from pathlib import Path
from typing import Any

import osmium
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from mapgap import storage
from mapgap.conf.labels import ClassSpec
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.tasks.labels import (
    ClassCollector,
    Harvester,
    HarvestResult,
    LabelError,
    aoi_from_wkb,
    check_aoi,
    max_buffer_m,
    write_outputs,
)

AREA_RELATION_TYPES = ("multipolygon", "boundary")
Bounds = tuple[float, float, float, float]  # west, south, east, north


class OsmFileError(LabelError):
    """The file cannot be read as OSM data (truncated, not OSM, unknown format)."""


def _fail(path: str, err: Exception) -> OsmFileError:
    detail = " ".join(str(err).split()) or type(err).__name__
    return OsmFileError(f"{path}: not a readable OSM file ({detail})")


def file_bbox(path: Path, name: str) -> BaseGeometry | None:
    """The bounding box announced in the file header (None when absent)."""
    try:
        b = osmium.io.Reader(str(path), osmium.osm.NOTHING).header().box()
    except RuntimeError as err:
        raise _fail(name, err) from None
    if not b.valid():
        return None
    return box(b.bottom_left.lon, b.bottom_left.lat, b.top_right.lon, b.top_right.lat)


def harvest_osm(source: str, specs: list[ClassSpec], aoi: BaseGeometry) -> HarvestResult:
    """All classes from one OSM file, clipped to ``aoi`` (lon/lat)."""
    aoi = check_aoi(aoi)
    harvester = Harvester(specs)
    with storage.local_file(source) as path:
        extent = file_bbox(path, source)
        if extent is not None and not extent.intersects(aoi):
            harvester.warn(f"{source}: AOI {tuple(round(v, 5) for v in aoi.bounds)} is outside"
                           f" the file's extent {tuple(round(v, 5) for v in extent.bounds)}")
            return harvester.finish(aoi)
        # an AOI covering the whole file needs no bbox check per object
        bounds = None if extent is not None and aoi.contains(extent) else search_bounds(
            aoi, max(max_buffer_m(s) for s in specs))
        try:
            collect(path, harvester, bounds)
        except RuntimeError as err:
            raise _fail(source, err) from None
    return harvester.finish(aoi)


def search_bounds(aoi: BaseGeometry, margin_m: float) -> Bounds:
    """The AOI's bbox grown by ``margin_m`` (the widest buffer a class may give
    a feature), so a road just outside whose buffer reaches in is kept."""
    w, s, e, n = aoi.bounds
    dlat = margin_m / 110_000  # a degree of latitude is at least 110.5 km
    dlon = dlat / max(math.cos(math.radians(max(abs(s), abs(n)))), 0.01)
    return w - dlon, s - dlat, e + dlon, n + dlat


def _line_bounds(line_hex: str) -> Bounds:
    """The bbox of a linestring (hex WKB from osmium), read straight from the
    WKB's coordinates: no geometry is built."""
    line = bytes.fromhex(line_hex)  # 1 byte order, 4 type, 4 count, 16 per point
    xy = struct.unpack_from(("<" if line[0] == 1 else ">") + f"{(len(line) - 9) // 8}d", line, 9)
    xs, ys = xy[0::2], xy[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _overlap(a: Bounds, b: Bounds) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _outside(cols: list[tuple[ClassCollector, dict[str, str]]]) -> None:
    for c, _ in cols:
        c.skip("outside_aoi")


def collect(path: Path, harvester: Harvester, bounds: Bounds | None) -> None:
    """One pass over the file into the harvester's collectors. With ``bounds``
    (lon/lat), objects whose bbox misses them are only counted (outside_aoi),
    so memory follows the AOI, not the file."""
    kinds = harvester.kinds()
    keys = harvester.include_keys
    factory = osmium.geom.WKBFactory()
    areas = _Areas(harvester, factory, bounds)
    if "polygon" in kinds:
        areas.find_relations(path)

    entities = osmium.osm.NOTHING
    if "point" in kinds:
        entities |= osmium.osm.NODE
    if kinds & {"line", "polygon"}:
        entities |= osmium.osm.WAY
    fp = osmium.FileProcessor(str(path)).with_locations()
    if areas.relation_ids:
        # Assemble only the wanted relations, and let no area built from a closed
        # way reach Python: ways are turned into polygons from their own ring.
        entities |= osmium.osm.AREA
        fp.with_areas(osmium.filter.IdFilter(areas.relation_ids))
        only_relation_areas = osmium.filter.IdFilter([2 * r + 1 for r in areas.relation_ids])
        only_relation_areas.enable_for(osmium.osm.AREA)
        fp.with_filter(only_relation_areas)
    fp.with_filter(osmium.filter.EntityFilter(entities))
    fp.with_filter(osmium.filter.KeyFilter(*keys))

    has_polygons, has_lines = "polygon" in kinds, "line" in kinds
    for obj in fp:
        t = obj.type_str()
        if t == "w":
            tags = obj.tags
            polys = harvester.matching("polygon", tags) if has_polygons else None
            lines = harvester.matching("line", tags) if has_lines else None
            if polys or lines:
                try:
                    wkb = factory.create_linestring(obj)
                except (osmium.InvalidLocationError, RuntimeError):
                    wkb = None  # nodes missing from the extract, or one location only
                if bounds and wkb is not None and not _overlap(_line_bounds(wkb), bounds):
                    _outside((polys or []) + (lines or []))
                    continue
                if polys:
                    areas.way(obj.id, wkb, polys)
                for c, used in lines or ():
                    if wkb is None:
                        c.skip("skipped_invalid")
                    else:
                        c.add("way", obj.id, used, wkb)
        elif t == "a":
            areas.area(obj)
        elif t == "n":
            cols = harvester.matching("point", obj.tags)
            loc = obj.location
            if not (cols and loc.valid()):
                continue
            if bounds and not _overlap((loc.lon, loc.lat, loc.lon, loc.lat), bounds):
                _outside(cols)
                continue
            wkb = factory.create_point(obj)
            for c, used in cols:
                c.add("node", obj.id, used, wkb)
    areas.finish()


class _Areas:
    """Polygons of the polygon classes: closed ways from their own ring, and
    multipolygon relations assembled by osmium.

    Relations are found first (a relations-only pass), so osmium assembles only
    those, and so a relation it cannot assemble (missing members, broken rings)
    is counted as ``skipped_invalid``. A way's ring becomes a polygon even when it
    self-intersects: the shared path repairs it with make_valid, exactly as for
    Overpass data.
    """

    def __init__(self, harvester: Harvester, factory: osmium.geom.WKBFactory,
                 bounds: Bounds | None) -> None:
        self.harvester = harvester
        self.factory = factory
        self.bounds = bounds
        self.relations: dict[int, list[tuple[ClassCollector, dict[str, str]]]] = {}
        # relation id -> its area, or None when it lies outside the bounds
        self.built: dict[int, BaseGeometry | None] = {}
        # per way of a polygon class: its linestring WKB (None without node
        # locations) and the classes it matched
        self.rings: list[tuple[int, str | None, list[tuple[ClassCollector, dict]]]] = []

    @property
    def relation_ids(self) -> list[int]:
        return sorted(self.relations)

    def find_relations(self, path: Path) -> None:
        harvester, relations = self.harvester, self.relations

        class Relations:
            def relation(self, rel: osmium.osm.Relation) -> None:
                tags = rel.tags
                if tags.get("type") in AREA_RELATION_TYPES:
                    cols = harvester.matching("polygon", tags)
                    if cols:
                        relations[rel.id] = cols

        keys = {k for c in harvester.by_kind["polygon"] for k in c.spec.tags.include}
        with osmium.io.Reader(str(path), osmium.osm.RELATION) as reader:
            osmium.apply(reader, osmium.filter.KeyFilter(*keys), Relations())

    def way(self, way_id: int, line: str | None,
            cols: list[tuple[ClassCollector, dict[str, str]]]) -> None:
        self.rings.append((way_id, line, cols))

    def area(self, area: osmium.osm.Area) -> None:
        # a failure is counted in finish(): a wanted relation without an area
        with contextlib.suppress(RuntimeError):
            geom = shapely.from_wkb(self.factory.create_multipolygon(area))
            inside = self.bounds is None or _overlap(geom.bounds, self.bounds)
            self.built[area.orig_id()] = geom if inside else None

    def finish(self) -> None:
        polygons = _ring_polygons([ring for _, ring, _ in self.rings])
        for (way_id, _, cols), (polygon, skip) in zip(self.rings, polygons, strict=True):
            for c, used in cols:
                if polygon is None:
                    c.skip(skip)
                else:
                    c.add("way", way_id, used, polygon)
        for rel_id, cols in sorted(self.relations.items()):
            if rel_id not in self.built:
                for c, _ in cols:
                    c.skip("skipped_invalid")
            elif (geom := self.built[rel_id]) is None:
                _outside(cols)
            else:
                for c, used in cols:
                    c.add("relation", rel_id, used, geom)


def _ring_polygons(lines: list[str | None]) -> list[tuple[Polygon | None, str]]:
    """Ways (hex WKB linestrings from osmium) -> (polygon, "") when closed, else
    (None, why skipped). A closed linestring and a one-ring polygon differ only
    in their WKB header: the bytes are rewritten, then parsed in one call."""
    out: list[tuple[Polygon | None, str]] = []
    idx, polygons = [], []
    for line_hex in lines:
        if line_hex is None:  # no geometry: nodes missing from the extract
            out.append((None, "skipped_invalid"))
            continue
        line = bytes.fromhex(line_hex)  # 1 byte order, 4 type, 4 count, 16 per point
        order = "<" if line[0] == 1 else ">"
        if line[9:25] != line[-16:]:
            out.append((None, "skipped_geometry"))  # not closed: not an area
        elif struct.unpack_from(order + "I", line, 5)[0] < 4:
            out.append((None, "skipped_invalid"))  # a closed ring of < 3 distinct points
        else:
            idx.append(len(out))
            out.append((None, ""))
            polygons.append(line[:1] + struct.pack(order + "II", 3, 1) + line[5:])
    for i, polygon in zip(idx, shapely.from_wkb(polygons), strict=True):
        out[i] = (polygon, "")
    return out


@stage_task(name="harvest-osm")
def harvest_osm_task(source: str, fingerprint: str, classes: list[ClassSpec], aoi_wkb: str,
                     run_uri: str) -> dict[str, Any]:
    """One pass over the file for every class. ``fingerprint`` (size/mtime of the
    file) is only part of the cache key: a replaced file is harvested again."""
    result = harvest_osm(source, classes, aoi_from_wkb(aoi_wkb))
    return write_outputs(result, RunLayout(run_uri), source)
