"""Batch inference: seam-free stitching, mirrored margins, bounded batches, bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from torch import nn

from mapgap import storage
from mapgap.grid import Tile, tile_key
from mapgap.layout import RunLayout
from mapgap.tasks.geometry import read_geojson
from mapgap.tasks.neighbourhood import TileCache, with_margin
from mapgap.tasks.predict import (
    ModelLoadError,
    ModelRef,
    PredictSettings,
    band_names,
    blocked_order,
    decode_probability,
    encode_probability,
    predict_tiles,
    read_probability,
    stored_tiles,
    write_meta,
)
from mapgap.tasks.vectorize import (
    VectorSettings,
    finish,
    merge_and_write,
    vectorize_tiles,
    write_pieces,
)
from tests.helpers_inference import ORIGIN, SIZE, BrightnessNet, Z, tile_lonlat, write_mosaic


def vectorize(layout: RunLayout, tiles: list[Tile], **kw) -> tuple[np.ndarray, list[dict]]:
    s = VectorSettings(classes=("building",), zoom=Z, tile_size=SIZE, min_area_m2=1.0, **kw)
    interior, border = vectorize_tiles(layout, tiles, s)
    finished = {"building": finish(interior["building"], "building", s)}
    pieces = write_pieces(layout.vector_pieces("all"), finished, border)
    merge_and_write(layout, [pieces], s)
    return read_geojson(layout.predictions)


@pytest.fixture()
def corner_building(tmp_path) -> tuple[RunLayout, list[Tile], shapely.Polygon]:
    """A bright 200x120 px roof centred on the corner shared by 4 tiles."""
    layout = RunLayout(str(tmp_path / "run"))
    mosaic = np.full((2 * SIZE, 2 * SIZE, 3), 40, np.uint8)
    mosaic[SIZE - 60:SIZE + 60, SIZE - 100:SIZE + 100] = 230
    tiles = write_mosaic(layout, mosaic)
    return layout, tiles, shapely.box(SIZE - 100, SIZE - 60, SIZE + 100, SIZE + 60)


def test_building_across_four_tiles_is_one_polygon_without_gap(corner_building) -> None:
    layout, tiles, truth_px = corner_building
    predict_tiles(layout, tiles, BrightnessNet(), PredictSettings(tile_size=SIZE, margin_px=32,
                                                                  batch_size=3))
    geoms, props = vectorize(layout, tiles)
    assert len(geoms) == 1, f"expected one polygon, got {len(geoms)}"
    poly = geoms[0]
    assert poly.geom_type == "Polygon" and not poly.interiors
    assert sorted(props[0]["tiles"]) == sorted(tile_key(t) for t in tiles)
    # The building corner point shared by the 4 tiles lies well inside the polygon.
    w, s, e, n = shapely.bounds(poly)
    corner_lon, corner_lat = tile_lonlat(ORIGIN.x + 1, ORIGIN.y + 1)
    assert w < corner_lon < e and s < corner_lat < n
    # Area close to the true 200x120 px roof (pixels ~0.6 m at zoom 18 near the equator).
    mpp = 2 * 20037508.342789244 / (2**Z * SIZE)
    assert 0.85 < props[0]["area_m2"] / (200 * 120 * mpp**2) < 1.05
    assert props[0]["score"] > 0.9


def test_without_context_the_tiles_leave_a_seam(corner_building) -> None:
    """The same scene with no margin (what a per-tile predictor does) splits apart,
    so the test above really measures the stitching."""
    layout, tiles, _ = corner_building
    predict_tiles(layout, tiles, BrightnessNet(), PredictSettings(tile_size=SIZE, margin_px=0,
                                                                  loader_workers=0))
    geoms, _ = vectorize(layout, tiles)
    assert len(geoms) == 4


def test_missing_neighbour_is_mirrored_not_black(tmp_path) -> None:
    """A roof touching the edge of the imaged area keeps its probability at the edge."""
    layout = RunLayout(str(tmp_path / "run"))
    mosaic = np.full((SIZE, 2 * SIZE, 3), 40, np.uint8)
    mosaic[100:160, SIZE - 80:SIZE + 80] = 230
    tiles = write_mosaic(layout, mosaic, missing={(1, 0)})
    predict_tiles(layout, tiles, BrightnessNet(), PredictSettings(tile_size=SIZE))
    prob = read_probability(layout, 1, tiles[0])[0]
    assert prob[130, SIZE - 1] > 0.95 * 255
    assert prob[130, SIZE - 81] < 0.5 * 255


def test_window_margin_reads_the_neighbour_pixels(tmp_path) -> None:
    tiles = {Tile(5, 5, 4): np.full((8, 8), 1), Tile(6, 5, 4): np.full((8, 8), 2),
             Tile(5, 4, 4): np.full((8, 8), 3)}
    cache = TileCache(tiles.get, capacity=9)
    w = with_margin(Tile(5, 5, 4), cache, 2)
    assert w.shape == (12, 12)
    assert (w[2:10, 10:] == 2).all()  # east neighbour
    assert (w[:2, 2:10] == 3).all()  # north neighbour
    assert (w[10:, 2:10] == 1).all() and (w[2:10, :2] == 1).all()  # mirrored
    assert cache.loads == 9


def test_probability_png_round_trip_for_1_to_4_classes() -> None:
    rng = np.random.default_rng(0)
    for c in (1, 2, 3, 4):
        probs = rng.integers(0, 256, (c, 16, 16), dtype=np.uint8)
        assert (decode_probability(encode_probability(probs), c, "x") == probs).all()
    with pytest.raises(ValueError, match="at most 4"):
        encode_probability(np.zeros((5, 4, 4), np.uint8))


def test_window_is_a_multiple_of_32_and_tta_keeps_shape(corner_building) -> None:
    assert PredictSettings(tile_size=256, margin_px=20).window_margin == 32
    assert PredictSettings(tile_size=512, margin_px=0).window_margin == 0
    layout, tiles, _ = corner_building
    result = predict_tiles(layout, tiles[:1], BrightnessNet(),
                           PredictSettings(tile_size=SIZE, tta=True, loader_workers=0))
    assert result == {"tiles": 1}
    assert read_probability(layout, 1, tiles[0]).shape == (1, SIZE, SIZE)


class RampBands(nn.Module):
    """Contract 1 with an instance band that is NOT flip-symmetric: building 0.5
    everywhere, 'distance' = the column position across the window (0..1)."""

    classes = ["building"]
    band_names = ["building", "distance"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], 0.5)

    def bands(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0, 1, x.shape[-1]).expand_as(x[:, :1])
        return torch.cat([self(x), ramp], dim=1)


def test_bands_are_written_and_tta_flips_the_distance_too(corner_building) -> None:
    layout, tiles, _ = corner_building
    s = PredictSettings(tile_size=SIZE, margin_px=32, loader_workers=0)
    assert band_names(RampBands()) == ["building", "distance"]
    assert band_names(BrightnessNet()) == ["building"]  # no bands(): the classes
    predict_tiles(layout, tiles[:1], RampBands(), s)
    probs = read_probability(layout, 2, tiles[0])
    assert probs.shape == (2, SIZE, SIZE) and (probs[0] == 128).all()
    m, window = s.window_margin, SIZE + 2 * s.window_margin
    expected = np.round(np.linspace(0, 1, window)[m:m + SIZE] * 255)
    assert np.abs(probs[1, 0].astype(float) - expected).max() <= 1  # a ramp, kept as is
    predict_tiles(layout, tiles[:1], RampBands(), replace(s, tta=True))
    flat = read_probability(layout, 2, tiles[0])[1]
    assert flat.min() >= 127 and flat.max() <= 128  # mean of a ramp and its mirror


def test_probabilities_can_go_to_another_run_dir(corner_building, tmp_path) -> None:
    """Validation predicts a run's tiles (imagery and context from the run) elsewhere."""
    layout, tiles, _ = corner_building
    scratch = RunLayout(str(tmp_path / "scratch"))
    s = PredictSettings(tile_size=SIZE, loader_workers=0)
    assert predict_tiles(layout, tiles, BrightnessNet(), s, out=scratch) == {"tiles": 4}
    assert not stored_tiles(layout.probabilities, Z)
    assert set(stored_tiles(scratch.probabilities, Z)) == set(tiles)
    predict_tiles(layout, tiles, BrightnessNet(), s)
    for t in tiles:  # the same context, so the same probabilities
        assert (read_probability(scratch, 1, t) == read_probability(layout, 1, t)).all()


