"""OSM extract of the town plan, minus the withheld buildings, as a deterministic .osm.pbf.

Ids are positive and handed out in creation order, and everything is buffered so the file can
be written nodes, then ways, then relations, each sorted by id, as OSM tools expect. Metadata
(versions, timestamps, users) is left out so the same plan always gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import osmium
from osmium.osm.mutable import Node, Relation, Way
from shapely.geometry import LinearRing, Polygon

from mapgap.demo_scene.geo import lonlat
from mapgap.demo_scene.layout import Building, Town
from mapgap.demo_scene.outputs import atomic_path

_ROOF_SHAPE = {"gable": "gabled", "hip": "hipped", "flat": "flat", "metal": "gabled"}
_PATCH_TAGS = {"grass": {"landuse": "grass"}, "park": {"leisure": "park"},
               "wood": {"natural": "wood"}, "industrial": {"landuse": "industrial"}}


class _Osm:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.ways: list[Way] = []
        self.relations: list[Relation] = []

    def node(self, lon: float, lat: float, tags: dict[str, str] | None = None) -> int:
        self.nodes.append(Node(id=len(self.nodes) + 1, location=(lon, lat), tags=tags or {}))
        return len(self.nodes)

    def way(self, refs: list[int], tags: dict[str, str] | None = None) -> int:
        self.ways.append(Way(id=len(self.ways) + 1, nodes=refs, tags=tags or {}))
        return len(self.ways)

    def ring(self, ring: LinearRing, tags: dict[str, str] | None = None) -> int:
        refs = [self.node(lon, lat) for lon, lat in lonlat(np.asarray(ring.coords)[:-1])]
        return self.way(refs + refs[:1], tags)

    def relation(self, members: list[tuple[str, int, str]], tags: dict[str, str]) -> int:
        self.relations.append(Relation(id=len(self.relations) + 1, members=members, tags=tags))
        return len(self.relations)

    def area(self, poly: Polygon, tags: dict[str, str]) -> str:
        """A closed way, or a multipolygon relation when the polygon has holes."""
        if not poly.interiors:
            return f"way/{self.ring(poly.exterior, tags)}"
        members = [("w", self.ring(poly.exterior), "outer")]
        members += [("w", self.ring(r), "inner") for r in poly.interiors]
        return f"relation/{self.relation(members, {'type': 'multipolygon', **tags})}"


def _building_tags(b: Building) -> dict[str, str]:
    tags = {"building": b.tag, "building:levels": str(b.levels), "roof:shape": _ROOF_SHAPE[b.roof]}
    if b.roof == "metal":
        tags["roof:material"] = "metal"
    return tags


def write_pbf(path: Path, town: Town, withheld: frozenset[int],
              bbox: tuple[float, float, float, float]) -> dict[int, str]:
    """Write the extract atomically; returns the OSM object ("way/12") of each mapped building."""
    osm = _Osm()
    points = lonlat(np.asarray(town.points))
    road_nodes: dict[int, int] = {}  # junctions are shared between ways
    for road in town.roads:
        for i in road.nodes:
            if i not in road_nodes:
                road_nodes[i] = osm.node(*points[i])
        refs = [road_nodes[i] for i in road.nodes]
        tags = {"highway": road.highway, "surface": "asphalt"}
        if road.lanes:
            tags["lanes"] = str(road.lanes)
        if road.name:
            tags["name"] = road.name
        osm.way(refs, tags)
    mapped = {b.id: osm.area(b.footprint, _building_tags(b))
              for b in town.buildings if b.id not in withheld}
    for lot in town.parkings:
        osm.area(lot.box.polygon(), {"amenity": "parking", "parking": "surface"})
    for court in town.courts:
        osm.area(court.box.polygon(), {"leisure": "pitch", "sport": "tennis",
                                       "surface": "clay" if court.surface == "clay" else "acrylic"})
    for patch in town.patches:
        if patch.mapped:
            osm.area(patch.polygon, _PATCH_TAGS[patch.kind])
    for tree in town.trees:
        if tree.mapped:
            osm.node(*lonlat(np.array([tree.x, tree.y]))[0],
                     {"natural": "tree", "height": f"{tree.height:.0f}"})

    header = osmium.io.Header()
    header.set("generator", "mapgap demo_scene")
    west, south, east, north = bbox
    header.add_box(osmium.osm.Box(osmium.osm.Location(west, south),
                                  osmium.osm.Location(east, north)))
    pbf = "pbf,add_metadata=false"  # no versions or timestamps: reproducible bytes
    with atomic_path(path) as tmp, osmium.SimpleWriter(osmium.io.File(str(tmp), pbf),
                                                       header=header, overwrite=True) as writer:
        for n in osm.nodes:
            writer.add_node(n)
        for w in osm.ways:
            writer.add_way(w)
        for r in osm.relations:
            writer.add_relation(r)
    return mapped
