"""Label masks: agreement with real reference masks (SpaceNet Vegas roads,
RoboSat parking), class values by priority, the ignore band, the signed
distance target, per-tile stats, and the harvest flow end to end."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image
from shapely.geometry import box

from mapgap import grid, storage
from mapgap.conf.labels import ClassSpec
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.tasks.complete_areas import CompleteAreas
from mapgap.tasks.geometry import project
from mapgap.tasks.labels import write_geoparquet
from mapgap.tasks.rasterize import (
    IGNORE,
    BatchFeatures,
    RasterSpec,
    batch_id,
    burn,
    order_tiles,
    rasterize_tile,
    rasterize_tiles,
)
from mapgap.tasks.vector_labels import harvest_vector

try:
    from tests.conftest import shared_path
except ImportError:  # pragma: no cover
    from conftest import shared_path

WORLD = box(-180, -85, 180, 85)


def read_png(uri: str) -> np.ndarray:
    img = Image.open(uri)
    assert img.mode == "L"
    return np.asarray(img)


# --- real reference masks ------------------------------------------------------------------

def test_vegas_centre_lines_match_the_reference_road_mask() -> None:
    """SpaceNet's reference buffers centre lines by 2 m; a 4 m wide road class
    buffered in metres must reproduce it on the reference's own grid."""
    folder = shared_path("spacenet-vegas-roads")
    with rasterio.open(folder / "sample_road_raster_mask.tif") as ref_file:
        reference, transform = ref_file.read(1) > 0, ref_file.transform
    iou = {}
    for width in (4, 6):
        road = ClassSpec.model_validate({"name": "road", "geometry": "line", "width_m": width,
                                         "tags": {"include": {"road_type": "*"}}})
        frame = harvest_vector(str(folder / "sample_roads_for_masking.geojson"), [road],
                               "class", WORLD).frames["road"]
        mask = burn(frame.geometry.values, np.ones(len(frame), np.uint8), transform,
                    reference.shape) > 0
        iou[width] = (mask & reference).sum() / (mask | reference).sum()
    print(f"vegas road mask agreement (4 m wide): IoU {iou[4]:.4f}")
    assert iou[4] > 0.98
    assert iou[6] < 0.8  # the floor is not met by just any width


def test_robosat_parking_masks_match_pixel_for_pixel(tmp_path: Path) -> None:
    folder = shared_path("robosat/parking")
    parking = ClassSpec.model_validate({"name": "parking",
                                        "tags": {"include": {"amenity": ["parking"]}}})
    frame = harvest_vector(str(folder / "features.geojson"), [parking], "class",
                           WORLD).frames["parking"]
    labels = {"parking": write_geoparquet(frame, str(tmp_path / "parking.parquet"))["uri"]}
    tiles = [Tile(*map(int, line.split(","))) for line in
             (folder / "tiles.csv").read_text().split()]
    layout = RunLayout(str(tmp_path / "run"))
    spec = RasterSpec(classes=("parking",), priorities=(1,), tile_size=512)
    stats = rasterize_tiles(layout, tiles, labels, spec)
    for tile in tiles:
        reference = np.asarray(Image.open(folder / "labels" / "18" / str(tile.x) /
                                          f"{tile.y}.png"))
        mask = read_png(layout.mask(tile))
        differ = (mask != reference).sum()
        print(f"robosat parking {tile}: {differ} pixels differ")
        assert differ <= 0.01 * mask.size
        assert stats[grid.tile_key(tile)]["foreground"]["parking"] == pytest.approx(
            (reference == 1).mean(), abs=0.01)
    negative = stats["z18_69623_104946"]
    assert negative == {"features": {"parking": 0}, "foreground": {"parking": 0.0}}


# --- synthetic scenes: values, priority, ignore band, distance -------------------------------

TILE = Tile(34500, 23011, 16)


def scene(tmp_path: Path, shapes: dict[str, list[shapely.Geometry]]) -> dict[str, str]:
    """Class -> GeoParquet URI of lon/lat shapes."""
    out = {}
    for name, geoms in shapes.items():
        frame = gpd.GeoDataFrame({"class": name, "osm_id": range(len(geoms)),
                                  "osm_type": "way", "tags": "{}", "width_m": np.nan},
                                 geometry=geoms, crs=4326)
        out[name] = write_geoparquet(frame, str(tmp_path / f"{name}.parquet"))["uri"]
    return out