def test_meta_names_the_bands(tmp_path) -> None:
    layout = RunLayout(str(tmp_path / "run"))
    ref = ModelRef("m.pt", None, key="k")
    s = PredictSettings(tile_size=SIZE)
    write_meta(layout, ref, ["building"], s, bands=band_names(RampBands()))
    assert storage.read_json(layout.predict_meta)["bands"] == ["building", "distance"]
    write_meta(layout, ref, ["building"], s)
    assert storage.read_json(layout.predict_meta)["bands"] == ["building"]


def test_tiles_listed_and_ordered_in_compact_blocks(tmp_path, corner_building) -> None:
    layout, tiles, _ = corner_building
    assert set(stored_tiles(layout.images, Z)) == set(tiles)
    grid = [Tile(x, y, 10) for x in range(8) for y in range(8)]
    first = blocked_order(grid, 16)[:16]
    assert {t.x for t in first} == {0, 1, 2, 3} and {t.y for t in first} == {0, 1, 2, 3}


def test_corrupt_tile_is_a_clear_error(tmp_path) -> None:
    from mapgap.tasks.predict import TileReadError

    layout = RunLayout(str(tmp_path / "run"))
    tile = Tile(ORIGIN.x, ORIGIN.y, Z)
    storage.write_bytes(layout.image(tile), b"<html>rate limited</html>")
    with pytest.raises(TileReadError, match=r"tiles/18/131072/131072.png: not a decodable image"):
        predict_tiles(layout, [tile], BrightnessNet(),
                      PredictSettings(tile_size=SIZE, loader_workers=0))


