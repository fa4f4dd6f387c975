"""Harvesting from OSM files with pyosmium: counts per class checked against an
independent count made here with plain osmium handlers (no areas, no filters,
the filter written out by hand), multipolygons with holes, metric buffers, AOI
clipping, bad input, and the GeoParquet + summary outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import osmium
import pytest
import shapely
from shapely.geometry import box

from mapgap import grid, storage
from mapgap.conf.labels import ClassSpec
from mapgap.layout import RunLayout
from mapgap.tasks.labels import (
    EmptyAOIError,
    Harvester,
    TagMatcher,
    line_width_m,
    parse_lanes,
    parse_length_m,
    read_labels,
    write_outputs,
)
from mapgap.tasks.osm import OsmFileError, collect, harvest_osm

try:
    from tests.conftest import shared_path
except ImportError:  # pragma: no cover
    from conftest import shared_path

BUILDING_EXCLUDED = {"construction", "ruins", "roof", "houseboat", "static_caravan", "greenhouse"}
BUILDING = ClassSpec.model_validate({
    "name": "building", "priority": 3,
    "tags": {"include": {"building": "*"},
             "exclude": {"building": sorted(BUILDING_EXCLUDED),
                         "location": ["underground", "underwater"]}},
})
PARKING_EXCLUDED = {"underground", "multi-storey", "sheds", "carports", "garage_boxes"}
PARKING = ClassSpec.model_validate({
    "name": "parking", "priority": 2,
    "tags": {"include": {"amenity": ["parking"]}, "exclude": {"parking": sorted(PARKING_EXCLUDED)}},
})
ROAD_WIDTHS = {"primary": 10, "secondary": 9, "tertiary": 8, "residential": 6, "service": 4}
ROAD = ClassSpec.model_validate({
    "name": "road", "geometry": "line", "width_m": 5, "widths_m": ROAD_WIDTHS, "priority": 1,
    "tags": {"include": {"highway": sorted(ROAD_WIDTHS) + ["unclassified"]},
             "exclude": {"tunnel": "*"}},
})
TREE = ClassSpec.model_validate({
    "name": "tree", "geometry": "point", "width_m": 5, "tags": {"include": {"natural": ["tree"]}},
})
CLASSES = [BUILDING, ROAD, PARKING]
WORLD = box(-180, -85, 180, 85)


# --- the independent count ---------------------------------------------------------------

def is_building(t: osmium.osm.TagList) -> bool:
    b = t.get("building")
    return (b is not None and b != "no" and b not in BUILDING_EXCLUDED
            and t.get("location") not in ("underground", "underwater"))


def is_parking(t: osmium.osm.TagList) -> bool:
    return t.get("amenity") == "parking" and t.get("parking") not in PARKING_EXCLUDED


def is_road(t: osmium.osm.TagList) -> bool:
    return (t.get("highway") in ROAD.tags.include["highway"]
            and t.get("tunnel") in (None, "no"))


class IndependentCount(osmium.SimpleHandler):
    """Closed ways + multipolygon relations per area class; ways for roads. Also
    which closed ways have 3+ distinct nodes, all with a location in the extract
    (every one of those must become a polygon)."""

    AREAS = {"building": is_building, "parking": is_parking}

    def __init__(self) -> None:
        super().__init__()
        self.areas: dict[str, set[tuple[str, int]]] = {c: set() for c in self.AREAS}
        self.complete_ways: set[int] = set()
        self.open_ways: dict[str, int] = dict.fromkeys(self.AREAS, 0)
        self.roads: set[int] = set()
        self.excluded_buildings: set[int] = set()
        # bbox of every building/parking/road way with all its node locations
        self.bounds: dict[int, tuple[float, float, float, float]] = {}

    def way(self, w: osmium.osm.Way) -> None:
        closed = w.nodes[0].ref == w.nodes[-1].ref
        for name, pred in self.AREAS.items():
            if pred(w.tags):
                if closed:
                    self.areas[name].add(("way", w.id))
                else:
                    self.open_ways[name] += 1
        if closed and len({n.ref for n in w.nodes}) >= 3 and all(
                n.location.valid() for n in w.nodes):
            self.complete_ways.add(w.id)
        if is_road(w.tags):
            self.roads.add(w.id)
        if (is_road(w.tags) or any(p(w.tags) for p in self.AREAS.values())) and all(
                n.location.valid() for n in w.nodes):
            lons, lats = [n.location.lon for n in w.nodes], [n.location.lat for n in w.nodes]
            self.bounds[w.id] = (min(lons), min(lats), max(lons), max(lats))
        if w.tags.get("building") in BUILDING_EXCLUDED:
            self.excluded_buildings.add(w.id)

    def relation(self, r: osmium.osm.Relation) -> None:
        if r.tags.get("type") == "multipolygon":
            for name, pred in self.AREAS.items():
                if pred(r.tags):
                    self.areas[name].add(("relation", r.id))


def independent(path: Path) -> IndependentCount:
    h = IndependentCount()
    h.apply_file(str(path), locations=True)
    return h


def ids(frame: gpd.GeoDataFrame) -> set[tuple[str, int]]:
    return set(zip(frame.osm_type, frame.osm_id.astype(int), strict=True))


@pytest.fixture(scope="module")
def liechtenstein() -> tuple[Path, object, IndependentCount]:
    path = shared_path("osm/liechtenstein.osm.pbf")
    return path, harvest_osm(str(path), CLASSES, WORLD), independent(path)


def test_liechtenstein_counts_match_an_independent_count(liechtenstein: tuple) -> None:
    _, result, ref = liechtenstein
    for name in ("building", "parking"):
        counts, frame = result.counts[name], result.frames[name]
        assert counts["matched"] == len(ref.areas[name]) + ref.open_ways[name]
        assert ids(frame) <= ref.areas[name]
        assert counts["features"] == len(frame) == len(ref.areas[name]) - counts["skipped_invalid"]
        assert counts["skipped_invalid"] <= 0.001 * len(ref.areas[name])
    assert result.counts["building"]["features"] > 17_000
    assert {t for t, _ in ids(result.frames["building"])} == {"way", "relation"}
    roads = result.frames["road"]
    assert set(roads.osm_id) == ref.roads and (roads.osm_type == "way").all()
    assert result.counts["road"]["features"] == len(ref.roads)


def test_excluded_values_are_not_harvested(liechtenstein: tuple) -> None:
    _, result, ref = liechtenstein
    assert len(ref.excluded_buildings) >= 50  # roofs and a ruin in this extract
    assert not {("way", i) for i in ref.excluded_buildings} & ids(result.frames["building"])
    tags = [json.loads(t) for t in result.frames["parking"].tags]
    assert all(t.get("parking") not in PARKING_EXCLUDED for t in tags)
    assert any("parking" in t for t in tags)  # the tags used are kept


def test_multipolygon_relations_keep_their_holes(liechtenstein: tuple) -> None:
    _, result, _ = liechtenstein
    rel = result.frames["building"].query("osm_type == 'relation'")
    holes = [sum(len(p.interiors) for p in shapely.get_parts(g)) for g in rel.geometry]
    assert len(rel) >= 15 and sum(h > 0 for h in holes) >= 10
    assert rel.geometry.is_valid.all()


@pytest.mark.parametrize("name", ["finland-test.osm.pbf", "helsinki.osm.pbf",
                                  "germany-small.osm", "West-Oakland.osm.bz2"])
def test_other_files_match_the_independent_count(name: str) -> None:
    path = shared_path(f"osm/{name}")
    result, ref = harvest_osm(str(path), CLASSES, WORLD), independent(path)
    for cls in ("building", "parking"):
        counts, frame = result.counts[cls], result.frames[cls]
        expected = ref.areas[cls]
        assert counts["matched"] == len(expected) + ref.open_ways[cls]
        assert counts["skipped_geometry"] == ref.open_ways[cls]
        assert ids(frame) <= expected
        assert len(frame) + counts["skipped_invalid"] == len(expected)
        # every closed way whose nodes are all in the extract became an area
        # (self-intersecting ones repaired)
        complete = {("way", i) for i in ref.complete_ways} & expected
        assert complete <= ids(frame)
    if name == "germany-small.osm":
        assert result.counts["building"]["repaired"] == 1  # way 275490781 self-intersects
    assert len(result.frames["building"]) > 0


def test_helsinki_multipolygons_with_holes() -> None:
    path = shared_path("osm/helsinki.osm.pbf")
    frame = harvest_osm(str(path), [BUILDING], WORLD).frames["building"]
    rel = frame[frame.osm_type == "relation"]
    with_holes = [g for g in rel.geometry if any(p.interiors for p in shapely.get_parts(g))]
    assert len(rel) > 50 and len(with_holes) > 50


# --- geometry rules on a tiny synthetic file ----------------------------------------------

NODES = {  # id: (lon, lat) around 10E 50N
    1: (10.0000, 50.0000), 2: (10.0010, 50.0000), 3: (10.0010, 50.0010), 4: (10.0000, 50.0010),
    5: (10.0020, 50.0000), 6: (10.0030, 50.0010), 7: (10.0030, 50.0000), 8: (10.0020, 50.0010),
    11: (10.0100, 50.0000), 12: (10.0200, 50.0000), 13: (10.0100, 50.0050),
    14: (10.0200, 50.0050),
    21: (10.0300, 50.0000), 22: (10.0340, 50.0000), 23: (10.0340, 50.0040),
    24: (10.0300, 50.0040), 25: (10.0310, 50.0010), 26: (10.0330, 50.0010),
    27: (10.0330, 50.0030), 28: (10.0310, 50.0030), 100: (10.0500, 50.0000),
}
WAYS = {  # id: (node refs, tags)
    101: ([1, 2, 3, 4, 1], {"building": "yes"}),
    102: ([5, 6, 7, 8, 5], {"building": "yes"}),  # bow-tie
    103: ([1, 2, 3], {"building": "house"}),  # not closed
    104: ([1, 2, 3, 4, 1], {"building": "roof"}),
    105: ([1, 2, 3, 4, 1], {"building": "no"}),
    106: ([11, 12], {"highway": "primary", "width": "7.5 m"}),
    107: ([11, 13], {"highway": "residential", "lanes": "3"}),
    108: ([13, 14], {"highway": "service"}),
    109: ([12, 14], {"highway": "unclassified", "width": "wide"}),
    110: ([12, 999], {"highway": "primary"}),  # node 999 is missing from the file
    111: ([11, 14], {"highway": "primary", "tunnel": "yes"}),
    112: ([13, 12], {"highway": "primary", "tunnel": "no"}),
    120: ([21, 22, 23, 24, 21], {}),
    121: ([25, 26, 27, 28, 25], {}),
}


def write_osm(path: Path) -> Path:
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<osm version="0.6" generator="test">']
    for i, (lon, lat) in NODES.items():
        tags = '<tag k="natural" v="tree"/>' if i == 100 else ""
        lines.append(f'<node id="{i}" version="1" lat="{lat}" lon="{lon}">{tags}</node>')
    for i, (refs, tags) in WAYS.items():
        body = "".join(f'<nd ref="{r}"/>' for r in refs)
        body += "".join(f'<tag k="{k}" v="{v}"/>' for k, v in tags.items())
        lines.append(f'<way id="{i}" version="1">{body}</way>')
    lines.append('<relation id="130" version="1"><member type="way" ref="120" role="outer"/>'
                 '<member type="way" ref="121" role="inner"/><tag k="type" v="multipolygon"/>'
                 '<tag k="building" v="yes"/></relation>')
    lines.append("</osm>")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture()
def tiny(tmp_path: Path) -> object:
    return harvest_osm(str(write_osm(tmp_path / "tiny.osm")), [BUILDING, ROAD, TREE], WORLD)


def metric(geom: shapely.Geometry) -> shapely.Geometry:
    return grid.reproject(geom, grid.WGS84, grid.local_metric_crs(10.0, 50.0))


def test_area_rules_and_skips(tiny: object) -> None:
    b = tiny.frames["building"]
    assert ids(b) == {("way", 101), ("way", 102), ("relation", 130)}
    counts = tiny.counts["building"]
    assert counts["repaired"] == 1  # the bow-tie osmium refuses, made valid
    assert counts["skipped_geometry"] == 1  # the unclosed way
    assert counts["matched"] == 4 and counts["features"] == 3
    bowtie = b[b.osm_id == 102].geometry.iloc[0]
    assert bowtie.is_valid and bowtie.geom_type == "MultiPolygon" and len(bowtie.geoms) == 2
    ring = b[b.osm_id == 130].geometry.iloc[0]
    assert len(ring.interiors) == 1
    assert json.loads(b[b.osm_id == 101].tags.iloc[0]) == {"building": "yes"}


def test_lines_are_buffered_in_metres_with_width_and_lanes(tiny: object) -> None:
    roads = tiny.frames["road"].set_index("osm_id")
    assert set(roads.index) == {106, 107, 108, 109, 112}  # 110 incomplete, 111 a tunnel
    assert tiny.counts["road"]["skipped_invalid"] == 1
    assert roads.width_m.to_dict() == {106: 7.5, 107: 10.5, 108: 4, 109: 5, 112: 10}
    for osm_id, row in roads.iterrows():
        refs = WAYS[osm_id][0]
        line = metric(shapely.LineString([NODES[r] for r in refs]))
        w = row.width_m
        expected = line.length * w + math.pi * (w / 2) ** 2  # round caps
        assert metric(row.geometry).area == pytest.approx(expected, rel=0.02)
        # a degree buffer would be 1.56x wider north-south than east-west at 50N
        minx, miny, maxx, maxy = metric(row.geometry).bounds
        lx0, ly0, lx1, ly1 = line.bounds
        assert (maxy - miny) - (ly1 - ly0) == pytest.approx(w, rel=0.03) or \
            (maxx - minx) - (lx1 - lx0) == pytest.approx(w, rel=0.03)


def test_points_are_buffered_to_their_diameter(tiny: object) -> None:
    trees = tiny.frames["tree"]
    assert list(trees.osm_type) == ["node"] and list(trees.osm_id) == [100]
    assert metric(trees.geometry.iloc[0]).area == pytest.approx(math.pi * 2.5**2, rel=0.05)


def test_width_and_lanes_parsing() -> None:
    assert parse_length_m("7") == 7 and parse_length_m("7.5 m") == 7.5
    assert parse_length_m("3,5") == 3.5 and parse_length_m("10 ft") == pytest.approx(3.048)
    assert parse_length_m("12'6\"") == pytest.approx(3.81)
    assert parse_length_m("wide") is None and parse_length_m("0") is None
    assert parse_length_m("500") is None  # implausible: use the class default
    assert parse_lanes("2") == 2 and parse_lanes("2;3") == 2 and parse_lanes("x") is None
    assert line_width_m(ROAD, {"highway": "secondary"}) == 9
    assert line_width_m(ROAD, {"highway": "secondary", "lanes": "4"}) == 14
    assert line_width_m(ROAD, {"highway": "secondary", "lanes": "4", "width": "5"}) == 5
    assert line_width_m(ROAD, {"highway": "unclassified"}) == 5  # width_m fallback


def test_tag_matcher_star_means_any_value_but_no() -> None:
    m = TagMatcher.of(BUILDING.tags)
    assert m({"building": "yes"}) and m({"building": "garage"})
    assert not m({"building": "no"}) and not m({"building": "roof"}) and not m({})
    assert not m({"building": "yes", "location": "underground"})
    r = TagMatcher.of(ROAD.tags)
    assert r({"highway": "primary", "tunnel": "no"}) and not r({"highway": "primary",
                                                                "tunnel": "culvert"})


# --- AOI clipping and outputs ----------------------------------------------------------------

def test_aoi_clip_and_geoparquet_outputs(tmp_path: Path) -> None:
    path = shared_path("osm/liechtenstein.osm.pbf")
    aoi = box(9.515, 47.135, 9.525, 47.145)
    result = harvest_osm(str(path), CLASSES, aoi)
    b = result.counts["building"]
    assert b["features"] > 50 and b["outside_aoi"] > 10_000 and b["clipped"] > 0
    assert b["matched"] == b["features"] + b["outside_aoi"] + b["skipped_invalid"]
    for frame in result.frames.values():
        assert frame.geometry.within(aoi.buffer(1e-9)).all()

    layout = RunLayout(str(tmp_path / "run"))
    summary = write_outputs(result, layout, str(path))
    assert storage.read_json(layout.labels_summary) == json.loads(json.dumps(summary))
    back = read_labels(layout.labels("building"))
    assert list(back.columns) == ["class", "osm_id", "osm_type", "tags", "width_m", "geometry"]
    assert back.crs.to_epsg() == 4326 and len(back) == b["features"]
    assert back.osm_id.dtype == np.int64
    sub = read_labels(layout.labels("building"), bbox=(9.515, 47.135, 9.517, 47.137))
    assert 0 < len(sub) < len(back)  # bbox reads only what touches
    # deterministic bytes: same input, same file, same hash (downstream cache keys)
    again = write_outputs(harvest_osm(str(path), CLASSES, aoi), layout, str(path))
    assert again["classes"]["building"]["sha256"] == summary["classes"]["building"]["sha256"]


def test_a_small_aoi_keeps_what_the_whole_file_harvest_has_there(liechtenstein: tuple) -> None:
    """Objects far from the AOI are dropped during the pass; what is kept is exactly
    what the whole-file harvest has touching the AOI, roads whose buffer just
    reaches in included."""
    path, whole, ref = liechtenstein
    aoi = box(9.515, 47.135, 9.525, 47.145)
    result = harvest_osm(str(path), CLASSES, aoi)
    for name, frame in whole.frames.items():
        touching = frame[frame.geometry.intersects(aoi)]
        assert ids(result.frames[name]) == ids(touching), name
        assert result.counts[name]["matched"] == whole.counts[name]["matched"]
    # an AOI starting 1 m east of a road's east end: the road's buffer reaches in
    road = min(i for i in ref.roads & set(ref.bounds) if box(*ref.bounds[i]).within(aoi))
    w, s, e, n = ref.bounds[road]
    beside = box(e + 1.3e-5, s - 0.001, e + 0.01, n + 0.001)
    frame = whole.frames["road"]
    touching = frame[frame.geometry.intersects(beside)]
    assert road in set(touching.osm_id)
    assert ids(harvest_osm(str(path), [ROAD], beside).frames["road"]) == ids(touching)


def test_the_pass_holds_only_objects_near_the_aoi(liechtenstein: tuple) -> None:
    """What the osmium pass keeps in memory for a small AOI, against the independent
    count's way bboxes and the whole-file harvest's relations."""
    path, whole, ref = liechtenstein
    bounds = (9.515, 47.135, 9.525, 47.145)
    harvester = Harvester(CLASSES)
    collect(path, harvester, bounds)
    near = {i for i, b in ref.bounds.items() if box(*b).intersects(box(*bounds))}
    expected = {
        "building": {("way", i) for _, i in ref.areas["building"]} & {
            ("way", i) for i in near & ref.complete_ways},
        "parking": {("way", i) for _, i in ref.areas["parking"]} & {
            ("way", i) for i in near & ref.complete_ways},
        "road": {("way", i) for i in near & ref.roads},
    }
    for name, col in harvester.collectors.items():
        held = set(zip(col.osm_type, col.osm_id, strict=True))
        rel = whole.frames[name].query("osm_type == 'relation'")
        near_rel = {("relation", i) for i, g in zip(rel.osm_id, rel.geometry, strict=True)
                    if box(*g.bounds).intersects(box(*bounds))}
        assert held == expected[name] | near_rel, name
        counts = col.counts
        assert counts["matched"] == whole.counts[name]["matched"]
        assert counts["matched"] == len(held) + counts["outside_aoi"] + counts[
            "skipped_invalid"] + counts["skipped_geometry"]
        assert 0 < len(held) < counts["matched"] / 5


# --- bad input -------------------------------------------------------------------------------

def _one_line_error(exc_type: type, fn: object, *args: object) -> str:
    with pytest.raises(exc_type) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_truncated_pbf_is_a_clear_error(tmp_path: Path) -> None:
    data = shared_path("osm/liechtenstein.osm.pbf").read_bytes()
    bad = tmp_path / "cut.osm.pbf"
    bad.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(OsmFileError, harvest_osm, str(bad), CLASSES, WORLD)
    assert msg.startswith(f"{bad}: not a readable OSM file") and "EOF" in msg


@pytest.mark.parametrize(("name", "content"), [
    ("labels.osm.pbf", b'{"type": "FeatureCollection", "features": []}'),
    ("labels.osm", b"this is not xml"),
    ("cut.osm", b'<?xml version="1.0"?><osm version="0.6"><node id="1" lat="1"'),
])
def test_non_osm_files_are_clear_errors(tmp_path: Path, name: str, content: bytes) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    msg = _one_line_error(OsmFileError, harvest_osm, str(bad), CLASSES, WORLD)
    assert msg.startswith(f"{bad}: not a readable OSM file (")


def test_empty_aoi_is_an_error() -> None:
    path = shared_path("osm/germany-small.osm")
    msg = _one_line_error(EmptyAOIError, harvest_osm, str(path), CLASSES, box(10, 48, 10, 48))
    assert "AOI is empty" in msg


def test_aoi_outside_the_file_warns_with_zero_features() -> None:
    path = shared_path("osm/germany-small.osm")
    result = harvest_osm(str(path), CLASSES, box(0, 0, 1, 1))
    assert all(len(f) == 0 for f in result.frames.values())
    assert "outside the file's extent" in result.warnings[0]
    assert all(c["matched"] == 0 for c in result.counts.values())


def test_pbf_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    path = shared_path("osm/germany-small.osm")
    uri = f"{s3_bucket}/in/germany-small.osm"
    storage.write_bytes(uri, path.read_bytes())
    result = harvest_osm(uri, [BUILDING], WORLD)
    summary = write_outputs(result, RunLayout(f"{s3_bucket}/run"), uri)
    assert summary["classes"]["building"]["features"] == len(result.frames["building"]) > 0
    assert len(read_labels(f"{s3_bucket}/run/labels/building.parquet")) == len(
        result.frames["building"])


def test_recommended_class_presets() -> None:
    from mapgap.conf.labels import class_presets

    presets = class_presets()
    assert list(presets) == ["building", "road", "parking"]
    building, road, parking = (TagMatcher.of(presets[n].tags) for n in presets)
    assert building({"building": "house"}) and not building({"building": "roof"})
    assert not building({"building": "yes", "location": "underground"})
    assert parking({"amenity": "parking", "parking": "surface"})
    assert not parking({"amenity": "parking", "parking": "multi-storey"})
    assert road({"highway": "residential", "tunnel": "no"})
    assert not road({"highway": "residential", "tunnel": "yes"})
    assert not road({"highway": "footway"})
    assert line_width_m(presets["road"], {"highway": "motorway"}) == 14
    assert [p.priority for p in presets.values()] == [3, 1, 2]
