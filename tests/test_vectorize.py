"""Polygons from probability tiles: filters in metres, cross-tile and cross-batch
merges, simplification, squaring, minimum area in m2."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import shapely
from affine import Affine

from mapgap import storage
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.tasks.geometry import pixels_to_lonlat, read_geojson
from mapgap.tasks.predict import encode_probability
from mapgap.tasks.rasterize import burn_instances, instance_signed_distance
from mapgap.tasks.vectorize import (
    Pieces,
    VectorSettings,
    finish,
    kernel_px,
    merge_and_write,
    merge_border_pieces,
    orthogonalize,
    vectorize_tiles,
    write_pieces,
)
from tests.helpers_inference import ORIGIN, SIZE, Z, make_config

MPP = 2 * math.pi * 6378137 / (2**Z * SIZE)  # metres per pixel at the equator (sphere)


def geodesic_area(col0: float, row0: float, col1: float, row1: float) -> float:
    """True (WGS84 ellipsoid) area of a pixel rectangle of the mosaic at ORIGIN."""
    from pyproj import Geod

    from tests.helpers_inference import tile_lonlat

    w, n = tile_lonlat(ORIGIN.x + col0 / SIZE, ORIGIN.y + row0 / SIZE)
    e, s = tile_lonlat(ORIGIN.x + col1 / SIZE, ORIGIN.y + row1 / SIZE)
    return abs(Geod(ellps="WGS84").geometry_area_perimeter(shapely.box(w, s, e, n))[0])


def write_probs(layout: RunLayout, mosaic: np.ndarray) -> list[Tile]:
    """uint8 probabilities [C, H, W] of a whole mosaic -> probability tiles."""
    tiles = []
    for r in range(mosaic.shape[1] // SIZE):
        for c in range(mosaic.shape[2] // SIZE):
            t = Tile(ORIGIN.x + c, ORIGIN.y + r, Z)
            part = np.ascontiguousarray(mosaic[:, r * SIZE:(r + 1) * SIZE,
                                               c * SIZE:(c + 1) * SIZE])
            storage.write_bytes(layout.probability(t), encode_probability(part))
            tiles.append(t)
    return tiles


def settings(**kw) -> VectorSettings:
    base = dict(classes=("building",), zoom=Z, tile_size=SIZE, min_area_m2=1.0, simplify_m=0.0)
    return VectorSettings(**{**base, **kw})


def polygons(layout: RunLayout, batches: list[list[Tile]], s: VectorSettings):
    """Run the batch step per batch (as separate tasks would) and the merge."""
    uris = []
    for i, batch in enumerate(batches):
        interior, border = vectorize_tiles(layout, batch, s)
        finished = {name: finish(p, name, s) for name, p in interior.items()}
        uris.append(write_pieces(layout.vector_pieces(f"b{i}"), finished, border))
    counts = merge_and_write(layout, uris, s)
    geoms, props = read_geojson(layout.predictions)
    assert sum(counts.values()) == len(geoms)
    return geoms, props


@pytest.fixture()
def layout(tmp_path) -> RunLayout:
    return RunLayout(str(tmp_path / "run"))


def test_object_split_across_batches_and_tiles_is_merged(layout) -> None:
    """A 3x1-tile-long roof whose tiles go to two different batches: one feature,
    exact area, all three tiles listed; a neighbour that only touches a corner stays apart."""
    m = np.zeros((1, SIZE, 3 * SIZE), np.uint8)
    m[0, 100:140, 50:3 * SIZE - 50] = 230
    m[0, 140:150, 3 * SIZE - 50:3 * SIZE - 40] = 230  # touches the roof at one corner only
    tiles = write_probs(layout, m)
    geoms, props = polygons(layout, [tiles[:2], tiles[2:]], settings())
    big = int(np.argmax([p["area_m2"] for p in props]))
    assert len(geoms) == 2
    assert props[big]["tiles"] == sorted(f"z{Z}_{t.x}_{t.y}" for t in tiles)
    assert props[big]["area_m2"] == pytest.approx(geodesic_area(50, 100, 3 * SIZE - 50, 140),
                                                  rel=1e-4)
    assert geoms[big].geom_type == "Polygon" and len(geoms[big].exterior.coords) == 5
    assert props[big]["score"] == pytest.approx(230 / 255, abs=1e-3)


def test_open_and_close_sizes_are_metres(layout) -> None:
    m = np.zeros((1, SIZE, SIZE), np.uint8)
    m[0, 50:110, 50:110] = 255
    m[0, 78:80, 78:80] = 0  # a 2 px pinhole: closed by a 3 m close
    m[0, 200:202, 200:202] = 255  # a 2 px speck: removed by a 3 m open
    tiles = write_probs(layout, m)
    size_m = 3 * MPP
    assert kernel_px(size_m, MPP) == 3
    geoms, _ = polygons(layout, [tiles], settings(open_px=3, close_px=3))
    assert len(geoms) == 1 and not geoms[0].interiors
    raw, _ = polygons(layout, [tiles], settings())
    assert len(raw) == 2 and len(raw[0].interiors) + len(raw[1].interiors) == 1


def test_filters_agree_across_tile_borders(layout) -> None:
    """A pinhole right on a tile border is closed exactly like one inside a tile:
    the mask gets context from the neighbour before filtering."""
    m = np.zeros((1, SIZE, 2 * SIZE), np.uint8)
    m[0, 50:110, SIZE - 30:SIZE + 30] = 255
    m[0, 78:80, SIZE - 1:SIZE + 1] = 0
    tiles = write_probs(layout, m)
    geoms, _ = polygons(layout, [tiles], settings(close_px=3))
    assert len(geoms) == 1 and not geoms[0].interiors


def test_minimum_area_is_square_metres(layout) -> None:
    m = np.zeros((1, SIZE, SIZE), np.uint8)
    m[0, 10:20, 10:20] = 255  # 100 px ~ 35.6 m2
    m[0, 100:104, 100:104] = 255  # 16 px ~ 5.7 m2
    tiles = write_probs(layout, m)
    _, props = polygons(layout, [tiles], settings(min_area_m2=10.0))
    assert [p["area_m2"] for p in props] == [pytest.approx(geodesic_area(10, 10, 20, 20),
                                                           rel=1e-3)]


def test_two_classes_come_from_their_own_bands(layout) -> None:
    m = np.zeros((2, SIZE, SIZE), np.uint8)
    m[0, 10:60, 10:60] = 255
    m[1, 100:200, 100:120] = 255
    tiles = write_probs(layout, m)
    _, props = polygons(layout, [tiles], settings(classes=("building", "road")))
    assert sorted((p["class"], p["area_m2"]) for p in props) == [
        ("building", pytest.approx(geodesic_area(10, 10, 60, 60), rel=1e-3)),
        ("road", pytest.approx(geodesic_area(100, 100, 120, 200), rel=1e-3))]


def test_simplify_tolerance_in_metres_removes_staircase(layout) -> None:
    m = np.zeros((1, SIZE, SIZE), np.uint8)
    cv2.fillPoly(m[0], [np.array([[30, 60], [150, 20], [190, 140], [70, 180]], np.int32)], 255)
    tiles = write_probs(layout, m)
    raw, _ = polygons(layout, [tiles], settings())
    simple, _ = polygons(layout, [tiles], settings(simplify_m=2 * MPP))
    assert len(simple[0].exterior.coords) < 12 < len(raw[0].exterior.coords)
    assert shapely.area(simple[0]) == pytest.approx(shapely.area(raw[0]), rel=0.03)


def test_orthogonalize_squares_rotated_buildings_only() -> None:
    rect = shapely.affinity.rotate(shapely.box(0, 0, 40, 20), 30, origin=(0, 0))
    noisy = shapely.Polygon(np.asarray(rect.exterior.coords)[:-1]
                            + np.random.default_rng(1).normal(0, 0.4, (4, 2)))
    square = orthogonalize(noisy)
    coords = np.asarray(square.exterior.coords)
    edges = np.diff(coords, axis=0)
    cosines = [abs(np.dot(a, b)) / np.linalg.norm(a) / np.linalg.norm(b)
               for a, b in zip(edges, np.roll(edges, -1, axis=0), strict=True)]
    assert len(coords) == 5 and max(cosines) < 1e-9
    assert square.area == pytest.approx(800, rel=0.05)
    ell = shapely.Polygon([(0, 0), (30, 0), (30, 10), (10, 10), (10, 30), (0, 30)])
    assert len(orthogonalize(shapely.affinity.rotate(ell, 17)).exterior.coords) == 7
    circle = shapely.Point(0, 0).buffer(10, 4)
    assert orthogonalize(circle).equals(circle)


def test_border_pieces_merge_only_across_tiles_and_along_edges() -> None:
    a, b = shapely.box(0, 0, 10, 10), shapely.box(10, 0, 20, 10)  # shared edge
    c = shapely.box(20, 10, 30, 20)  # touches b at one corner
    d = shapely.box(0, 10, 10, 20)  # same tile as a, shares its edge (kept apart)
    p = Pieces([a, b, c, d], [1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], [["t1"], ["t2"], ["t3"], ["t1"]])
    merged = merge_border_pieces(p)
    assert sorted(merged.counts) == [1, 1, 2]
    i = merged.counts.index(2)
    assert merged.geoms[i].equals(shapely.box(0, 0, 20, 10)) and merged.tiles[i] == ["t1", "t2"]
    assert merged.sums[i] == 3.0


def test_empty_probabilities_give_an_empty_collection(layout) -> None:
    tiles = write_probs(layout, np.zeros((1, SIZE, SIZE), np.uint8))
    geoms, props = polygons(layout, [tiles], settings())
    assert len(geoms) == 0 and props == []


# --- touching buildings: split along the predicted instance distance -----------------------

SPLIT = dict(distance_band=1, instance_classes=("building",))


def predicted(buildings: list[shapely.Geometry], cols: int, rows: int = 1) -> np.ndarray:
    """[building probability, distance] of a mosaic, from polygons in mosaic pixels:
    the harvest's own per-instance distance target, blurred like a prediction."""
    instances = burn_instances(np.asarray(buildings, dtype=object), Affine.identity(),
                               (rows * SIZE, cols * SIZE))
    prob = np.where(instances > 0, 230, 10).astype(np.uint8)
    distance = instance_signed_distance(instances, clip_px=16)
    return np.stack([cv2.GaussianBlur(b, (0, 0), 1.0) for b in (prob, distance)])


