"""The synthetic demo town: determinism, OSM structure, withheld buildings, tiles vs GeoTIFF."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mercantile
import numpy as np
import osmium
import pytest
import rasterio
import shapely
from affine import Affine
from PIL import Image
from pyproj import Transformer
from rasterio.features import rasterize
from shapely.geometry import shape

from mapgap.demo_scene import SceneFiles, generate_scene

SMALL_M = 450.0  # 3 x 3 tiles at zoom 18: quick scenes for the determinism checks
_TO_3857 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)


def _mercator(geom: shapely.Geometry) -> shapely.Geometry:
    return shapely.transform(geom, lambda a: np.column_stack(_TO_3857.transform(a[:, 0], a[:, 1])))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


@pytest.fixture(scope="session")
def scene(tmp_path_factory: pytest.TempPathFactory) -> SceneFiles:
    return generate_scene(tmp_path_factory.mktemp("full"), seed=0)


@pytest.fixture(scope="session")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[SceneFiles]:
    """Two runs with seed 5 and one with seed 6."""
    return [generate_scene(tmp_path_factory.mktemp(f"small{i}"), seed=seed, size_m=SMALL_M)
            for i, seed in enumerate((5, 5, 6))]


@pytest.fixture(scope="session")
def pbf(scene: SceneFiles) -> dict:
    """Everything in the PBF, copied out of osmium's short-lived objects, in file order."""
    out: dict = {"order": [], "nodes": {}, "ways": {}, "relations": {}}
    for obj in osmium.FileProcessor(str(scene.pbf)):
        out["order"].append((obj.type_str(), obj.id))
        tags = dict(obj.tags)
        if obj.is_node():
            out["nodes"][obj.id] = tags
        elif obj.is_way():
            out["ways"][obj.id] = ([n.ref for n in obj.nodes], tags)
        else:
            out["relations"][obj.id] = ([(m.type, m.ref, m.role) for m in obj.members], tags)
    return out


@pytest.fixture(scope="session")
def pbf_buildings(scene: SceneFiles) -> list[shapely.Geometry]:
    """Building polygons as osmium's area assembler builds them (EPSG:3857)."""
    wkb = osmium.geom.WKBFactory()
    polys = []
    for area in osmium.FileProcessor(str(scene.pbf)).with_areas():
        if area.is_area() and "building" in area.tags:
            polys.append(_mercator(shapely.from_wkb(wkb.create_multipolygon(area))))
    return polys


def test_same_seed_gives_identical_bytes(small: list[SceneFiles]) -> None:
    a, b, _ = small
    da, db = _digests(a.root), _digests(b.root)
    assert da == db
    names = set(da)
    assert {"town.osm.pbf", "imagery.tif", "truth.geojson", "withheld.geojson",
            "complete_areas.geojson", "preview.png"} <= names
    assert sum(n.startswith("tiles/") for n in names) == 9


def test_different_seed_differs(small: list[SceneFiles]) -> None:
    a, _, c = small
    da, dc = _digests(a.root), _digests(c.root)
    for name in ("town.osm.pbf", "imagery.tif", "truth.geojson", "withheld.geojson"):
        assert da[name] != dc[name], name
    assert a.bbox == c.bbox  # the seed changes the town, not where it is