def pixel_box(tile: Tile, c0: float, r0: float, c1: float, r1: float) -> shapely.Geometry:
    """A lon/lat box given in the tile's pixel coordinates (256 px)."""
    w, n = grid.pixel_to_lonlat(tile, 256, c0, r0)
    e, s = grid.pixel_to_lonlat(tile, 256, c1, r1)
    return box(w, s, e, n)


def test_values_follow_class_order_and_priority_wins(tmp_path: Path) -> None:
    labels = scene(tmp_path, {"road": [pixel_box(TILE, 0, 100, 256, 140)],
                              "building": [pixel_box(TILE, 50, 50, 150, 150)],
                              "parking": [pixel_box(TILE, 120, 120, 200, 200)]})
    # value = index + 1; building wins over road and parking; parking over road
    spec = RasterSpec(classes=("building", "road", "parking"), priorities=(3, 1, 2))
    feats = BatchFeatures.load(labels, spec, grid.tile_bounds(TILE))
    mask, sdt, stats = rasterize_tile(feats, TILE, spec)
    assert sdt is None
    assert mask[120, 10] == 2 and mask[100, 100] == 1 and mask[130, 130] == 1
    assert mask[180, 180] == 3 and mask[135, 190] == 3 and mask[10, 10] == 0
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    assert stats["features"] == {"building": 1, "road": 1, "parking": 1}
    for i, name in enumerate(spec.classes):
        assert stats["foreground"][name] == pytest.approx((mask == i + 1).mean(), abs=1e-6)
    # equal priority: the later class in the list is drawn last and wins
    tie = RasterSpec(classes=("building", "road", "parking"), priorities=(1, 1, 1))
    mask, _, _ = rasterize_tile(BatchFeatures.load(labels, tie, grid.tile_bounds(TILE)),
                                TILE, tie)
    assert mask[70, 100] == 1 and mask[120, 100] == 2 and mask[130, 130] == 3
    assert spec.values == {"background": 0, "building": 1, "road": 2, "parking": 3}


def test_ignore_band_follows_every_edge(tmp_path: Path) -> None:
    square = pixel_box(TILE, 64.5, 64.5, 191.5, 191.5)  # outlines through pixel centres
    labels = scene(tmp_path, {"building": [square]})
    widths = {}
    for n in (1, 3):
        spec = RasterSpec(classes=("building",), priorities=(1,), edge_ignore_px=n)
        mask, _, stats = rasterize_tile(BatchFeatures.load(labels, spec, grid.tile_bounds(TILE)),
                                        TILE, spec)
        assert mask[128, 128] == 1 and mask[10, 10] == 0  # interior and background stay
        assert mask[64, 128] == IGNORE and mask[128, 191] == IGNORE  # on the outline
        assert set(np.unique(mask)) == {0, 1, IGNORE}
        assert stats["ignore"] == pytest.approx((mask == IGNORE).mean(), abs=1e-6)
        widths[n] = (mask[128, :] == IGNORE).sum() / 2  # band width across one edge
    assert widths[1] <= 2 and 4 <= widths[3] <= 6
    assert spec.values["ignore"] == IGNORE


def test_background_outside_the_complete_areas_is_ignored(tmp_path: Path) -> None:
    """OSM's buildings stay buildings everywhere; its empty background is only
    trusted where mapping is complete (here the tile's left half, or a tile list)."""
    import json

    labels = scene(tmp_path, {"building": [pixel_box(TILE, 150, 20, 220, 80),
                                           pixel_box(TILE, 20, 20, 80, 80)]})
    half = tmp_path / "complete.geojson"
    half.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {},
        "geometry": shapely.geometry.mapping(pixel_box(TILE, 0, 0, 128, 256))}]}))
    spec = RasterSpec(classes=("building",), priorities=(1,), zoom=TILE.z,
                      complete_areas=str(half))
    feats = BatchFeatures.load(labels, spec, grid.tile_bounds(TILE))
    mask, _, stats = rasterize_tile(feats, TILE, spec, CompleteAreas(str(half), TILE.z))
    assert mask[50, 50] == 1 and mask[200, 50] == 0  # trusted half: label and background
    assert mask[50, 180] == 1 and mask[200, 200] == IGNORE  # untrusted: label kept
    assert (mask[:, 130:] != 0).all() and (mask[:, :126] != IGNORE).all()
    assert stats["untrusted"] == pytest.approx((mask == IGNORE).mean(), abs=1e-6)
    assert spec.values["ignore"] == IGNORE
    # A tile list: a listed tile is trusted whole, any other only where OSM has labels.
    listed = CompleteAreas([grid.tile_key(TILE)], TILE.z)
    whole, _, _ = rasterize_tile(feats, TILE, spec, listed)
    assert set(np.unique(whole)) == {0, 1}
    other = Tile(TILE.x + 1, TILE.y, TILE.z)
    unlisted, _, _ = rasterize_tile(feats, other, spec, listed)
    assert (unlisted == IGNORE).all()


