"""Overpass harvesting against a local replay server (tests/overpass_replay.py)
answering with real recorded Overpass replies, with injected faults."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from mapgap import grid, storage
from mapgap.conf.labels import ClassSpec, OverpassConfig
from mapgap.tasks.osm import harvest_osm
from mapgap.tasks.overpass import (
    OverpassError,
    OverpassRuntimeError,
    build_query,
    fetch,
    harvest_overpass,
    parse_status,
    split_boxes,
)

try:
    from tests.conftest import shared_path
    from tests.overpass_replay import ReplayServer
except ImportError:  # pragma: no cover - rootdir without package import
    from conftest import shared_path
    from overpass_replay import ReplayServer

BUILDING = ClassSpec.model_validate({
    "name": "building",
    "tags": {"include": {"building": "*"},
             "exclude": {"building": ["construction", "ruins"], "location": ["underground"]}},
})
ROAD = ClassSpec.model_validate({
    "name": "road", "geometry": "line", "width_m": 6, "widths_m": {"service": 4},
    "tags": {"include": {"highway": ["residential", "service"]}, "exclude": {"tunnel": "*"}},
})
PROTECTED = ClassSpec.model_validate({
    "name": "protected", "tags": {"include": {"boundary": ["protected_area"]}},
})
TREE = ClassSpec.model_validate({
    "name": "tree", "geometry": "point", "width_m": 5,
    "tags": {"include": {"natural": ["tree"]}},
})
TURNING = ClassSpec.model_validate({
    "name": "turning", "geometry": "point", "width_m": 10,
    "tags": {"include": {"highway": ["turning_circle"]}},
})
WORLD = box(-180, -85, 180, 85)
FAST = OverpassConfig(retries=3, backoff_s=0.01, max_backoff_s=0.05, status_poll_s=0.1,
                      max_slot_wait_s=5, timeout_s=5)


@pytest.fixture()
def server() -> Iterator[ReplayServer]:
    with ReplayServer(shared_path("overpass")) as s:
        yield s


def run(server: ReplayServer, tmp_path: Path, cfg: OverpassConfig = FAST,
        query: str = "[out:json];way(1);out;") -> str:
    return fetch(server.url, query, str(tmp_path / "cache"), cfg)


# --- queries --------------------------------------------------------------------------

def test_query_is_built_from_the_class_filters() -> None:
    q = build_query([BUILDING, ROAD, TREE], (9.5, 47.1, 9.6, 47.2), 90)
    where = "(47.1,9.5,47.2,9.6)"
    assert q.startswith("[out:json][timeout:90];")
    assert (f'way["building"]["building"!="no"]["building"!~"^(construction|ruins)$"]'
            f'["location"!~"^(underground)$"]{where};') in q
    assert ('relation["building"]["building"!="no"]' in q
            and '["type"~"^(multipolygon|boundary)$"]' in q)
    assert f'way["highway"~"^(residential|service)$"]{where};' in q  # "*" exclude: Python side
    assert f'node["natural"~"^(tree)$"]{where};' in q
    assert "(._;>;);" in q and q.rstrip().endswith("out body qt;")
    assert 'relation["highway"' not in q  # lines never come from relations


def test_query_escapes_values() -> None:
    spec = ClassSpec.model_validate({"name": "x", "tags": {"include": {'a"b': ["1.5", "(x)|y"]}}})
    q = build_query([spec], (0, 0, 1, 1), 10)
    # sorted values; regex metacharacters escaped for ERE, then for the QL string
    assert r'["a\"b"~"^(\\(x\\)\\|y|1\\.5)$"]' in q


def test_sub_boxes_cover_the_aoi_and_skip_boxes_outside_it() -> None:
    boxes = split_boxes(box(0, 0, 0.12, 0.05), 0.05)
    assert len(boxes) == 3
    assert all(e - w <= 0.05 + 1e-9 and n - s <= 0.05 + 1e-9 for w, s, e, n in boxes)
    assert shapely.union_all([box(*b) for b in boxes]).equals(box(0, 0, 0.12, 0.05))
    ell = Polygon([(0, 0), (0.2, 0), (0.2, 0.02), (0.02, 0.02), (0.02, 0.2), (0, 0.2)])
    kept = split_boxes(ell, 0.05)
    assert len(kept) == 7  # of 4 x 4: the bottom row and left column only
    assert all(ell.intersects(box(*b)) for b in kept)


def test_status_texts_are_parsed() -> None:
    d = shared_path("overpass") / "wrapper" / "overpass_status"
    assert parse_status((d / "no_slots_waiting.txt").read_text()).available == 2
    one = parse_status((d / "one_slot_waiting.txt").read_text())
    assert one.available == 1 and one.waits_s == (3.0,)
    two = parse_status((d / "two_slots_waiting.txt").read_text())
    assert two.available is None and two.waits_s == (11.0, 219.0)


# --- transport ------------------------------------------------------------------------

def test_fetch_sends_user_agent_waits_for_status_and_caches(server: ReplayServer,
                                                            tmp_path: Path) -> None:
    uri = run(server, tmp_path)
    assert uri.endswith(".json") and json.loads(storage.read_text(uri))["elements"]
    (req,) = server.interpreter_requests()
    assert req.headers["User-Agent"] == FAST.user_agent
    assert req.query == "[out:json];way(1);out;"
    assert server.requests[0].path == "/api/status"  # asked for a slot first
    assert run(server, tmp_path) == uri  # the cached raw reply: no second request
    assert len(server.interpreter_requests()) == 1
    run(server, tmp_path, query="[out:json];way(2);out;")  # another query: another entry
    assert len(server.interpreter_requests()) == 2


@pytest.mark.parametrize(("faults", "requests"), [
    (["429"], 2),
    (["504", "504"], 3),
    (["reset"], 2),
    (["malformed"], 2),
])
def test_transient_faults_are_retried(server: ReplayServer, tmp_path: Path,
                                      faults: list[str], requests: int) -> None:
    server.fault(*faults)
    uri = run(server, tmp_path)
    assert len(server.interpreter_requests()) == requests
    assert json.loads(storage.read_text(uri))["elements"]  # only the good reply is cached


def test_a_silent_server_times_out_and_is_asked_again(server: ReplayServer,
                                                      tmp_path: Path) -> None:
    server.fault("hang")
    cfg = FAST.model_copy(update={"timeout_s": 1})  # the client waits 2 s for a reply
    assert run(server, tmp_path, cfg).endswith(".json")
    first, second = server.interpreter_requests()
    # asked again after its own timeout, long before the silent reply would have ended
    assert 2 <= second.at - first.at < server.hang_s


def test_retries_are_bounded(server: ReplayServer, tmp_path: Path) -> None:
    server.fail_queries_with("way(1)", "504")
    cfg = FAST.model_copy(update={"retries": 2})
    with pytest.raises(OverpassError) as err:
        run(server, tmp_path, cfg)
    assert len(server.interpreter_requests()) == 3
    msg = str(err.value)
    assert "\n" not in msg and server.url in msg
    assert "giving up after 3 attempts" in msg and "HTTP 504" in msg
    assert not (tmp_path / "cache").exists()  # nothing cached


def test_malformed_json_every_time_is_a_clear_error(server: ReplayServer, tmp_path: Path) -> None:
    server.fail_queries_with("way(1)", "malformed")
    with pytest.raises(OverpassError, match="malformed JSON reply"):
        run(server, tmp_path, FAST.model_copy(update={"retries": 1}))


@pytest.mark.parametrize(("reply", "text"), [
    ("overpy/json/remark-runtime-error-01.json",
     'runtime error: Query timed out in "query" at line 4 after 2 seconds.'),
    ("overpy/xml/remark-runtime-error-01.xml",
     'runtime error: Query timed out in "query" at line 4 after 2 seconds.'),
    ("overpy/json/remark-runtime-remark-01.json", "runtime remark: Test"),
    ("overpy/xml/remark-unknown-01.xml", "Test remark"),
])
def test_runtime_remarks_are_errors_not_empty_results(server: ReplayServer, tmp_path: Path,
                                                      reply: str, text: str) -> None:
    server.reply(reply)
    with pytest.raises(OverpassRuntimeError) as err:
        run(server, tmp_path)
    assert str(err.value).endswith(text)
    assert len(server.interpreter_requests()) == 1  # the same query would fail again
    assert not (tmp_path / "cache").exists()  # nothing cached


def test_injected_runtime_error_after_success_is_not_cached(server: ReplayServer,
                                                            tmp_path: Path) -> None:
    server.fault("runtime-error")
    with pytest.raises(OverpassRuntimeError, match="Query timed out"):
        run(server, tmp_path)
    assert run(server, tmp_path).endswith(".json")  # the next try asks again and succeeds


def test_waits_for_a_free_slot(server: ReplayServer, tmp_path: Path) -> None:
    server.status("two_slots_waiting", "two_slots_waiting", "no_slots_waiting")
    t0 = time.monotonic()
    run(server, tmp_path)
    assert time.monotonic() - t0 >= 2 * FAST.status_poll_s * 0.9
    kinds = [r.path for r in server.requests]
    assert kinds == ["/api/status"] * 3 + ["/api/interpreter"]


def test_slot_wait_is_bounded(server: ReplayServer, tmp_path: Path) -> None:
    server.status("two_slots_waiting")
    cfg = FAST.model_copy(update={"max_slot_wait_s": 0.3})
    with pytest.raises(OverpassError, match=r"/api/status: no free slot within .*=0.3 s"):
        run(server, tmp_path, cfg)
    assert not server.interpreter_requests()


def test_other_http_errors_are_not_retried(server: ReplayServer, tmp_path: Path) -> None:
    with pytest.raises(OverpassError, match="/api/nothing: HTTP 404: not found"):
        fetch(server.url.replace("/api/interpreter", "/api/nothing"), "x",
              str(tmp_path / "c"), FAST)
    assert len(server.status_requests()) == 1  # one attempt only


# --- assembly: same class logic as the .pbf path ---------------------------------------

def test_same_features_as_the_pbf_path(server: ReplayServer, tmp_path: Path) -> None:
    """The recorded JSON reply through Overpass and the recorded XML of the same
    data through osmium give identical rows."""
    server.reply("overpy/json/way-02.json")
    via_overpass = harvest_overpass([run(server, tmp_path)], [BUILDING], WORLD)
    osm_file = tmp_path / "same.osm"
    shutil.copy(shared_path("overpass") / "overpy" / "xml" / "way-02.xml", osm_file)
    via_osmium = harvest_osm(str(osm_file), [BUILDING], WORLD)
    a, b = via_overpass.frames["building"], via_osmium.frames["building"]
    assert len(a) == len(b) == 1
    assert a.drop(columns="geometry").equals(b.drop(columns="geometry"))
    # same vertices (osmium may start the ring elsewhere and orient it differently)
    assert shapely.normalize(a.geometry.iloc[0]).equals_exact(
        shapely.normalize(b.geometry.iloc[0]), 1e-9)
    assert a.osm_id.iloc[0] == 317146077 and json.loads(a.tags.iloc[0]) == {"building": "yes"}
    assert via_overpass.counts == via_osmium.counts


def test_out_geom_multipolygon_keeps_its_holes_and_lines_are_buffered(
        server: ReplayServer, tmp_path: Path) -> None:
    server.reply("wrapper/example_body.json")
    result = harvest_overpass([run(server, tmp_path)], [PROTECTED, ROAD], WORLD)
    park = result.frames["protected"]
    assert list(park.osm_type) == ["relation"] and list(park.osm_id) == [6518385]
    geom = park.geometry.iloc[0]
    assert geom.is_valid
    holes = sum(len(p.interiors) for p in shapely.get_parts(geom))
    assert holes == 3  # the 3 inner members
    road = result.frames["road"]
    assert list(road.osm_id) == [10322303] and road.width_m.iloc[0] == 4  # service default
    metric = grid.reproject(road.geometry.iloc[0], grid.WGS84, grid.local_metric_crs(-122.3, 37.9))
    line_m = metric.length / 2  # perimeter of a thin buffer ~ 2 x centre line length
    assert metric.area / line_m == pytest.approx(4, rel=0.1)


def test_sub_box_duplicates_are_merged(server: ReplayServer, tmp_path: Path) -> None:
    server.reply("overpy/json/way-02.json")
    uris = [run(server, tmp_path, query=f"[out:json];way({i});out;") for i in range(3)]
    result = harvest_overpass(uris, [BUILDING], WORLD)
    assert len(result.frames["building"]) == 1


def test_incomplete_replies_are_counted_not_dropped(server: ReplayServer, tmp_path: Path) -> None:
    """A way whose nodes are missing (result-way-01: no nodes) is skipped_invalid."""
    server.reply("overpy/json/result-way-01.json")
    result = harvest_overpass([run(server, tmp_path)], [BUILDING], WORLD)
    assert result.counts["building"]["skipped_invalid"] == 1
    assert result.counts["building"]["features"] == 0
    assert any("no features" in w for w in result.warnings)


def test_recorded_xml_replies_give_what_the_json_replies_give(server: ReplayServer,
                                                             tmp_path: Path) -> None:
    """Real recorded XML replies, served and parsed like the matching JSON ones:
    a building (way-02), a building with more tags (way-03), a way without its
    nodes (way-01) and a tagged node (node-01)."""
    expected = {"way-01": {"building": []}, "way-02": {"building": [317146077]},
                "way-03": {"building": [225576797]}, "node-01": {"turning": [100793192]}}
    for name, ids in expected.items():
        replies = {}
        for fmt in ("xml", "json"):
            server.reply(f"overpy/{fmt}/{name}.{fmt}")
            uri = run(server, tmp_path / fmt / name)
            assert uri.endswith(f".{fmt}")
            replies[fmt] = harvest_overpass([uri], [BUILDING, TURNING], WORLD)
        xml, js = replies["xml"], replies["json"]
        assert xml.counts == js.counts, name
        for cls, frame in xml.frames.items():
            assert list(frame.osm_id) == ids.get(cls, []), (name, cls)
            other = js.frames[cls]
            assert frame.drop(columns="geometry").equals(other.drop(columns="geometry"))
            assert frame.geometry.geom_equals_exact(other.geometry, 0).all()
    assert xml.frames["turning"].geometry.iloc[0].centroid.coords[0] == pytest.approx(
        (7.1709376, 50.7468472))
    assert js.counts["building"]["features"] == 0  # node-01 has no way


# --- multipolygon assembly: rings nested by containment, as osmium does ----------------

SCALE = 1e-4  # ring coordinates below are in units of 1e-4 degree around (7E, 50N)


def square(x0: int, x1: int) -> list[tuple[int, int]]:
    return [(x0, x0), (x1, x0), (x1, x1), (x0, x1), (x0, x0)]


OUTER, HOLE, ISLAND = square(0, 10), square(2, 8), square(4, 6)
RELATIONS = {  # id: (member ways as (role, corner points), building value)
    # the outer ring split in two ways, a hole, an island in the hole
    1: ([("outer", OUTER[:3]), ("outer", OUTER[2:]), ("inner", HOLE), ("outer", ISLAND)],
        "island"),
    # an outer ring that does not close
    2: ([("outer", [(20, 0), (30, 0), (30, 10)])], "open"),
}


def write_relations(path: Path, fmt: str) -> Path:
    """RELATIONS as an Overpass JSON reply or as OSM XML (which is also what
    Overpass answers with [out:xml]); member ways carry no tags."""
    node_ids: dict[tuple[int, int], int] = {}
    ways: list[tuple[int, list[int]]] = []
    rels: list[tuple[int, list[tuple[str, int]], str]] = []
    for rel_id, (members, value) in RELATIONS.items():
        refs = []
        for role, points in members:
            ways.append((100 + len(ways), [node_ids.setdefault(p, len(node_ids) + 1)
                                           for p in points]))
            refs.append((role, ways[-1][0]))
        rels.append((rel_id, refs, value))
    nodes = [(i, 7 + x * SCALE, 50 + y * SCALE) for (x, y), i in node_ids.items()]
    if fmt == "json":
        elements = [{"type": "node", "id": i, "lat": lat, "lon": lon} for i, lon, lat in nodes]
        elements += [{"type": "way", "id": i, "nodes": refs} for i, refs in ways]
        elements += [{"type": "relation", "id": i, "tags": {"type": "multipolygon",
                                                             "building": value},
                      "members": [{"type": "way", "ref": r, "role": role} for role, r in refs]}
                     for i, refs, value in rels]
        path.write_text(json.dumps({"version": 0.6, "generator": "Overpass API",
                                    "elements": elements}))
        return path
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<osm version="0.6" generator="Overpass API">']
    lines += [f'<node id="{i}" lat="{lat}" lon="{lon}"/>' for i, lon, lat in nodes]
    lines += [f'<way id="{i}">' + "".join(f'<nd ref="{r}"/>' for r in refs) + "</way>"
              for i, refs in ways]
    lines += [f'<relation id="{i}">'
              + "".join(f'<member type="way" ref="{r}" role="{role}"/>' for role, r in refs)
              + f'<tag k="type" v="multipolygon"/><tag k="building" v="{value}"/></relation>'
              for i, refs, value in rels]
    path.write_text("\n".join([*lines, "</osm>"]))
    return path


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_an_island_in_a_hole_is_kept_as_osmium_keeps_it(server: ReplayServer, tmp_path: Path,
                                                        fmt: str) -> None:
    reply = write_relations(tmp_path / f"reply.{fmt}", fmt)
    server.reply(str(reply))
    via_overpass = harvest_overpass([run(server, tmp_path)], [BUILDING], WORLD)
    frame = via_overpass.frames["building"]
    assert list(frame.osm_id) == [1]
    geom = frame.geometry.iloc[0]
    ring_area = {name: Polygon(r).area * SCALE**2 for name, r in
                 (("outer", OUTER), ("hole", HOLE), ("island", ISLAND))}
    expected = ring_area["outer"] - ring_area["hole"] + ring_area["island"]
    assert geom.area == pytest.approx(expected, rel=1e-9)
    centre, in_hole = (7 + 5 * SCALE, 50 + 5 * SCALE), (7 + 3 * SCALE, 50 + 3 * SCALE)
    assert geom.contains(shapely.Point(centre)) and not geom.contains(shapely.Point(in_hole))
    assert via_overpass.counts["building"]["skipped_invalid"] == 1  # the open ring

    # the same relations read from a file by osmium's area assembler
    via_osmium = harvest_osm(str(write_relations(tmp_path / "same.osm", "xml")), [BUILDING],
                             WORLD)
    assert via_osmium.counts == via_overpass.counts
    assert shapely.equals(via_osmium.frames["building"].geometry.iloc[0], geom)


def test_rings_sharing_an_edge_merge_and_split_rings_must_close() -> None:
    from mapgap.tasks.overpass import ring_segments

    left, right = square(0, 1), [(1, 0), (2, 0), (2, 1), (1, 1), (1, 0)]
    segments = ring_segments([left, right])
    assert segments is not None and ((1, 0), (1, 1)) not in segments  # the shared edge
    assert shapely.build_area(shapely.multilinestrings(segments)).equals(box(0, 0, 2, 1))
    assert ring_segments([OUTER[:3], OUTER[2:]]) is not None
    assert ring_segments([OUTER[:3]]) is None  # an open ring
    assert ring_segments([[(0, 0), (0, 0)]]) is None  # nothing left


# --- the flow: one cached task per sub-box ---------------------------------------------

@pytest.mark.slow
def test_flow_rerun_asks_only_the_failed_box(server: ReplayServer, tmp_path: Path) -> None:
    from mapgap.conf.schema import validate_config
    from mapgap.flows.harvest import harvest_flow
    from mapgap.orchestration import configured

    server.reply("wrapper/example_body.json")
    aoi = (-122.33, 37.83, -122.16, 37.875)
    cfg = validate_config({
        "name": "op", "storage": {"root": str(tmp_path)}, "aoi": list(aoi), "zoom": 12,
        "classes": [PROTECTED.model_dump(), ROAD.model_dump()],
        "labels": {"source": server.url, "overpass": {**FAST.model_dump(), "max_box_deg": 0.1,
                                                      "retries": 1}},
        "imagery": {"source": "http://127.0.0.1:1/{z}/{x}/{y}.png"},
    }, "test", tmp_path)
    boxes = split_boxes(cfg.aoi_geometry, 0.1)
    assert len(boxes) == 2
    w, s, e, n = boxes[1]
    server.fail_queries_with(f"({s},{w},{n},{e})", "504")
    flow = configured(harvest_flow, cfg)
    state = flow(cfg, return_state=True)
    assert state.is_failed()
    assert len(server.interpreter_requests()) == 1 + 2  # box 0 once, box 1 with one retry

    server.failing.clear()
    summary = flow(cfg)
    assert len(server.interpreter_requests()) == 3 + 1  # only the failed box again
    assert summary["features"] == {"protected": 1, "road": 1}
    tiles = grid.tiles_for_geometry(cfg.aoi_geometry, 12)
    stats = storage.read_json(summary["mask_stats"])
    assert set(stats) == {grid.tile_key(t) for t in tiles}
    assert any(v["foreground"]["protected"] > 0 for v in stats.values())
    from PIL import Image

    values = set()
    for t in tiles:
        values |= set(np.unique(np.asarray(Image.open(storage.join(
            cfg.run_uri, "masks", str(t.z), str(t.x), f"{t.y}.png")))).tolist())
    assert values <= {0, 1, 2} and 1 in values


@pytest.mark.parametrize(("page", "text"), [
    # what Overpass itself, a proxy or a captive portal answer with status 200
    ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0'
    ' Strict//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\n<html'
    ' xmlns="http://www.w3.org/1999/xhtml"><head><title>OSM3S Response</title></head><body>'
    '<p><strong>Error</strong>: Error: line 1: parse error: Key expected. </p></body></html>',
     "an HTML page, not OSM data: line 1: parse error: Key expected."),
    ("<!DOCTYPE html><html><head><title>Sign in</title></head><body><p>Error: Please sign in"
     " to use this network.<br></body></html>",
     "an HTML page, not OSM data: Please sign in to use this network."),
    ('<?xml version="1.0"?><rss version="2.0"><channel><title>news</title></channel></rss>',
     "XML reply is not OSM data (<rss>)"),
])
def test_a_permanent_non_osm_reply_is_not_retried(server: ReplayServer, tmp_path: Path,
                                                 page: str, text: str) -> None:
    (tmp_path / "page.html").write_text(page)
    server.reply(str(tmp_path / "page.html"))
    with pytest.raises(OverpassError) as err:
        run(server, tmp_path)
    assert len(server.interpreter_requests()) == 1  # asking again gets the same page
    assert str(err.value) == f"{server.url}: {text}"
    assert not (tmp_path / "cache").exists()