def test_rerun_replaces_outputs_without_leftovers(tmp_path: Path) -> None:
    generate_scene(tmp_path, seed=1, zoom=17, size_m=300.0)
    files = generate_scene(tmp_path, seed=1, zoom=18, size_m=300.0)
    assert [p.name for p in (files.tiles_dir).iterdir()] == ["18"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bbox_and_tiles_are_whole_tiles(scene: SceneFiles) -> None:
    w, s, e, n = scene.bbox
    assert (e - w) * 111_000 == pytest.approx(1000, rel=0.15)
    eps = 1e-9
    inner = (w + eps, s + eps, e - eps, n - eps)
    expected = {(t.x, t.y) for t in mercantile.tiles(*inner, scene.zoom)}
    found = {(int(p.parent.name), int(p.stem))
             for p in (scene.tiles_dir / str(scene.zoom)).glob("*/*.png")}
    assert found == expected
    corners = [mercantile.bounds(*min(expected), scene.zoom),
               mercantile.bounds(*max(expected), scene.zoom)]
    assert (corners[0].west, corners[0].north) == pytest.approx((w, n), abs=1e-12)
    assert (corners[1].east, corners[1].south) == pytest.approx((e, s), abs=1e-12)


def test_tiles_match_geotiff(scene: SceneFiles) -> None:
    with rasterio.open(scene.geotiff) as src:
        assert src.crs.to_epsg() == 3857
        assert src.count == 3 and src.dtypes == ("uint8",) * 3
        assert src.block_shapes == [(256, 256)] * 3
        assert src.compression.name.lower() == "deflate"
        img = src.read()
        left, top = src.bounds.left, src.bounds.top
        res = src.res[0]
    tiles = sorted((scene.tiles_dir / str(scene.zoom)).glob("*/*.png"))
    for path in tiles:
        tb = mercantile.xy_bounds(int(path.parent.name), int(path.stem), scene.zoom)
        col, row = round((tb.left - left) / res), round((top - tb.top) / res)
        tile = np.asarray(Image.open(path))
        assert tile.shape == (256, 256, 3)
        np.testing.assert_array_equal(tile, np.moveaxis(img[:, row: row + 256, col: col + 256],
                                                        0, -1))
    assert img.shape[1] * img.shape[2] == 256 * 256 * len(tiles)


def test_pbf_is_sorted_with_valid_refs(pbf: dict) -> None:
    kinds = [k for k, _ in pbf["order"]]
    assert kinds == sorted(kinds, key="nwr".index)
    for kind in "nwr":
        ids = [i for k, i in pbf["order"] if k == kind]
        assert ids == sorted(ids) and ids[0] > 0
    for refs, _ in pbf["ways"].values():
        assert all(r in pbf["nodes"] for r in refs)
    for members, _ in pbf["relations"].values():
        assert all(ref in pbf["ways"] for typ, ref, _ in members if typ == "w")


def test_pbf_tags(pbf: dict) -> None:
    way_tags = [tags for _, tags in pbf["ways"].values()]
    highways = {t["highway"] for t in way_tags if "highway" in t}
    assert {"primary", "tertiary", "residential", "service"} <= highways
    assert any("lanes" in t for t in way_tags)
    assert {t["building"] for t in way_tags if "building" in t} <= {
        "yes", "house", "residential", "commercial"}
    assert any(t.get("amenity") == "parking" for t in way_tags)
    assert sum(t.get("natural") == "tree" for t in pbf["nodes"].values()) > 50
    # junctions are shared: some node is used by more than one road
    uses: dict[int, int] = {}
    for refs, tags in pbf["ways"].values():
        if "highway" in tags:
            for r in set(refs):
                uses[r] = uses.get(r, 0) + 1
    assert max(uses.values()) >= 2


def test_courtyards_assemble_into_polygons_with_holes(pbf: dict,
                                                      pbf_buildings: list) -> None:
    rels = [(m, t) for m, t in pbf["relations"].values() if "building" in t]
    assert rels and all(t["type"] == "multipolygon" for _, t in rels)
    assert all({role for _, _, role in m} == {"outer", "inner"} for m, _ in rels)
    holed = [g for g in pbf_buildings if any(p.interiors for p in shapely.get_parts(g))]
    assert len(holed) == len(rels)


def test_withheld_absent_from_pbf_but_in_truth(scene: SceneFiles, pbf_buildings: list) -> None:
    truth = [f for f in _features(scene.truth) if f["properties"]["class"] == "building"]
    withheld = _features(scene.withheld)
    assert 250 <= len(truth) <= 450
    assert 0.10 - 1 / len(truth) <= len(withheld) / len(truth) <= 0.15 + 1 / len(truth)
    assert len(pbf_buildings) + len(withheld) == len(truth)
    by_id = {f["properties"]["id"]: f for f in truth}
    tree = shapely.STRtree(pbf_buildings)
    for f in withheld:
        assert f["properties"]["class"] == "building"
        assert by_id[f["properties"]["id"]]["properties"]["withheld"] is True
        poly = _mercator(shape(f["geometry"]))
        assert poly.equals_exact(_mercator(shape(by_id[f["properties"]["id"]]["geometry"])), 1e-6)
        assert not len(tree.query(poly, predicate="intersects"))


def test_withheld_buildings_come_in_patches_outside_the_complete_areas(
        scene: SceneFiles, pbf_buildings: list) -> None:
    """Gaps are a few unmapped neighbourhoods, not one building here and there; the
    complete areas (validated task squares) hold mapped buildings and no gap."""
    withheld = [_mercator(shape(f["geometry"])) for f in _features(scene.withheld)]
    centres = np.array([g.centroid.coords[0] for g in withheld])
    # Most withheld buildings have another one within 60 m; scattered ones would not.
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=2) + np.eye(len(centres)) * 1e9
    assert (dist.min(axis=1) < 60).mean() > 0.9
    squares = [_mercator(shape(f["geometry"])) for f in _features(scene.complete_areas)]
    tiles = sum(1 for _ in (scene.tiles_dir / str(scene.zoom)).glob("*/*.png"))
    assert 0.4 * tiles <= len(squares) < tiles
    area = shapely.union_all(squares)
    assert not any(area.intersects(g) for g in withheld)
    assert sum(area.contains(g) for g in pbf_buildings) > 0.4 * len(pbf_buildings)