def test_edge_band_of_a_feature_just_outside_reaches_in(tmp_path: Path) -> None:
    """The band is drawn on a padded window: an outline 1 px outside the tile
    still marks the tile's border pixels."""
    right = Tile(TILE.x + 1, TILE.y, TILE.z)
    labels = scene(tmp_path, {"building": [pixel_box(right, 1, 50, 100, 100)]})
    spec = RasterSpec(classes=("building",), priorities=(1,), edge_ignore_px=3)
    both = (*grid.tile_bounds(TILE)[:2], *grid.tile_bounds(right)[2:])
    mask, _, stats = rasterize_tile(BatchFeatures.load(labels, spec, both), TILE, spec)
    assert stats["features"] == {"building": 0}
    assert (mask[60:90, 255] == IGNORE).all() and (mask[:, :250] == 0).all()


def test_signed_distance_is_seam_free(tmp_path: Path) -> None:
    right = Tile(TILE.x + 1, TILE.y, TILE.z)
    w, s, _, n = grid.tile_bounds(right)
    crossing = box(*grid.pixel_to_lonlat(TILE, 256, 200, 180),
                   *grid.pixel_to_lonlat(right, 256, 60, 80)).envelope
    near = pixel_box(right, 4, 200, 20, 220)  # only in the right tile, 4 px from the seam
    labels = scene(tmp_path, {"building": [crossing, near]})
    spec = RasterSpec(classes=("building",), priorities=(1,), signed_distance=True,
                      signed_distance_clip_px=16)
    feats = BatchFeatures.load(labels, spec, (w - 0.1, s - 0.1, w + 0.1, n + 0.1))
    mask_a, sdt_a, _ = rasterize_tile(feats, TILE, spec)
    mask_b, sdt_b, _ = rasterize_tile(feats, right, spec)
    assert sdt_a.dtype == np.uint8 and sdt_a.shape == (256, 256)
    inside, outside = sdt_a[mask_a == 1], sdt_a[mask_a == 0]
    assert inside.min() > 128 and outside.max() < 128 and outside.min() == 1
    assert sdt_a[130, 255] == 255  # deep inside: clipped
    # across the seam the distance changes by at most one step per pixel
    step = 127 / 16
    assert np.abs(sdt_a[:, 255].astype(int) - sdt_b[:, 0].astype(int)).max() <= step + 1
    # the padded window sees the neighbour's feature: 4-5 px away, not "far outside"
    assert 128 - 6 * step < sdt_a[210, 255] < 128 - 3 * step
    assert sdt_b[130, 0] == 255  # and no false edge at the tile border


def test_stats_count_features_and_empty_tiles_get_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tiles = [Tile(TILE.x + dx, TILE.y + dy, 16) for dx in range(3) for dy in range(2)]
    boxes = []
    for _ in range(40):
        t = tiles[rng.integers(4)]
        c, r = rng.uniform(0, 240, 2)
        boxes.append(pixel_box(t, c, r, c + rng.uniform(5, 40), r + rng.uniform(5, 40)))
    labels = scene(tmp_path, {"building": boxes})
    empty = Tile(TILE.x + 10, TILE.y, 16)
    layout = RunLayout(str(tmp_path / "run"))
    spec = RasterSpec(classes=("building",), priorities=(1,))
    stats = rasterize_tiles(layout, order_tiles([*tiles, empty]), labels, spec)
    for t in tiles:
        tile_box = box(*grid.tile_bounds(t))
        expected = sum(b.intersects(tile_box) for b in boxes)
        assert stats[grid.tile_key(t)]["features"]["building"] == expected
        mask = read_png(layout.mask(t))
        assert stats[grid.tile_key(t)]["foreground"]["building"] == pytest.approx(
            (mask == 1).mean(), abs=1e-6)
    assert (read_png(layout.mask(empty)) == 0).all()  # a negative: all background
    assert stats[grid.tile_key(empty)]["features"]["building"] == 0


