"""Tile math round trips, neighbours and parents (mercantile underneath)."""

from __future__ import annotations

import pytest
from shapely.geometry import Polygon, box

from mapgap import grid
from mapgap.grid import Tile


def test_pixel_lonlat_round_trip() -> None:
    tile = Tile(1238424, 1046544, 21)
    for col, row in [(0, 0), (255.5, 12.25), (256, 256), (100, 200)]:
        lon, lat = grid.pixel_to_lonlat(tile, 256, col, row)
        c, r = grid.lonlat_to_pixel(tile, 256, lon, lat)
        assert (c, r) == pytest.approx((col, row), abs=1e-6)
    w, s, e, n = grid.tile_bounds(tile)
    assert grid.pixel_to_lonlat(tile, 256, 0, 0) == pytest.approx((w, n))
    assert grid.pixel_to_lonlat(tile, 256, 256, 256) == pytest.approx((e, s))


def test_tiles_for_bbox_is_exact_for_tile_aligned_bbox() -> None:
    tiles = [Tile(10, 20, 6), Tile(11, 20, 6), Tile(10, 21, 6), Tile(11, 21, 6)]
    bounds = [grid.tile_bounds(t) for t in tiles]
    bbox = (min(b[0] for b in bounds), min(b[1] for b in bounds),
            max(b[2] for b in bounds), max(b[3] for b in bounds))
    assert grid.tiles_for_bbox(bbox, 6) == sorted(tiles, key=lambda t: (t.z, t.x, t.y))


def test_tiles_for_geometry_drops_tiles_outside_polygon() -> None:
    tiles = [Tile(x, y, 10) for x in range(100, 103) for y in range(200, 203)]
    corner = grid.tile_bounds(Tile(100, 200, 10))
    far = grid.tile_bounds(Tile(102, 202, 10))
    # A thin diagonal triangle touching the top-left and bottom-right tiles only roughly.
    tri = Polygon([(corner[0], corner[3]), (corner[2], corner[3]), (far[2], far[1])])
    got = grid.tiles_for_geometry(tri, 10)
    assert Tile(100, 202, 10) not in got
    assert set(got) <= set(tiles) and Tile(100, 200, 10) in got
    assert all(tri.intersects(box(*grid.tile_bounds(t))) for t in got)


def test_neighbours_and_parent() -> None:
    t = Tile(5, 5, 4)
    nb = grid.neighbours(t)
    assert len(nb) == 8 and t not in nb
    assert {(n.x - 5, n.y - 5) for n in nb} == {
        (dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)
    }
    assert len(grid.neighbours(Tile(0, 0, 2))) == 5  # top row: nothing above, x wraps
    assert grid.parent(Tile(10, 12, 5), 3) == Tile(2, 3, 3)
    assert set(grid.children(Tile(2, 3, 3), 5)) >= {Tile(10, 12, 5)}
    with pytest.raises(ValueError):
        grid.parent(Tile(1, 1, 2), 3)


def test_tile_key_round_trip() -> None:
    t = Tile(1238424, 1046544, 21)
    assert grid.tile_key(t) == "z21_1238424_1046544"
    assert grid.parse_tile_key(grid.tile_key(t)) == t
    with pytest.raises(ValueError, match="not a tile key"):
        grid.parse_tile_key("21/1/2")


def test_metric_measures_are_metres() -> None:
    tile = Tile(1238424, 1046544, 21)  # Kampala, ~0.075 m/px
    assert grid.metres_per_pixel(tile, 256) == pytest.approx(0.0746, rel=0.01)
    w, s, e, n = grid.tile_bounds(tile)
    metric, crs = grid.to_metric(box(w, s, e, n))
    side = (metric.area) ** 0.5
    assert side == pytest.approx(256 * grid.metres_per_pixel(tile, 256), rel=0.01)
    assert crs.to_epsg() == 32636
    assert list(grid.iter_batches(range(5), 2)) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize(("bbox", "zoom"), [
    ((32.59, 0.34, 32.60, 0.35), 18), ((-0.01, -0.01, 0.01, 0.01), 16),
    ((179.5, -85.2, 180, -84.9), 9), ((-180, -90, 180, 90), 3), ((10, 10, 10.0001, 10.0001), 5),
    ((2.25, 48.8, 2.5, 48.9), 14),  # edges on tile boundaries at some zooms
])
def test_tile_count_is_arithmetic_and_matches_the_listing(bbox, zoom) -> None:
    from mapgap.grid import bbox_tile_count, tiles_for_bbox

    assert bbox_tile_count(bbox, zoom) == len(tiles_for_bbox(bbox, zoom))


def test_geometry_bound_is_an_upper_bound_without_listing_tiles() -> None:
    from shapely.geometry import MultiPolygon, box

    from mapgap.grid import bbox_tile_count, geometry_tile_bound, tiles_for_geometry

    two = MultiPolygon([box(0, 0, 0.01, 0.01), box(1, 1, 1.01, 1.01)])
    assert len(tiles_for_geometry(two, 16)) <= geometry_tile_bound(two, 16) < bbox_tile_count(
        two.bounds, 16) / 100
    assert geometry_tile_bound(box(-20, -35, 50, 35), 18) == 50_973 * 54_476  # not listed
