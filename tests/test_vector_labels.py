"""Labels from the user's vector files: GeoJSON / GeoPackage / GeoParquet, a
class column or one file per class, any CRS, through the shared class logic."""

from __future__ import annotations

import functools
import json
import math
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import geopandas as gpd
import pytest
import shapely
from pydantic import ValidationError
from shapely.geometry import LineString, Polygon, box

from mapgap import grid, storage
from mapgap.conf.labels import ClassSpec, LabelsConfig
from mapgap.tasks.labels import source_fingerprint
from mapgap.tasks.vector_labels import VectorLabelError, harvest_vector, read_vector

try:
    from tests.conftest import shared_path
except ImportError:  # pragma: no cover
    from conftest import shared_path

BUILDING = ClassSpec.model_validate({
    "name": "building", "tags": {"include": {"building": "*"},
                                 "exclude": {"building": ["construction"]}}})
ROAD = ClassSpec.model_validate({
    "name": "road", "geometry": "line", "width_m": 4, "widths_m": {"track": 3},
    "tags": {"include": {"highway": "*"}}})
NATURAL = ClassSpec.model_validate({"name": "natural", "tags": {"include": {"natural": "*"}}})
WORLD = box(-180, -85, 180, 85)


def test_single_class_file_takes_every_row() -> None:
    path = shared_path("kampala/labels.geojson")
    result = harvest_vector(str(path), [BUILDING], "class", WORLD)
    frame = result.frames["building"]
    assert len(frame) == 206 and result.counts["building"]["matched"] == 206
    source = gpd.read_file(path)
    with_id = source.osm_id.notna()
    assert set(frame[frame.osm_type == "unknown"].osm_id) == set(
        source.osm_id[with_id].astype(int))
    assert (frame.osm_type == "feature").sum() == (~with_id).sum()
    assert frame.geometry.is_valid.all()
    assert frame.geometry.union_all().equals_exact(source.geometry.make_valid().union_all(), 1e-9)


def test_any_crs_is_reprojected_to_lonlat() -> None:
    path = shared_path("spacenet-atlanta/geotiff_labels.geojson")
    src = gpd.read_file(path)
    assert src.crs.to_epsg() == 32616
    frame = harvest_vector(str(path), [BUILDING], "class", WORLD).frames["building"]
    assert len(frame) == 43 and frame.crs.to_epsg() == 4326
    w, s, e, n = frame.total_bounds
    assert -84.5 < w < e < -84.4 and 33.6 < s < n < 33.7
    back = frame.to_crs(32616)
    assert back.area.sum() == pytest.approx(src.area.sum(), rel=1e-6)
    assert all(json.loads(t) == {"building": "yes"} for t in frame.tags)


def test_osm_export_columns_are_matched_by_tag_filter() -> None:
    """portugal-z17 labels are an OSM export with one column per tag: the same
    filters as for OSM data pick each class; @id/@type become osm_id/osm_type."""
    path = shared_path("portugal-z17/labels.geojson")
    src = gpd.read_file(path)
    result = harvest_vector(str(path), [BUILDING, ROAD, NATURAL], "class", WORLD)
    for spec, column in ((BUILDING, "building"), (ROAD, "highway"), (NATURAL, "natural")):
        assert len(result.frames[spec.name]) == src[column].notna().sum() > 0
    road = result.frames["road"]
    assert set(road.osm_type) == {"way"} and set(road.osm_id) <= set(src["@id"])
    assert road.width_m.isna().all()  # already areas: kept, not buffered again


def test_class_column_gpkg_and_geoparquet(tmp_path: Path) -> None:
    frame = gpd.read_file(shared_path("kampala/labels.geojson")).to_crs(3857)
    frame["kind"] = ["building" if i % 3 else "parking" for i in range(len(frame))]
    parking = ClassSpec.model_validate({"name": "parking",
                                        "tags": {"include": {"amenity": ["parking"]}}})
    frame.to_file(tmp_path / "labels.gpkg", driver="GPKG")
    frame.to_parquet(tmp_path / "labels.parquet")
    for name in ("labels.gpkg", "labels.parquet"):
        result = harvest_vector(str(tmp_path / name), [BUILDING, parking], "kind", WORLD)
        assert len(result.frames["parking"]) == (frame.kind == "parking").sum() == 69
        assert len(result.frames["building"]) == 137
        assert result.frames["parking"].crs.to_epsg() == 4326


def test_no_class_column_with_several_classes_is_a_clear_error(tmp_path: Path) -> None:
    path = shared_path("kampala/labels.geojson")
    parking = ClassSpec.model_validate({"name": "parking",
                                        "tags": {"include": {"amenity": ["parking"]}}})
    with pytest.raises(VectorLabelError) as err:
        harvest_vector(str(path), [BUILDING, parking], "class", WORLD)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path)) and "'class'" in msg