def test_withheld_buildings_are_visible(scene: SceneFiles) -> None:
    """Mean colour on each withheld roof differs from the ground ring around it."""
    buildings = [_mercator(shape(f["geometry"])) for f in _features(scene.truth)
                 if f["properties"]["class"] == "building"]
    others = shapely.union_all(buildings).buffer(1.5)
    with rasterio.open(scene.geotiff) as src:
        img, to_px = src.read().astype(float), ~src.transform
    contrasts = []
    for f in _features(scene.withheld):
        poly = _mercator(shape(f["geometry"]))
        ring = poly.buffer(6).difference(poly.buffer(2.5)).difference(others)
        minx, miny, maxx, maxy = poly.buffer(7).bounds
        c0, r0 = (max(0, int(v)) for v in to_px @ (minx, maxy))
        c1, r1 = (int(v) + 1 for v in to_px @ (maxx, miny))
        crop = img[:, r0:r1, c0:c1]
        kw = {"out_shape": crop.shape[1:], "transform": src.transform @ Affine.translation(c0, r0)}
        inside = rasterize([(poly.buffer(-1.0), 1)], **kw).astype(bool)
        around = rasterize([(ring, 1)], **kw).astype(bool)
        if inside.sum() < 20 or around.sum() < 20:
            continue
        diff = crop[:, inside].mean(axis=1) - crop[:, around].mean(axis=1)
        contrasts.append(float(np.abs(diff).max()))
    assert len(contrasts) >= 20
    assert np.median(contrasts) > 30
    assert np.mean(np.asarray(contrasts) > 12) > 0.9


def test_truth_has_every_class(scene: SceneFiles) -> None:
    feats = _features(scene.truth)
    classes = {f["properties"]["class"] for f in feats}
    assert {"building", "road", "parking", "tree", "grass", "soil", "car", "truck", "container",
            "tennis_court"} <= classes
    w, s, e, n = scene.bbox
    frame = shapely.box(w, s, e, n)
    assert all(frame.contains(shape(f["geometry"])) for f in feats
               if f["properties"]["class"] == "building")


def test_preview_is_about_1024_px(scene: SceneFiles) -> None:
    with Image.open(scene.preview) as im:
        assert im.mode == "RGB" and max(im.size) == 1024