def test_index_burns_exactly_what_burning_everything_would(tmp_path: Path) -> None:
    """The STRtree only skips features that cannot touch the tile."""
    path = shared_path("osm/germany-small.osm")
    from mapgap.tasks.osm import harvest_osm

    building = ClassSpec.model_validate({"name": "building",
                                         "tags": {"include": {"building": "*"}}})
    frame = harvest_osm(str(path), [building], WORLD).frames["building"]
    labels = {"building": write_geoparquet(frame, str(tmp_path / "b.parquet"))["uri"]}
    spec = RasterSpec(classes=("building",), priorities=(1,))
    tiles = grid.tiles_for_bbox(tuple(frame.total_bounds), 19)
    feats = BatchFeatures.load(labels, spec, tuple(frame.total_bounds))
    everything = project(frame.geometry.values, grid.WGS84, grid.WEB_MERCATOR)
    assert len(tiles) > 4
    for t in tiles:
        mask, _, _ = rasterize_tile(feats, t, spec)
        brute = burn(everything, np.ones(len(everything), np.uint8), grid.tile_transform(t, 256),
                     (256, 256))
        assert np.array_equal(mask, brute)


def test_stored_outputs_are_found_by_listing_on_s3(s3_bucket: str) -> None:
    """A rerun learns which masks exist from one listing per folder, on S3 too."""
    from mapgap.flows.harvest import _batch_outputs, _written

    layout = RunLayout(f"{s3_bucket}/runs/x")
    tiles = [TILE, Tile(TILE.x, TILE.y + 1, 16), Tile(TILE.x + 1, TILE.y, 16)]
    for t in tiles[:2]:
        storage.write_bytes(layout.mask(t), b"png")
    storage.write_bytes(layout.signed_distance(tiles[0]), b"png")
    storage.write_bytes(layout.mask_stats_part("b1"), b"{}")
    written = _written(layout, TILE, signed_distance=True)
    assert written == {layout.mask(tiles[0]), layout.mask(tiles[1]),
                       layout.signed_distance(tiles[0]), layout.mask_stats_part("b1")}
    assert all(storage.exists(u) for u in written)
    assert not set(_batch_outputs(layout, tiles, signed_distance=True)) <= written


# --- the flow -------------------------------------------------------------------------------

@pytest.mark.slow
def test_harvest_flow_end_to_end_and_rerun(tmp_path: Path) -> None:
    from mapgap.conf.schema import validate_config
    from mapgap.flows.harvest import harvest_flow
    from mapgap.orchestration import configured

    pbf = shared_path("osm/liechtenstein.osm.pbf")
    cfg = validate_config({
        "name": "li", "storage": {"root": str(tmp_path)}, "aoi": [9.515, 47.135, 9.530, 47.145],
        "zoom": 16,
        "classes": [
            {"name": "building", "priority": 3, "tags": {"include": {"building": "*"}}},
            {"name": "road", "geometry": "line", "width_m": 6, "priority": 1,
             "tags": {"include": {"highway": ["primary", "secondary", "residential"]}}},
            {"name": "parking", "priority": 2, "tags": {"include": {"amenity": ["parking"]}}},
        ],
        "labels": {"source": str(pbf), "edge_ignore_px": 1, "tiles_per_task": 4,
                   "signed_distance": True},
        "imagery": {"source": "http://127.0.0.1:1/{z}/{x}/{y}.png"},
    }, "test", tmp_path)
    flow = configured(harvest_flow, cfg)
    summary = flow(cfg)
    layout = RunLayout(cfg.run_uri)
    tiles = grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom)
    assert summary["tiles"] == len(tiles) > 4
    assert summary["mask_values"] == {"background": 0, "building": 1, "road": 2, "parking": 3,
                                      "ignore": 255}
    assert all(n > 0 for n in summary["features"].values())
    labels = storage.read_json(layout.labels_summary)
    assert labels["classes"]["building"]["features"] == summary["features"]["building"]
    stats = storage.read_json(layout.mask_stats)
    assert set(stats) == {grid.tile_key(t) for t in tiles}
    for t in tiles:
        assert set(np.unique(read_png(layout.mask(t)))) <= {0, 1, 2, 3, 255}
    batches = list(grid.iter_batches(order_tiles(tiles), cfg.labels.tiles_per_task))
    assert len(batches) >= 3
    written = {t: Path(layout.mask(t)).stat().st_mtime_ns for t in tiles}

    def rerun_rewrites() -> set[Tile]:
        """Reruns the flow; the tiles whose mask it wrote again."""
        assert flow(cfg) == summary
        again = {t: Path(layout.mask(t)).stat().st_mtime_ns for t in tiles}
        changed = {t for t in tiles if again[t] != written[t]}
        written.update(again)
        return changed

    assert rerun_rewrites() == set()  # a rerun reuses every task
    # a deleted output is redone, and only its batch: labels, stats part, mask, distance
    storage.remove(layout.labels("road"))
    part = Path(layout.mask_stats_part(batch_id([grid.tile_key(t) for t in batches[0]])))
    part.unlink()
    assert rerun_rewrites() == set(batches[0])
    assert Path(layout.labels("road")).exists() and part.exists()
    mask, sdt = Path(layout.mask(batches[1][0])), Path(layout.signed_distance(batches[2][-1]))
    mask.unlink()
    sdt.unlink()
    assert rerun_rewrites() == set(batches[1]) | set(batches[2])
    assert mask.exists() and sdt.exists()