def test_one_file_per_class_folder_and_template(tmp_path: Path) -> None:
    kampala = gpd.read_file(shared_path("kampala/labels.geojson"))
    lines = gpd.GeoDataFrame(geometry=[LineString([(32.59, 0.35), (32.591, 0.35)])], crs=4326)
    kampala.to_parquet(tmp_path / "building.parquet")
    lines.to_file(tmp_path / "road.geojson", driver="GeoJSON")
    result = harvest_vector(str(tmp_path), [BUILDING, ROAD, NATURAL], "class", WORLD)
    assert len(result.frames["building"]) == 206 and len(result.frames["road"]) == 1
    assert any("no file for class 'natural'" in w for w in result.warnings)
    (tmp_path / "t").mkdir()
    lines.to_file(tmp_path / "t" / "road-labels.gpkg", driver="GPKG")
    result = harvest_vector(str(tmp_path / "t" / "{class}-labels.gpkg"), [ROAD], "class", WORLD)
    assert len(result.frames["road"]) == 1
    with pytest.raises(VectorLabelError, match="folder has no <class>.<ext> file"):
        harvest_vector(str(tmp_path / "t"), [BUILDING], "class", WORLD)


def test_centre_lines_are_buffered_in_metres() -> None:
    path = shared_path("spacenet-vegas-roads/sample_roads_for_masking.geojson")
    frame = harvest_vector(str(path), [ROAD], "class", WORLD).frames["road"]
    src = gpd.read_file(path)
    assert len(frame) == 9 and (frame.width_m == 4).all()
    utm = src.estimate_utm_crs()
    expected = src.to_crs(utm).length * 4 + math.pi * 4
    assert frame.to_crs(utm).area.sum() == pytest.approx(expected.sum(), rel=0.03)


def test_invalid_and_wrong_geometries_are_repaired_or_counted(tmp_path: Path) -> None:
    bowtie = Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])
    frame = gpd.GeoDataFrame(
        {"class": ["building", "building", "building", "building"]},
        geometry=[bowtie, box(2, 2, 3, 3), LineString([(0, 0), (1, 0)]),
                  shapely.Point(5, 5).buffer(0.1)],
        crs=4326)
    frame.to_file(tmp_path / "mixed.geojson", driver="GeoJSON")
    aoi = box(-1, -1, 4, 4)
    result = harvest_vector(str(tmp_path / "mixed.geojson"), [BUILDING], "class", aoi)
    counts = result.counts["building"]
    assert counts == {**counts, "matched": 4, "features": 2, "repaired": 1,
                      "skipped_geometry": 1, "outside_aoi": 1}
    assert result.frames["building"].geometry.is_valid.all()


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "labels.geojson"
    bad.write_text("{not json")
    with pytest.raises(VectorLabelError) as err:
        read_vector(str(bad))
    assert str(err.value).startswith(f"{bad}: not a readable vector file (")
    assert "\n" not in str(err.value)
    nocrs = gpd.GeoDataFrame(geometry=[box(500000, 4000000, 500010, 4000010)])
    nocrs.to_parquet(tmp_path / "nocrs.parquet")
    with pytest.raises(VectorLabelError, match="no CRS, and coordinates are not lon/lat"):
        read_vector(str(tmp_path / "nocrs.parquet"))


def test_reprojection_is_exact_enough_for_tiles() -> None:
    """A reprojected footprint lands within a centimetre of where it was."""
    path = shared_path("spacenet-atlanta/geotiff_labels.geojson")
    src = gpd.read_file(path)
    frame = harvest_vector(str(path), [BUILDING], "class", WORLD).frames["building"]
    a = grid.reproject(frame.geometry.union_all(), grid.WGS84, "EPSG:32616")
    assert a.symmetric_difference(src.geometry.union_all()).area < 0.01 * a.area / 1000


def test_source_fingerprint_follows_the_files(tmp_path: Path) -> None:
    (tmp_path / "building.geojson").write_text("{}")
    one = source_fingerprint(str(tmp_path / "building.geojson"))
    folder = source_fingerprint(str(tmp_path))
    template = source_fingerprint(str(tmp_path / "{class}.geojson"), ["building", "road"])
    (tmp_path / "building.geojson").write_text('{"type": "FeatureCollection"}')
    assert source_fingerprint(str(tmp_path / "building.geojson")) != one
    assert source_fingerprint(str(tmp_path)) != folder
    (tmp_path / "road.geojson").write_text("{}")
    assert source_fingerprint(str(tmp_path / "{class}.geojson"), ["building", "road"]) not in (
        template, source_fingerprint(str(tmp_path / "{class}.geojson"), ["building"]))


