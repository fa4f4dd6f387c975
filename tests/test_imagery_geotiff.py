"""GeoTIFF/COG -> web-mercator tiles: the real SpaceNet Atlanta raster (UTM,
uint16, one band) lands where its building footprints are, reads the same from
a moto S3 server, and bad rasters fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.warp import reproject
from shapely.geometry import box

from mapgap import grid, storage
from mapgap.conf.imagery import ImageryConfig
from mapgap.grid import Tile, tile_key
from mapgap.layout import RunLayout
from mapgap.tasks.decode import decode_tile
from mapgap.tasks.geotiff import describe_raster
from mapgap.tasks.imagery import fetch_batch
from mapgap.tasks.tilestore import ImageryError
from tests.conftest import shared_path

ZOOM = 18  # ~0.5 m/px at Atlanta's latitude, the raster's own resolution


def atlanta() -> Path:
    return shared_path("spacenet-atlanta") / "sample_geotiff.tif"


def footprints() -> gpd.GeoDataFrame:
    return gpd.read_file(shared_path("spacenet-atlanta") / "geotiff_labels.geojson")


def raster_tiles(source: str) -> list[Tile]:
    info = describe_raster(source, ImageryConfig(source=source), None)
    return grid.tiles_for_bbox(info.bounds, ZOOM)


def mosaic(run: str, tiles: list[Tile]) -> tuple[np.ndarray, Affine]:
    """The stored tiles as one gray image and its EPSG:3857 transform."""
    xs, ys = [t.x for t in tiles], [t.y for t in tiles]
    out = np.zeros(((max(ys) - min(ys) + 1) * 256, (max(xs) - min(xs) + 1) * 256), np.float32)
    for t in tiles:
        uri = RunLayout(run).image(t)
        if storage.exists(uri):
            r, c = (t.y - min(ys)) * 256, (t.x - min(xs)) * 256
            out[r:r + 256, c:c + 256] = decode_tile(storage.read_bytes(uri)).rgb[..., 0]
    return out, grid.tile_transform(Tile(min(xs), min(ys), ZOOM), 256)


def best_edge_shift(image: np.ndarray, outlines: np.ndarray, reach: int = 6
                    ) -> tuple[tuple[int, int], float]:
    """The (dx, dy) pixel shift of ``outlines`` that lies on the strongest image
    edges, and how much stronger that is than the median shift."""
    grad = np.hypot(cv2.Sobel(image, cv2.CV_32F, 1, 0), cv2.Sobel(image, cv2.CV_32F, 0, 1))
    scores = {(dx, dy): grad[np.roll(outlines, (dy, dx), axis=(0, 1))].mean()
              for dx in range(-reach, reach + 1) for dy in range(-reach, reach + 1)}
    best = max(scores, key=scores.get)
    return best, scores[best] / float(np.median(list(scores.values())))


def test_utm_uint16_raster_lands_under_its_building_footprints(tmp_path: Path) -> None:
    source = str(atlanta())
    tiles = raster_tiles(source)
    report = fetch_batch(str(tmp_path), ImageryConfig(source=source), 256, tiles)
    assert report["counts"]["fetched"] >= 16 and report["counts"]["failed"] == 0
    image, transform = mosaic(str(tmp_path), tiles)
    labels = footprints()
    web = labels.to_crs(grid.WEB_MERCATOR).geometry

    # 1. Footprint outlines sit on the image's edges exactly where they do in the
    #    native UTM raster (an independent reference read with rasterio alone).
    outlines = rasterize([g.boundary for g in web], image.shape, transform=transform) > 0
    tile_shift, tile_peak = best_edge_shift(image, outlines)
    with rasterio.open(source) as src:
        native, native_transform = src.read(1).astype(np.float32), src.transform
        native_outlines = rasterize([g.boundary for g in labels.geometry], native.shape,
                                    transform=src.transform) > 0
    native_shift, _ = best_edge_shift(native, native_outlines)
    assert tile_peak > 1.2  # a sharp optimum: the test can see a misregistration
    assert abs(tile_shift[0] - native_shift[0]) <= 1 and abs(tile_shift[1] - native_shift[1]) <= 1

    # 2. Mean intensity inside the footprints differs measurably from a 1-4 m ring
    #    around them (roofs here are darker than the sunlit lawns and drives), by
    #    the same standardized contrast as in the (equally stretched) native
    #    raster; moving the footprints by 2 m changes it far more than tiling does.
    def contrast(img: np.ndarray, to_pixels: Affine, geoms: gpd.GeoSeries, crs: str) -> float:
        inner = geoms.buffer(-1).to_crs(crs)
        ring = geoms.buffer(4).difference(geoms.buffer(1)).to_crs(crs)
        inside = rasterize([g for g in inner if not g.is_empty], img.shape,
                           transform=to_pixels) > 0
        around = (rasterize(list(ring), img.shape, transform=to_pixels) > 0) & ~inside
        valid = img > 0
        return float((img[inside & valid].mean() - img[around & valid].mean()) / img[valid].std())

    (lo, hi), = describe_raster(source, ImageryConfig(source=source), None).stretch
    native = np.where(native > 0, np.clip((native - lo) / (hi - lo) * 255, 0, 255), 0)
    utm = labels.geometry
    in_tiles = contrast(image, transform, utm, grid.WEB_MERCATOR)
    in_native = contrast(native, native_transform, utm, labels.crs)
    moved = contrast(image, transform, utm.translate(2, 0), grid.WEB_MERCATOR)
    assert abs(in_tiles) > 0.05
    assert abs(in_tiles - in_native) < 0.02
    assert abs(moved - in_tiles) > 0.1


def test_single_band_16_bit_is_stretched_once_to_gray_rgb(tmp_path: Path) -> None:
    source = str(atlanta())
    imagery = ImageryConfig(source=source, stretch_percentiles=(2, 98))
    info = describe_raster(source, imagery, None)
    assert info.bands == [1] and info.nodata == 0 and info.stretch is not None
    with rasterio.open(source) as src:
        data, src_crs, src_transform = src.read(1), src.crs, src.transform
    lo, hi = np.percentile(data[data != 0], [2, 98])
    assert info.stretch[0] == pytest.approx((lo, hi), rel=0.05)
    tiles = raster_tiles(source)
    one, two = tmp_path / "one", tmp_path / "two"
    fetch_batch(str(one), imagery, 256, tiles)
    for part in (tiles[:7], tiles[7:]):  # batches share the raster's one stretch
        fetch_batch(str(two), imagery, 256, part, info.to_dict())
    for t in tiles:
        uri = RunLayout(str(one)).image(t)
        if storage.exists(uri):
            assert storage.read_bytes(uri) == storage.read_bytes(RunLayout(str(two)).image(t))
    # Every tile is the raster warped onto it and scaled by the RASTER's
    # percentiles (a per-tile stretch would give each tile its own contrast).
    warped = np.zeros((256, 256), np.float32)
    for t in tiles[6:9]:
        rgb = decode_tile(storage.read_bytes(RunLayout(str(one)).image(t))).rgb
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        reproject(data.astype(np.float32), warped, src_transform=src_transform, src_crs=src_crs,
                  dst_transform=grid.tile_transform(t, 256), dst_crs=grid.WEB_MERCATOR,
                  resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
        expected = np.clip((warped - lo) / (hi - lo) * 255, 0, 255)
        assert np.abs(rgb[..., 0] - expected)[warped > 0].mean() < 2.0


def test_nodata_and_area_outside_the_raster_are_blank(tmp_path: Path) -> None:
    source = str(atlanta())
    tiles = raster_tiles(source)
    report = fetch_batch(str(tmp_path), ImageryConfig(source=source), 256, tiles)
    blank = {e["tile"]: e["fraction"] for e in report["blank"]}
    assert blank and all(f > 0.95 for f in blank.values())
    assert report["counts"]["fetched"] + len(blank) == len(tiles)
    # A tile on the raster's edge: pixels outside are black, inside keep imagery.
    with rasterio.open(source) as src:
        footprint = box(*src.bounds)
    edge = next(t for t in tiles if tile_key(t) not in blank
                and not grid.reproject(box(*grid.tile_bounds(t)), grid.WGS84,
                                       "EPSG:32616").within(footprint))
    rgb = decode_tile(storage.read_bytes(RunLayout(str(tmp_path)).image(edge))).rgb
    black = (rgb == 0).all(axis=2).mean()
    assert 0.05 < black < 0.95


def test_s3_raster_gives_identical_tiles_and_s3_run_dir_reruns(
    tmp_path: Path, s3_bucket: str
) -> None:
    local = str(atlanta())
    remote = f"{s3_bucket}/imagery/sample_geotiff.tif"
    storage.write_bytes(remote, atlanta().read_bytes())
    tiles = raster_tiles(local)
    fetch_batch(str(tmp_path), ImageryConfig(source=local), 256, tiles)
    run = f"{s3_bucket}/runs/t"
    imagery = ImageryConfig(source=remote)
    assert describe_raster(remote, imagery, None).stretch == \
        describe_raster(local, imagery, None).stretch
    report = fetch_batch(run, imagery, 256, tiles)
    stored = [t for t in tiles if storage.exists(RunLayout(str(tmp_path)).image(t))]
    assert report["counts"]["fetched"] == len(stored) > 0
    for t in stored:
        assert storage.read_bytes(RunLayout(run).image(t)) == \
            storage.read_bytes(RunLayout(str(tmp_path)).image(t))
    again = fetch_batch(run, imagery, 256, tiles)
    assert again["counts"]["skipped_existing"] == len(stored) and again["counts"]["fetched"] == 0


def test_any_crs_epsg4326_raster_without_nodata(tmp_path: Path) -> None:
    source = str(shared_path("spacenet-vegas-roads") / "road_mask_input.tif")
    tiles = raster_tiles(source)
    report = fetch_batch(str(tmp_path), ImageryConfig(source=source), 256, tiles)
    assert report["counts"]["fetched"] > 0 and report["counts"]["failed"] == 0
    assert report["counts"]["fetched"] + report["counts"]["blank"] == len(tiles)


def test_8_bit_rgba_keeps_its_colours_and_alpha(tmp_path: Path) -> None:
    # A synthetic RGBA uint8 raster in a UTM zone: flat colour quadrants, the
    # last one transparent.
    path = tmp_path / "rgba.tif"
    size, res = 400, 0.5
    rgba = np.full((4, size, size), 255, np.uint8)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]
    for i, colour in enumerate(colours):
        r, c = divmod(i, 2)
        rgba[:3, r * 200:(r + 1) * 200, c * 200:(c + 1) * 200] = np.array(colour)[:, None, None]
    rgba[3, 200:, 200:] = 0
    transform = Affine(res, 0, 453_000, 0, -res, 39_000)  # EPSG:32636, Kampala's zone
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4,
                       dtype="uint8", crs="EPSG:32636", transform=transform,
                       photometric="RGB", alpha="YES") as dst:
        dst.write(rgba)
    imagery = ImageryConfig(source=str(path), max_blank_fraction=1.0)
    info = describe_raster(str(path), imagery, None)
    assert info.bands == [1, 2, 3] and info.stretch is None
    tiles = grid.tiles_for_bbox(info.bounds, 19)
    fetch_batch(str(tmp_path / "run"), imagery, 256, tiles)
    seen = set()
    for t in tiles:
        out = decode_tile(storage.read_bytes(RunLayout(str(tmp_path / "run")).image(t))).rgb
        seen |= set(map(tuple, np.unique(out.reshape(-1, 3), axis=0).tolist()))
    assert set(colours[:3]) <= seen and colours[3] not in seen


def test_raster_without_crs_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=1,
                       dtype="uint16", transform=Affine(1, 0, 100, 0, -1, 200)) as dst:
        dst.write(np.ones((1, 16, 16), np.uint16))
    with pytest.raises(ImageryError) as err:
        describe_raster(str(path), ImageryConfig(source=str(path)), None)
    assert str(err.value) == f"{path}: the raster has no CRS, so it cannot be placed on the map"


def test_aoi_outside_the_raster_is_a_one_line_error() -> None:
    source = str(atlanta())
    with pytest.raises(ImageryError) as err:
        describe_raster(source, ImageryConfig(source=source), box(32.59, 0.34, 32.60, 0.35))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{source}: the AOI [32.590000, 0.340000")
    assert "is outside the raster, which covers [-84.48" in msg


def test_missing_or_unreadable_raster_is_a_one_line_error(tmp_path: Path, s3_bucket: str) -> None:
    not_tiff = tmp_path / "notes.tif"
    not_tiff.write_text("hello")
    for source in (str(not_tiff), f"{s3_bucket}/absent.tif"):
        with pytest.raises(ImageryError) as err:
            describe_raster(source, ImageryConfig(source=source), None)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{source}: cannot open")


def test_fetch_flow_on_a_geotiff(tmp_path: Path) -> None:
    from mapgap.conf.schema import validate_config
    from mapgap.flows.fetch import fetch_flow
    from mapgap.orchestration import configured

    source = str(atlanta())
    (tmp_path / "l.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    base = {"name": "gt", "storage": {"root": str(tmp_path / "out")},
            "aoi": [-84.4805, 33.6370, -84.4775, 33.6400], "zoom": ZOOM,
            "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
            "labels": {"source": "l.geojson"},
            "imagery": {"source": source, "tiles_per_task": 3}}
    cfg = validate_config(base, "test", tmp_path)
    summary = configured(fetch_flow, cfg)(cfg)
    report = storage.read_json(summary["report"])
    assert summary["fetched"] > 0 and summary["tiles"] == len(
        grid.tiles_for_geometry(cfg.aoi_geometry, ZOOM))
    assert report["raster"]["bands"] == [1] and len(report["raster"]["stretch"]) == 1
    outside = validate_config({**base, "aoi": [32.59, 0.34, 32.60, 0.35]}, "test", tmp_path)
    with pytest.raises(ImageryError, match="is outside the raster"):
        configured(fetch_flow, outside)(outside)


def test_bands_beyond_the_raster_are_a_one_line_error() -> None:
    source = str(atlanta())
    with pytest.raises(ImageryError) as err:
        describe_raster(source, ImageryConfig(source=source, bands=[1, 2, 3]), None)
    assert str(err.value) == f"{source}: imagery.bands [2, 3] not in 1..1"
