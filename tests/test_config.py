"""Config errors are one line naming the file, the field and the problem; the CLI
exits with code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mapgap.conf import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent

MINIMAL = {
    "name": "t",
    "aoi": [32.59, 0.34, 32.60, 0.35],
    "zoom": 18,
    "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
    "labels": {"source": "town.osm.pbf"},
    "imagery": {"source": "http://127.0.0.1:1/{z}/{x}/{y}.png"},
}


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    (tmp_path / "town.osm.pbf").write_bytes(b"")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def with_(**changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[leaf] = value
    return data


def test_minimal_config_loads_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.labels.source == str(tmp_path / "town.osm.pbf")
    assert cfg.labels.kind == "osm"
    assert cfg.imagery.kind == "xyz"
    assert cfg.run_uri.endswith("runs/t")
    assert cfg.aoi_geometry.bounds == pytest.approx((32.59, 0.34, 32.60, 0.35))
    assert cfg.classes[0].output_tags() == {"building": "yes"}


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        (with_(zom=18), "zom", "unknown key"),
        (with_(train__epoch=3), "train.epoch", "unknown key"),
        (with_(zoom="eighteen"), "zoom", "valid integer"),
        (with_(zoom=25), "zoom", "less than or equal to 24"),
        (with_(zoom=-1), "zoom", "greater than or equal to 0"),
        (with_(aoi=[10, 0, 5, 1]), "aoi", "west < east"),
        (with_(aoi=[0, -91, 1, 1]), "aoi", "latitudes"),
        (with_(labels={"source": "missing.osm.pbf"}), "labels.source", "file not found"),
        (with_(aoi="nowhere.geojson"), "aoi", "file not found"),
        (with_(imagery={"source": "http://x/{x}/{y}.png"}), "imagery.source", "{z}"),
        (with_(classes=[]), "classes", "at least 1"),
        (with_(classes__0__name="Build.ing"), "classes[0].name", "pattern"),
        (with_(classes__0__geometry="line"), "classes[0]", "need width_m"),
        # YAML booleans are not numbers (pydantic alone would read `true` as 1).
        (with_(zoom=True), "zoom", "expected a number, got true"),
        (with_(train__epochs=False), "train.epochs", "expected a number, got false"),
        (with_(inference__threshold=True), "inference.threshold", "expected a number, got true"),
        (with_(imagery__bands=[1, True, 3]), "imagery.bands", "expected a number, got true"),
        (with_(classes__0__widths_m={"primary": True}), "classes[0].widths_m", "got true"),
        (with_(aoi=[1, 2, 3]), "aoi", "expected 4 numbers [west, south, east, north] or a GeoJSON"),
        (with_(aoi=[0, 0, True, 1]), "aoi", "expected 4 numbers"),
        (with_(aoi={"west": 0}), "aoi", "expected 4 numbers"),
    ],
)
def test_bad_config_is_one_line_naming_field(
    tmp_path: Path, data: dict, field: str, problem: str
) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}")
    assert problem in message


def test_missing_field_and_bad_yaml(tmp_path: Path) -> None:
    data = dict(MINIMAL)
    del data["zoom"]
    with pytest.raises(ConfigError, match=r"c.yaml: zoom: required field is missing"):
        load_config(write(tmp_path, data))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_aoi_from_geojson(tmp_path: Path) -> None:
    (tmp_path / "aoi.geojson").write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},'
        ' "geometry": {"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,0]]]}}]}'
    )
    cfg = load_config(write(tmp_path, with_(aoi="aoi.geojson")))
    assert cfg.aoi_geometry.area == pytest.approx(0.5)


def cli_error(config: Path) -> str:
    """The one stderr line of a stage run on a bad config (and exit code 2)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mapgap.cli", "harvest", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, with_(zoom=30))
    assert cli_error(path).startswith(f"error: {path}: zoom:")


def test_cli_on_demo_template_says_mapgap_demo_fills_it() -> None:
    line = cli_error(REPO / "conf" / "demo.yaml")
    assert ": aoi: required field is missing" in line
    assert "filled in by `mapgap demo`" in line and "demo-out/demo.yaml" in line


def test_kampala_config_validates() -> None:
    if not (REPO.parent / "shared" / "data" / "kampala").exists():
        pytest.skip("../shared/data/kampala not available (see ../shared/data/README.md)")
    cfg = load_config(REPO / "conf" / "kampala.yaml")
    assert cfg.labels.kind == "vector" and cfg.imagery.kind == "xyz"