def matched(geoms: np.ndarray, buildings: list[shapely.Geometry]) -> list[float]:
    """Per building, the best IoU of an output polygon (lon/lat) with it."""
    shifted = [shapely.affinity.translate(b, ORIGIN.x * SIZE, ORIGIN.y * SIZE)
               for b in buildings]
    truth = pixels_to_lonlat(np.asarray(shifted, dtype=object), Z, SIZE)
    return [max(g.intersection(t).area / g.union(t).area for g in geoms) for t in truth]


def test_touching_buildings_in_one_tile_come_out_apart(layout) -> None:
    houses = [shapely.box(40, 40, 100, 90), shapely.box(100, 40, 150, 90),
              shapely.box(150, 50, 190, 80)]  # a terrace of three
    tiles = write_probs(layout, predicted(houses, cols=1))
    geoms, _ = polygons(layout, [tiles], settings(**SPLIT))
    assert len(geoms) == 3 and min(matched(geoms, houses)) > 0.9
    # shared walls are shared edges: no gap, no overlap
    assert shapely.union_all(geoms).geom_type == "Polygon"
    assert sum(g.area for g in geoms) == pytest.approx(shapely.union_all(geoms).area, rel=1e-6)
    # the same probabilities read without their distance band: today's one blob
    blob, _ = polygons(layout, [tiles], settings())
    assert len(blob) == 1