@pytest.mark.parametrize(("source", "kind"), [
    ("https://example.org/labels.geojson", "vector"),
    ("https://example.org/x/Labels.GPKG?token=1", "vector"),
    ("http://example.org/{class}.parquet", "vector"),
    ("https://example.org/extract.osm.pbf", "osm"),
    ("s3://bucket/extract.osm.bz2", "osm"),
    ("https://overpass-api.de/api/interpreter", "overpass"),
    ("s3://bucket/labels", "vector"),
])
def test_the_source_kind_follows_the_suffix_before_the_scheme(source: str, kind: str) -> None:
    assert LabelsConfig(source=source).kind == kind


def test_an_unsupported_scheme_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="unsupported URI scheme: gs://b/labels.geojson"):
        LabelsConfig(source="gs://b/labels.geojson")


@pytest.fixture()
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_vector_file_over_http(http_dir: tuple[Path, str]) -> None:
    root, base = http_dir
    local = shared_path("kampala/labels.geojson")
    shutil.copy(local, root / "labels.geojson")
    url = f"{base}/labels.geojson"
    assert LabelsConfig(source=url).kind == "vector"
    remote = harvest_vector(url, [BUILDING], "class", WORLD)
    same = harvest_vector(str(local), [BUILDING], "class", WORLD)
    assert len(remote.frames["building"]) == 206
    assert remote.frames["building"].equals(same.frames["building"])
    before = source_fingerprint(url)
    gpd.read_file(local).head(10).to_file(root / "labels.geojson", driver="GeoJSON")
    assert source_fingerprint(url) != before  # a replaced file is harvested again
    assert len(harvest_vector(url, [BUILDING], "class", WORLD).frames["building"]) == 10
    missing = f"{base}/nothing.geojson"
    with pytest.raises(storage.StorageError) as err:
        harvest_vector(missing, [BUILDING], "class", WORLD)
    assert str(err.value) == f"{missing}: no such file"


@pytest.mark.slow
def test_kampala_config_harvests_and_rasterizes(tmp_path: Path) -> None:
    """conf/kampala.yaml end to end through the harvest flow (one file, one class)."""
    from mapgap.conf import load_config
    from mapgap.flows.harvest import harvest_flow
    from mapgap.orchestration import configured

    labels = gpd.read_file(shared_path("kampala/labels.geojson"))
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "conf" / "kampala.yaml", {"storage": {"root": str(tmp_path)}})
    summary = configured(harvest_flow, cfg)(cfg)
    inside = ~labels.make_valid().intersection(cfg.aoi_geometry).is_empty
    assert summary["features"] == {"building": int(inside.sum())}
    assert 0 < inside.sum() < len(labels)
    assert summary["tiles"] == len(grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom))
    assert 0 < summary["tiles_with_features"]["building"] <= summary["tiles"]


def _config(tmp_path: Path, classes: list[dict], source: str) -> Path:
    import yaml

    data = {"name": "t", "aoi": [32.59, 0.34, 32.60, 0.35], "zoom": 18, "classes": classes,
            "labels": {"source": source},
            "imagery": {"source": "http://127.0.0.1:1/{z}/{x}/{y}.png"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_vector_file_that_names_its_classes_needs_no_tags(tmp_path: Path) -> None:
    """One class, a class column or a file per class: tags are what OSM sources need."""
    from mapgap.conf import ConfigError, load_config

    squares = [box(32.591 + i / 1000, 0.341, 32.5915 + i / 1000, 0.3415) for i in range(3)]
    gpd.GeoDataFrame({"kind": ["hut", "hut", "shed"]}, geometry=squares, crs=4326).to_file(
        tmp_path / "huts.geojson")
    gpd.GeoDataFrame({"class": ["hut", "shed", "shed"]}, geometry=squares, crs=4326).to_file(
        tmp_path / "both.geojson")
    cfg = load_config(_config(tmp_path, [{"name": "hut"}], "huts.geojson"))
    result = harvest_vector(cfg.labels.source, cfg.classes, "class", cfg.aoi_geometry)
    assert len(result.frames["hut"]) == 3  # every row of a one-class file
    assert cfg.classes[0].output_tags() == {"hut": "yes"}  # unless josm_tags says otherwise
    two = load_config(_config(tmp_path, [{"name": "hut"}, {"name": "shed"}], "both.geojson"))
    result = harvest_vector(two.labels.source, two.classes, "class", two.aoi_geometry)
    assert {k: len(f) for k, f in result.frames.items()} == {"hut": 1, "shed": 2}
    # Two classes in a file that does not say which row is which: still one clear line.
    two_huts = load_config(_config(tmp_path, [{"name": "hut"}, {"name": "shed"}],
                                   "huts.geojson"))
    with pytest.raises(VectorLabelError, match="no column 'class' .* to find class 'hut'"):
        harvest_vector(two_huts.labels.source, two_huts.classes, "class", two_huts.aoi_geometry)
    (tmp_path / "town.osm.pbf").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"c.yaml: classes\[0\].tags: required with an OSM"):
        load_config(_config(tmp_path, [{"name": "hut"}], "town.osm.pbf"))
