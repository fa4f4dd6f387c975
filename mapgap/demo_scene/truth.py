"""GeoJSON features (EPSG:4326) of everything the imagery shows, for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mercantile
import shapely
from shapely.geometry import mapping

from mapgap.demo_scene.geo import to_wgs84
from mapgap.demo_scene.layout import Building, Town, road_line

_PATCH_CLASS = {"grass": "grass", "park": "grass", "soil": "soil", "industrial": "soil",
                "wood": "wood", "track": "track"}


def _feature(geom: shapely.Geometry, props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "properties": props, "geometry": mapping(to_wgs84(geom))}


def building_feature(b: Building, osm: str | None) -> dict[str, Any]:
    return _feature(b.footprint, {
        "id": b.id, "class": "building", "building": b.tag, "roof": b.roof,
        "roof_rgb": list(b.colour), "height": round(b.height, 1), "osm": osm,
        "withheld": osm is None,
    })


def complete_area_features(tiles: Sequence[mercantile.Tile],
                           withheld: Sequence[Building]) -> list[dict[str, Any]]:
    """The scene's tiles with no withheld building on them, as task squares: where a
    validator would have marked the mapping complete (a Tasking Manager project's
    validated tasks), and so where hard-negative mining may trust OSM."""
    gaps = shapely.STRtree([b.footprint for b in withheld])
    out = []
    for t in tiles:
        b = mercantile.xy_bounds(t)
        if not len(gaps.query(shapely.box(b.left, b.bottom, b.right, b.top),
                              predicate="intersects")):
            out.append(_feature(shapely.box(b.left, b.bottom, b.right, b.top),
                                {"task": f"z{t.z}_{t.x}_{t.y}", "mapping": "validated"}))
    return out


def truth_features(town: Town, osm_ids: dict[int, str]) -> list[dict[str, Any]]:
    """Buildings (with their OSM object, or null when withheld), then every other class.

    Ids count from 1 within each class; building ids match withheld.geojson.
    """
    out = [building_feature(b, osm_ids.get(b.id)) for b in town.buildings]
    counts: dict[str, int] = {}

    def add(cls: str, geom: shapely.Geometry, **props: Any) -> None:
        counts[cls] = counts.get(cls, 0) + 1
        out.append(_feature(geom, {"id": counts[cls], "class": cls, **props}))

    for r in town.roads:
        add("road", shapely.buffer(road_line(town, r), r.width / 2), highway=r.highway,
            lanes=r.lanes, width=r.width)
    for lot in town.parkings:
        add("parking", lot.box.polygon())
    for court in town.courts:
        add("tennis_court", court.box.polygon(), surface=court.surface)
    for patch in town.patches:
        add(_PATCH_CLASS[patch.kind], patch.polygon, kind=patch.kind, mapped=patch.mapped)
    for p in town.props:
        add(p.kind, p.footprint, rgb=list(p.colours[-1]))
    for t in town.trees:
        add("tree", t.crown, height=round(t.height, 1), mapped=t.mapped)
    return out