WALLS = {  # two touching houses on a 2x1 mosaic, the tile border at x = 256
    "wall across the border": [shapely.box(200, 60, 320, 110), shapely.box(200, 110, 320, 170)],
    "wall on the border": [shapely.box(180, 60, 256, 130), shapely.box(256, 60, 340, 130)],
    "wall 2 px right": [shapely.box(180, 60, 258, 130), shapely.box(258, 60, 340, 130)],
    "wall 3 px left": [shapely.box(180, 60, 253, 130), shapely.box(253, 60, 340, 130)],
}


@pytest.mark.parametrize("name", list(WALLS))
def test_touching_buildings_at_a_tile_border_stay_apart_and_whole(layout, name: str) -> None:
    houses = WALLS[name]
    tiles = write_probs(layout, predicted(houses, cols=2))
    geoms, props = polygons(layout, [[t] for t in tiles], settings(**SPLIT))  # one batch each
    assert len(geoms) == 2 and min(matched(geoms, houses)) > 0.9
    assert all(g.geom_type == "Polygon" for g in geoms)
    crossing = [h for h in houses if h.bounds[0] < SIZE < h.bounds[2]]
    assert sum(len(p["tiles"]) == 2 for p in props) == len(crossing)


def test_one_building_stays_one_polygon(layout) -> None:
    """An L across a border, a long block over four tiles and a plain house: one
    seed each (or one component), so no split, and each is merged whole."""
    ell = shapely.Polygon([(200, 40), (300, 40), (300, 70), (240, 70), (240, 160), (200, 160)])
    block = shapely.box(230, 230, 300, 290)  # over the corner of four tiles
    house = shapely.box(40, 300, 90, 340)
    buildings = [ell, block, house]
    tiles = write_probs(layout, predicted(buildings, cols=2, rows=2))
    geoms, props = polygons(layout, [tiles[:1], tiles[1:3], tiles[3:]], settings(**SPLIT))
    assert len(geoms) == 3 and min(matched(geoms, buildings)) > 0.9
    assert sorted(len(p["tiles"]) for p in props) == [1, 2, 4]


