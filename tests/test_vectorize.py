"""Polygons from probability tiles: filters in metres, cross-tile and cross-batch
merges, simplification, squaring, minimum area in m2."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import shapely

from mapgap import storage
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.tasks.geometry import read_geojson
from mapgap.tasks.predict import encode_probability
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
from tests.helpers_inference import ORIGIN, SIZE, Z

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
