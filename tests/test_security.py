"""What a hostile tile folder or config must not get out of mapgap: file contents
in reports (symlinks out of a tile folder) and credentials written into the config
(they would be stored in the Prefect DB and fetch_report.json)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from mapgap.conf import ConfigError, load_config
from mapgap.conf.imagery import ImageryConfig
from mapgap.grid import Tile, tile_key
from mapgap.tasks.imagery import fetch_batch

SECRET = "root:x:0:0:SECRET-CONTENT-of-a-file-outside-the-tile-folder\n"


def _png(value: int) -> bytes:
    rgb = np.full((256, 256, 3), value, np.uint8)
    rgb[::7] = 255 - value  # not blank
    return cv2.imencode(".png", rgb)[1].tobytes()


def test_symlinks_out_of_the_tile_folder_are_refused_and_no_bytes_reported(
    tmp_path: Path,
) -> None:
    folder, outside = tmp_path / "tiles", tmp_path / "private"
    outside.mkdir()
    (outside / "passwd").write_text(SECRET)
    (outside / "real.png").write_bytes(_png(90))
    z, tiles = 18, [Tile(100 + i, 200, 18) for i in range(5)]
    for t in tiles:
        (folder / str(z) / str(t.x)).mkdir(parents=True)
    plain, inner, to_secret, to_png, garbage = tiles
    (folder / f"{z}/{plain.x}/200.png").write_bytes(_png(60))
    (folder / f"{z}/{inner.x}/200.png").symlink_to(folder / f"{z}/{plain.x}/200.png")
    (folder / f"{z}/{to_secret.x}/200.png").symlink_to(outside / "passwd")
    (folder / f"{z}/{to_png.x}/200.png").symlink_to(outside / "real.png")  # an image, still out
    (folder / f"{z}/{garbage.x}/200.png").write_text(SECRET)  # inside, not an image
    run = tmp_path / "run"
    report = fetch_batch(str(run), ImageryConfig(source=f"{folder}/{{z}}/{{x}}/{{y}}.png"),
                         256, tiles)
    assert report["counts"]["fetched"] == 2  # the plain tile and the link inside the folder
    failures = {f["tile"]: f["reason"] for f in report["failures"]}
    assert set(failures) == {tile_key(to_secret), tile_key(to_png), tile_key(garbage)}
    for t in (to_secret, to_png):
        reason = failures[tile_key(t)]
        assert f"{folder}/{z}/{t.x}/200.png" in reason and "symlink" in reason
        assert str(folder) in reason.split("outside", 1)[1]
    text = json.dumps(report)
    assert "SECRET" not in text and "root:x" not in text
    assert not (run / "tiles" / str(z) / str(to_png.x)).exists()


CONFIG = {
    "name": "t", "aoi": [32.59, 0.34, 32.60, 0.35], "zoom": 18,
    "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
    "labels": {"source": "town.osm.pbf"},
    "imagery": {"source": "https://tiles.example/{z}/{x}/{y}.png"},
}
LITERAL = "sk-9f8e7d6c5b4a"


def _load(tmp_path: Path, imagery: dict) -> object:
    (tmp_path / "town.osm.pbf").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "imagery": imagery}))
    return load_config(path)


@pytest.mark.parametrize(("imagery", "field"), [
    ({"source": f"https://t.example/{{z}}/{{x}}/{{y}}.png?key={LITERAL}"}, "imagery.source"),
    ({"source": f"https://t.example/{{z}}/{{x}}/{{y}}.jpg?style=a&access_token={LITERAL}"},
     "imagery.source"),
    ({"source": f"https://t.example/{{z}}/{{x}}/{{y}}.png?apikey={LITERAL}"}, "imagery.source"),
    ({"source": f"https://t.example/{{z}}/{{x}}/{{y}}.png?Token={LITERAL}"}, "imagery.source"),
    ({"source": f"https://me:{LITERAL}@t.example/{{z}}/{{x}}/{{y}}.png"}, "imagery.source"),
    ({"source": CONFIG["imagery"]["source"], "headers": {"Authorization": f"Bearer {LITERAL}"}},
     "imagery.headers"),
    ({"source": CONFIG["imagery"]["source"], "headers": {"X-Api-Key": LITERAL}},
     "imagery.headers"),
])
def test_a_literal_credential_in_the_imagery_config_is_refused_at_load(
    tmp_path: Path, imagery: dict, field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, imagery)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'c.yaml'}: {field}")
    assert "imagery.api_key_env" in msg and "{key}" in msg and "environment" in msg
    assert LITERAL not in msg  # not even in the error


def test_credentials_from_the_environment_and_harmless_parameters_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAPGAP_TEST_KEY", LITERAL)
    cfg = _load(tmp_path, {"source": "https://t.example/{z}/{x}/{y}.png?key={key}&format=png",
                           "headers": {"Authorization": "Bearer {key}", "Referer": "https://me"},
                           "api_key_env": "MAPGAP_TEST_KEY"})
    assert LITERAL not in cfg.model_dump_json()  # what Prefect stores as flow parameters
    assert _load(tmp_path, {"source": "https://t.example/{z}/{x}/{y}.png?token_type=a&tk=1"})