def test_border_pieces_of_instances_merge_only_where_both_continue() -> None:
    """Two pieces across a border merge only on an agreed stretch of continuing edge,
    long enough for the smaller claim: a wall on the border or a split line one
    pixel off never fuses two houses."""
    left, right = shapely.box(0, 0, 10, 20), shapely.box(10, 0, 20, 20)
    border = shapely.MultiLineString([[(10, 0), (10, 20)]])
    none = shapely.MultiLineString()
    one_px = shapely.MultiLineString([[(10, 0), (10, 1)]])

    def merged(open_left: shapely.Geometry, open_right: shapely.Geometry) -> int:
        p = Pieces([left, right], [1.0, 1.0], [1, 1], [["t1"], ["t2"]], [open_left, open_right])
        return len(merge_border_pieces(p).geoms)

    assert merged(border, border) == 1  # one house cut by the border
    assert merged(none, none) == 2  # a wall on the border: each sees the other house
    assert merged(border, none) == 2
    lower = shapely.MultiLineString([[(10, 0), (10, 10)]])
    upper_and_one = shapely.MultiLineString([[(10, 9), (10, 20)]])
    assert merged(lower, upper_and_one) == 2  # only one pixel of 10 agrees
    assert merged(one_px, border) == 1  # a small piece agreeing fully joins


def test_split_settings_come_from_config_and_bands(tmp_path) -> None:
    classes = [{"name": "building", "separate_instances": True,
                "tags": {"include": {"building": "*"}}},
               {"name": "road", "geometry": "line", "width_m": 6,
                "tags": {"include": {"highway": "*"}}}]
    cfg = make_config(tmp_path, classes=classes, labels={"signed_distance_clip_px": 12})
    names = ["building", "road"]
    s = VectorSettings.from_config(cfg, names, bands=[*names, "distance"])
    assert (s.distance_band, s.instance_classes, s.sdt_clip_px) == (2, ("building",), 12)
    assert s.n_bands == 3 and s.split_classes == ("building",)
    assert s.margin == (s.open_px - 1) + (s.close_px - 1) + s.split_context_px
    plain = VectorSettings.from_config(cfg, names)
    assert plain.distance_band is None and plain.split_classes == () and plain.n_bands == 2
    hash(s)  # a cache key