def test_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    from mapgap.tasks.predict import resolve_model

    class Cfg:  # only what resolve_model reads
        class inference:  # noqa: N801
            model = str(tmp_path / "nope.ckpt")

    with pytest.raises(ModelLoadError, match=r"inference.model: checkpoint not found: .*nope"):
        resolve_model(Cfg)


# --- the flow ------------------------------------------------------------------------------

def _run_predict(cfg):
    from mapgap.flows.predict import predict_flow
    from mapgap.orchestration import configured

    return configured(predict_flow, cfg)(cfg)


@pytest.mark.slow
def test_predict_flow_end_to_end_and_cached_rerun(tmp_path) -> None:
    """A real checkpoint that says 'building' everywhere over a 2x2 AOI whose
    imagery misses one tile: the 3 predicted tiles become ONE polygon; a rerun
    reuses every task, a new model recomputes."""
    from tests.helpers_inference import constant_checkpoint, make_config

    ckpt = constant_checkpoint(tmp_path / "model.pt")
    cfg = make_config(tmp_path, inference={"model": ckpt, "tiles_per_task": 2,
                                           "loader_workers": 1})
    layout = RunLayout(cfg.run_uri)
    write_mosaic(layout, np.zeros((2 * SIZE, 2 * SIZE, 3), np.uint8), missing={(1, 1)})
    first = _run_predict(cfg)
    assert (first["tiles"], first["tiles_without_imagery"], first["batches"]) == (3, 1, 2)
    assert first["polygons"] == {"building": 1} and first["classes"] == ["building"]
    geoms, props = read_geojson(layout.predictions)
    assert geoms[0].geom_type == "Polygon" and len(props[0]["tiles"]) == 3
    assert props[0]["score"] > 0.99
    meta = storage.read_json(layout.predict_meta)
    assert meta["classes"] == ["building"] and meta["model"] == ckpt

    probe = Path(layout.probability(Tile(ORIGIN.x, ORIGIN.y, Z)))
    stamp = probe.stat().st_mtime_ns
    _run_predict(cfg)
    assert probe.stat().st_mtime_ns == stamp  # cached: not predicted again
    constant_checkpoint(tmp_path / "model.pt", logit=-8.0)  # a new model, same path
    assert _run_predict(cfg)["polygons"] == {"building": 0}
    assert probe.stat().st_mtime_ns != stamp


def test_predict_flow_bad_inputs_fail_with_one_line(tmp_path) -> None:
    from mapgap.tasks.predict import NoImageryError
    from tests.helpers_inference import constant_checkpoint, make_config

    cfg = make_config(tmp_path, inference={"model": str(tmp_path / "missing.pt")})
    with pytest.raises(ModelLoadError, match=r"^inference.model: checkpoint not found: .*missing"):
        _run_predict(cfg)
    cfg = make_config(tmp_path, inference={"model": constant_checkpoint(tmp_path / "m.pt")})
    with pytest.raises(NoImageryError, match=r"/tiles: no imagery tile for the AOI \(4 tiles"):
        _run_predict(cfg)
    # No model trained yet: the registry (a real MLflow sqlite store) has no champion.
    cfg = make_config(tmp_path)
    with pytest.raises(ModelLoadError, match=r"models:/building@champion is not in the MLflow"):
        _run_predict(cfg)


def test_registry_champion_is_pinned_to_its_version(tmp_path) -> None:
    """The cache key of predictions follows the champion's version, not the alias."""
    import mlflow

    from mapgap.models.inference import REGISTRY_PATH
    from mapgap.tasks.predict import registry_model
    from mapgap.tracking import client
    from tests.helpers_inference import constant_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = constant_checkpoint(tmp_path / "model.pt")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        mlflow.log_artifact(ckpt, artifact_path=str(Path(REGISTRY_PATH).parent))
    c = client(uri)
    c.create_registered_model("building")
    mv = c.create_model_version("building", f"runs:/{run.info.run_id}", run.info.run_id)
    c.set_registered_model_alias("building", "champion", mv.version)
    ref = registry_model("models:/building@champion", uri)
    assert ref.key == f"building/{mv.version}" and ref.run_id == run.info.run_id
    assert registry_model(f"models:/building/{mv.version}", uri).key == ref.key


def test_predict_and_vectorize_on_s3(s3_bucket) -> None:
    layout = RunLayout(f"{s3_bucket}/runs/t")
    mosaic = np.full((SIZE, 2 * SIZE, 3), 40, np.uint8)
    mosaic[100:160, SIZE - 80:SIZE + 80] = 230
    tiles = write_mosaic(layout, mosaic)
    assert set(stored_tiles(layout.images, Z)) == set(tiles)
    # Loader workers start from a server process that may predate the moto endpoint
    # in this test session's environment: decode in-process here.
    predict_tiles(layout, tiles, BrightnessNet(),
                  PredictSettings(tile_size=SIZE, loader_workers=0))
    geoms, props = vectorize(layout, tiles)
    assert len(geoms) == 1 and len(props[0]["tiles"]) == 2