# --- per-instance distance (separate_instances) --------------------------------------------

def instance_specs() -> tuple[RasterSpec, RasterSpec]:
    """(per-instance spec, union spec) for one building class."""
    base = dict(classes=("building", "road"), priorities=(2, 1), signed_distance=True)
    return RasterSpec(**base, instance_classes=("building",)), RasterSpec(**base)


def distance_of(labels: dict[str, str], spec: RasterSpec) -> np.ndarray:
    _, sdt, _ = rasterize_tile(BatchFeatures.load(labels, spec, grid.tile_bounds(TILE)), TILE,
                               spec)
    return sdt


def test_a_shared_wall_is_an_edge_between_two_interiors(tmp_path: Path) -> None:
    from scipy import ndimage

    labels = scene(tmp_path, {"building": [pixel_box(TILE, 50, 60, 100, 120),
                                           pixel_box(TILE, 100, 60, 160, 120)]})
    instances, union = instance_specs()
    sdt = distance_of(labels, instances)
    assert ndimage.label(sdt > 128)[1] == 2  # two interiors ...
    assert (sdt[62:118, 99:101] == 128).all()  # ... with the wall (both sides) on the edge
    assert sdt[90, 75] == sdt[90, 130] == 255 and sdt[90, 30] < 128
    assert ndimage.label(distance_of(labels, union) > 128)[1] == 1  # the union: one blob


def test_lone_buildings_and_holes_keep_the_union_distance(tmp_path: Path) -> None:
    """Where no instance touches another the target is the old one, holes included;
    other classes (a road under a building) are no instance outline."""
    courtyard = pixel_box(TILE, 20, 20, 120, 120).difference(pixel_box(TILE, 50, 50, 90, 90))
    two_parts = shapely.MultiPolygon([pixel_box(TILE, 150, 30, 200, 80),
                                      pixel_box(TILE, 150, 150, 230, 230)])
    labels = scene(tmp_path, {"building": [courtyard, two_parts],
                              "road": [pixel_box(TILE, 0, 130, 256, 140)]})
    instances, union = instance_specs()
    sdt = distance_of(labels, instances)
    buildings_only = {"building": labels["building"]}
    assert np.array_equal(sdt, distance_of(buildings_only, union))
    assert sdt[70, 70] < 128 < sdt[45, 70]  # the hole is outside, its edge an edge
    assert sdt[135, 100] < 128  # the road is background for the distance


def test_instance_classes_come_from_the_config(tmp_path: Path) -> None:
    from tests.helpers_inference import make_config

    classes = [{"name": "building", "separate_instances": True,
                "tags": {"include": {"building": "*"}}},
               {"name": "road", "geometry": "line", "width_m": 6,
                "tags": {"include": {"highway": "*"}}}]
    spec = RasterSpec.from_config(make_config(tmp_path, classes=classes))
    assert spec.signed_distance and spec.instance_classes == ("building",)
    assert spec.instance_values == [1]
    classes[0]["separate_instances"] = False
    plain = RasterSpec.from_config(make_config(tmp_path, classes=classes))
    assert not plain.signed_distance and plain.instance_classes == ()
    with pytest.raises(ValueError, match="instance classes \\['roof'\\]"):
        RasterSpec(classes=("building",), priorities=(1,), instance_classes=("roof",))