def test_demo_config_validates_with_generated_sources(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mapgap.demo import demo_config, write_resolved_config

    pbf = tmp_path / "town.osm.pbf"
    pbf.write_bytes(b"")
    complete = tmp_path / "complete_areas.geojson"
    complete.write_text('{"type": "Polygon", "coordinates": [[[32.59, 0.34], [32.6, 0.34],'
                        ' [32.6, 0.35], [32.59, 0.34]]]}')
    scene = SimpleNamespace(bbox=(32.59, 0.34, 32.60, 0.35), zoom=18, pbf=pbf,
                            complete_areas=complete)
    cfg = demo_config(scene, "http://127.0.0.1:8000/{z}/{x}/{y}.png", tmp_path)
    assert [c.name for c in cfg.classes] == ["building", "road", "parking"]
    assert cfg.run_uri == str(tmp_path / "runs" / "demo")
    write_resolved_config(cfg, tmp_path / "demo.yaml")  # what stages rerun by hand read
    assert load_config(tmp_path / "demo.yaml") == cfg


# --- everything the config alone can tell is checked at load -------------------------------

CONTINENT = [-20, -35, 50, 35]


def _files(tmp_path: Path) -> None:
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (tmp_path / "points.geojson").write_text('{"type": "Point", "coordinates": [32.6, 0.3]}')


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        (with_(aoi="broken.geojson"), "aoi", "not a GeoJSON file of polygons"),
        (with_(aoi="points.geojson"), "aoi", "no polygon with area"),
        (with_(imagery={"source": "ftp://host/{z}/{x}/{y}.png"}), "imagery.source",
         "unsupported URI scheme ftp://"),
        (with_(imagery={"source": "ftp://host/ortho.tif"}), "imagery.source",
         "unsupported URI scheme ftp://"),
        (with_(imagery={"source": "https://t/{z}/{x}/{y}.png?key={key}"}), "imagery",
         "api_key_env"),
        (with_(imagery={"source": "https://t/{z}/{x}/{y}.png", "api_key_env": "K"}), "imagery",
         "neither source nor a header uses {key}"),
        (with_(train__classes=["nosuch"]), "train.classes", "unknown class 'nosuch'"),
        (with_(labels__align={"model": "models:/building@champion", "classes": ["nosuch"]}),
         "labels.align.classes", "unknown class 'nosuch'"),
        (with_(labels__align={"model": "models:/x@y", "max_shift_m": 0}),
         "labels.align.max_shift_m",
         "greater than 0"),
        (with_(labels__complete_areas="broken.geojson"), "labels.complete_areas",
         "not a GeoJSON file of polygons"),
        (with_(labels__complete_areas=["z19_1_1"]), "labels.complete_areas",
         "finer than the run's zoom 18"),
        (with_(aoi=CONTINENT), "aoi", "tiles at zoom 18, more than max_tiles=2,000,000"),
        (with_(classes=[{"name": "building"}]), "classes[0].tags", "required with an OSM"),
    ],
)
def test_config_only_problems_fail_the_load(
    tmp_path: Path, data: dict, field: str, problem: str
) -> None:
    _files(tmp_path)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}: "), message
    assert problem in message, message


@pytest.mark.timeout(30)  # counted from the AOI's corners: billions of tiles are not listed
def test_a_continent_at_zoom_18_fails_fast_saying_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, with_(aoi=CONTINENT)))
    msg = str(err.value)
    assert "2,776,805,148 tiles" in msg  # 50,973 columns x 54,476 rows
    assert "split the AOI" in msg and "raise max_tiles" in msg
    # A GeoJSON AOI is bounded by its parts' boxes, a raised cap lets it through.
    (tmp_path / "two.geojson").write_text(json.dumps({"type": "MultiPolygon", "coordinates": [
        [[[-20, -35], [-18, -35], [-18, -33], [-20, -35]]],
        [[[48, 33], [50, 33], [50, 35], [48, 35], [48, 33]]]]}))
    with pytest.raises(ConfigError, match=r"aoi: up to [\d,]+ tiles at zoom 18"):
        load_config(write(tmp_path, with_(aoi="two.geojson")))
    cfg = load_config(write(tmp_path, with_(aoi="two.geojson", zoom=12, max_tiles=5000)))
    assert cfg.max_tiles == 5000
    with pytest.raises(ConfigError, match=r"aoi: up to 1[\d,]+ tiles at zoom 12, more than "
                                          r"max_tiles=1,000"):
        load_config(write(tmp_path, with_(aoi="two.geojson", zoom=12, max_tiles=1000)))


def test_non_utf8_config_and_unset_key_variable(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)
    path.write_bytes(path.read_bytes() + b"# caf\xe9 (Latin-1)\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = path.read_bytes().count(b"\n")
    assert str(err.value).startswith(f"{path}: line {lines}: not UTF-8 text (byte 0xe9)")
    assert "\n" not in str(err.value)
    monkeypatch.delenv("MAPGAP_TEST_UNSET_KEY", raising=False)
    keyed = with_(imagery={"source": "https://t/{z}/{x}/{y}.png?key={key}",
                           "api_key_env": "MAPGAP_TEST_UNSET_KEY"})
    with pytest.raises(ConfigError, match=r"c.yaml: imagery.api_key_env: environment variable "
                                          r"MAPGAP_TEST_UNSET_KEY is not set"):
        load_config(write(tmp_path, keyed))
    monkeypatch.setenv("MAPGAP_TEST_UNSET_KEY", "k")
    assert load_config(write(tmp_path, keyed)).imagery.api_key_env == "MAPGAP_TEST_UNSET_KEY"


@pytest.mark.parametrize("case", ["aoi", "key", "ftp", "classes", "utf8"])
def test_cli_load_errors_are_one_line_exit_2(tmp_path: Path, case: str) -> None:
    _files(tmp_path)
    data = {
        "aoi": with_(aoi="broken.geojson"),
        "key": with_(imagery={"source": "https://t/{z}/{x}/{y}.png?key={key}",
                              "api_key_env": "MAPGAP_TEST_UNSET_KEY"}),
        "ftp": with_(imagery={"source": "ftp://host/{z}/{x}/{y}.png"}),
        "classes": with_(train__classes=["nosuch"]),
        "utf8": MINIMAL,
    }[case]
    path = write(tmp_path, data)
    if case == "utf8":
        path.write_bytes(b"# \xff\xfe\n" + path.read_bytes())
    line = cli_error(path)  # exit 2, one line (so no traceback)
    assert line.startswith(f"error: {path}: ")
    assert "Traceback" not in line
