"""Hard-negative mining.

Fast: what counts as a mistake (metres, labels, trusted area), negative masks,
picking, the pool (tile list, GeoJSON areas, density rule, held-back blocks).

Slow, on the synthetic demo town (roof-coloured trucks, containers and courts):
two rounds cut false positives on held-back pool tiles without losing val IoU
(read back from MLflow); tiles outside ``complete_areas`` never give negatives;
a rerun after a failure in round 2 does not redo round 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

from mapgap import grid, storage
from mapgap.conf.schema import ConfigError
from mapgap.layout import RunLayout
from mapgap.tasks import complete_areas, mining, mining_pool
from mapgap.tasks.complete_areas import trusted_pixels
from mapgap.tasks.mistakes import (
    Mistake,
    centred_offset,
    false_positives,
    find_mistakes,
    negative_mask,
)
from mapgap.tasks.shards import IGNORE

SIZE = 256
TILE = grid.Tile(158_000, 130_900, 18)  # near Kampala: ~0.6 m per pixel


def blob(probs: np.ndarray, r0: int, c0: int, h: int, w: int, p: float) -> None:
    probs[r0:r0 + h, c0:c0 + w] = p


# --- mistakes on one tile --------------------------------------------------------------

def test_mistakes_are_confident_unlabelled_groups_measured_in_square_metres() -> None:
    mpp = grid.metres_per_pixel(TILE, SIZE)
    probs = np.zeros((SIZE, SIZE), np.float32)
    blob(probs, 10, 10, 20, 20, 0.9)     # ~144 m2, unlabelled: a mistake
    blob(probs, 100, 100, 20, 20, 0.8)   # touches a label: not a mistake
    blob(probs, 200, 200, 3, 3, 0.99)    # ~3 m2: too small
    blob(probs, 60, 150, 20, 20, 0.4)    # below the threshold
    blob(probs, 150, 10, 30, 30, 0.7)    # bigger, less confident mistake
    labelled = np.zeros((SIZE, SIZE), bool)
    labelled[119, 119] = True            # one touched pixel is enough
    found = find_mistakes(TILE, probs, labelled, None, "building", 0.5, 10.0)
    assert [(m.bbox, m.score) for m in found] == [((10, 10, 30, 30), 0.9),
                                                  ((10, 150, 40, 180), 0.7)]
    assert found[0].area_m2 == pytest.approx(400 * mpp**2, rel=1e-3)
    lon, lat = grid.pixel_to_lonlat(TILE, SIZE, 20, 20)
    assert (found[0].lon, found[0].lat) == pytest.approx((lon, lat), abs=1e-6)
    # The same blobs with a 150 m2 minimum: only the 30 x 30 px one (~324 m2) is left.
    big = find_mistakes(TILE, probs, labelled, None, "building", 0.5, 150.0)
    assert [m.bbox for m in big] == [(10, 150, 40, 180)]
    # Minimum area in m2, not pixels: at a coarser zoom the same 3 x 3 px group is large.
    coarse = grid.Tile(TILE.x // 8, TILE.y // 8, 15)
    assert len(find_mistakes(coarse, probs, labelled, None, "building", 0.5, 100.0)) == 3


def test_mistakes_outside_the_trusted_area_do_not_count() -> None:
    probs = np.zeros((SIZE, SIZE), np.float32)
    blob(probs, 10, 10, 20, 20, 0.9)
    blob(probs, 10, 120, 20, 20, 0.9)  # straddles the trusted border at column 128
    trusted = np.zeros((SIZE, SIZE), bool)
    trusted[:, :128] = True
    found = find_mistakes(TILE, probs, np.zeros_like(trusted), trusted, "building", 0.5, 10.0)
    assert [m.bbox for m in found] == [(10, 10, 30, 30)]


def test_trusted_pixels_of_a_partly_covered_tile() -> None:
    left, bottom, right, top = grid.tile_xy_bounds(TILE)
    mid = (left + right) / 2
    half = shapely.box(left - 100, bottom - 100, mid, top + 100)
    trusted = trusted_pixels(half, TILE, SIZE)
    assert trusted[:, :127].all() and not trusted[:, 129:].any()
    assert trusted_pixels(shapely.box(left - 1, bottom - 1, right + 1, top + 1), TILE, SIZE) is None


def test_false_positives_are_unlabelled_groups_on_trusted_background() -> None:
    probs = np.zeros((8, 8), np.float32)
    probs[0, :4] = 0.9   # a group touching a label: an edge error, not a false positive
    probs[5, 2:6] = 0.9  # a group on nothing: 4 false-positive pixels...
    labelled = np.zeros((8, 8), bool)
    labelled[0, 0] = True
    truth = labelled.copy()
    valid = np.ones((8, 8), bool)
    valid[5, 5] = False  # ...one of them where the truth is not trusted
    assert false_positives(probs, labelled, truth, valid, 0.5) == {
        "fp_pixels": 3, "background_pixels": 62}


def test_negative_mask_keeps_the_truth_and_ignores_untrusted_pixels() -> None:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[0:5, 0:5] = 1
    trusted = np.ones((SIZE, SIZE), bool)
    trusted[:, 200:] = False
    out = negative_mask(mask, trusted)
    assert (out[:, 200:] == IGNORE).all() and (out[0:5, 0:5] == 1).all()
    assert (out[100, :200] == 0).all() and mask.max() == 1  # the input is not modified
    assert negative_mask(mask, None) is mask


def mistake(tile: str, score: float, bbox: tuple[int, int, int, int] = (0, 0, 10, 10),
            area: float = 20.0) -> Mistake:
    return Mistake(tile, "building", score, score, area, bbox, 0.0, 0.0)


def test_centred_windows_put_the_mistake_in_the_middle() -> None:
    assert centred_offset(mistake("a", 0.9, (100, 20, 120, 40)), SIZE) == (-18, -98)
    # Never more than half a tile away: the window always overlaps its own tile by half.
    assert centred_offset(mistake("a", 0.9, (250, 250, 256, 256)), SIZE) == (125, 125)


def test_picks_are_capped_most_confident_first_and_distinct() -> None:
    found = [mistake("a", 0.6, (200, 200, 210, 210)), mistake("b", 0.9),
             mistake("a", 0.95), mistake("c", 0.7), mistake("b", 0.9, area=50.0),
             mistake("a", 0.8, (20, 20, 30, 30))]  # close to a's best: same window
    tiles = mining.pick_negatives(found, 2, SIZE, centred=False)
    assert [(p["tile"], p["score"], p["layer"]) for p in tiles] == [("a", 0.95, 0), ("b", 0.9, 0)]
    windows = mining.pick_negatives(found, 10, SIZE, centred=True)
    assert [(p["tile"], p["score"], p["layer"]) for p in windows] == [
        ("a", 0.95, 0), ("b", 0.9, 0), ("c", 0.7, 0), ("a", 0.6, 1)]
    assert windows[1]["mistake"]["area_m2"] == 50.0  # ties: the bigger one first


# --- the pool ---------------------------------------------------------------------------

def tiles_block(n: int) -> list[grid.Tile]:
    return [grid.Tile(TILE.x + dx, TILE.y + dy, 18) for dy in range(n) for dx in range(n)]


def pool_config(tmp_path: Path, n: int = 4, complete_areas: Any = None, **mining_cfg: Any
                ) -> Any:
    """A run dir with n x n tiles of imagery + mask stats (feature count = column)."""
    from mapgap.conf import validate_config

    tiles = tiles_block(n)
    w, _, _, north = grid.tile_bounds(tiles[0])
    _, s, e, _ = grid.tile_bounds(tiles[-1])
    (tmp_path / "labels.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    cfg = validate_config({
        "name": "pool", "storage": {"root": str(tmp_path / "out")}, "aoi": [w, s, e, north],
        "zoom": 18, "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
        "labels": {"source": "labels.geojson", "complete_areas": complete_areas},
        "imagery": {"source": "http://127.0.0.1:1/{z}/{x}/{y}.png"},
        "mining": mining_cfg}, "test", tmp_path)
    layout = RunLayout(cfg.run_uri)
    stats = {}
    for t in tiles:
        storage.write_bytes(layout.image(t), b"png")
        stats[grid.tile_key(t)] = {"features": {"building": t.x - TILE.x}, "foreground": {}}
    storage.write_json(layout.mask_stats, stats)
    return cfg


def test_pool_from_a_tile_list_never_leaves_it(tmp_path: Path) -> None:
    tiles = tiles_block(4)
    listed = [grid.tile_key(t) for t in tiles[:8]]  # the top two rows
    cfg = pool_config(tmp_path, complete_areas=listed, holdout_fraction=0.5)
    pool = mining_pool.select_pool(cfg, [])
    assert set(pool["mine"]) | set(pool["holdout"]) == set(listed)
    assert not set(pool["mine"]) & set(pool["holdout"]) and pool["mine"]
    # Held back in whole 2 x 2 blocks.
    blocks = {grid.tile_key(grid.parent(grid.parse_tile_key(k), 17)) for k in pool["holdout"]}
    assert len(pool["holdout"]) == 4 * len(blocks)
    # A coarser tile stands for its children; a finer one is an error.
    parent = grid.tile_key(grid.parent(tiles[0], 17))
    assert complete_areas.listed_tiles([parent], 18) == {
        grid.tile_key(t) for t in grid.children(grid.parent(tiles[0], 17), 18)}
    with pytest.raises(complete_areas.CompleteAreaError, match="finer than the run's zoom 18"):
        complete_areas.listed_tiles(["z19_1_1"], 18)


def test_pool_from_geojson_areas_and_val_tiles_are_never_mined(tmp_path: Path) -> None:
    tiles = tiles_block(4)
    w, s, _, n = grid.tile_bounds(tiles[0])
    _, _, e, _ = grid.tile_bounds(tiles[1])
    # Covers the first two tiles of the top row and a sliver of the third.
    area = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
            "geometry": shapely.geometry.mapping(shapely.box(w, s, e + 1e-5, n))}]}
    (tmp_path / "complete.geojson").write_text(json.dumps(area))
    cfg = pool_config(tmp_path, complete_areas="complete.geojson", holdout_fraction=0.3)
    pool = mining_pool.select_pool(cfg, [])
    assert set(pool["mine"]) | set(pool["holdout"]) == {grid.tile_key(t) for t in tiles[:3]}
    partial = mining_pool.complete_area(cfg)
    assert trusted_pixels(partial, tiles[2], SIZE).mean() < 0.05
    # A val tile is not mined.
    from mapgap.tasks.shards import AtomicShardWriter, sample_dict

    val = storage.join(str(tmp_path), "val")
    with AtomicShardWriter(val, "val", 10, 1 << 20) as out:
        for k in pool["mine"]:
            out.write(sample_dict(k, b"x", "png", b"y", {}))
    with pytest.raises(mining_pool.MiningError, match="no tile left to mine"):
        mining_pool.select_pool(cfg, storage.glob(storage.join(val, "*.tar")))
    (tmp_path / "bad.geojson").write_text("not json")
    with pytest.raises(ConfigError, match="bad.geojson"):  # at load, before any stage
        pool_config(tmp_path, complete_areas="bad.geojson")


def test_pool_by_density_takes_the_well_mapped_tiles(tmp_path: Path) -> None:
    cfg = pool_config(tmp_path, density_percentile=50)
    pool = mining_pool.select_pool(cfg, [])
    # Feature count = column 0..3: the median is 1.5, so columns 2 and 3 qualify.
    cols = {grid.parse_tile_key(k).x - TILE.x for k in pool["mine"] + pool["holdout"]}
    assert cols == {2, 3}
    # Percentile 0 still never trusts a tile without any feature.
    zero = mining_pool.select_pool(pool_config(tmp_path, density_percentile=0), [])
    assert 0 not in {grid.parse_tile_key(k).x - TILE.x for k in zero["mine"] + zero["holdout"]}


@pytest.mark.parametrize(("areas", "message"), [
    (["z18_1_2", "z18_bad"], "not a tile key (expected z<z>_<x>_<y>): 'z18_bad'"),
    ([], "an empty tile list"),
    ("missing.geojson", "file not found"),
])
def test_bad_complete_areas_are_one_line_config_errors(tmp_path: Path, areas: Any,
                                                       message: str) -> None:
    with pytest.raises(ConfigError) as err:
        pool_config(tmp_path, complete_areas=areas)
    assert "labels.complete_areas" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_pool_too_small_to_hold_back_is_an_error(tmp_path: Path) -> None:
    cfg = pool_config(tmp_path, complete_areas=[grid.tile_key(TILE)])
    with pytest.raises(mining_pool.MiningError, match="at least 2 are needed"):
        mining_pool.select_pool(cfg, [])


def test_relative_gain_and_final_choice() -> None:
    assert mining.relative_gain(0.02, 0.01) == pytest.approx(0.5)
    assert mining.relative_gain(0.0, 0.0) == 0.0
    history = [{"round": 0, "val_iou": 0.70, "fp_rate": 0.03},
               {"round": 1, "val_iou": 0.69, "fp_rate": 0.02},
               {"round": 2, "val_iou": 0.60, "fp_rate": 0.01}]  # too much IoU lost
    assert mining.choose_final(history, 0.02)["round"] == 1
    # Object F1 guards too: fewer false positives never buy a worse model for mappers.
    history = [{"round": 0, "val_iou": 0.70, "val_object_f1": 0.60, "fp_rate": 0.03},
               {"round": 1, "val_iou": 0.71, "val_object_f1": 0.50, "fp_rate": 0.01},
               {"round": 2, "val_iou": 0.69, "val_object_f1": 0.61, "fp_rate": 0.02}]
    assert mining.choose_final(history, 0.02)["round"] == 2


def test_stop_rule() -> None:
    before = {"round": 0, "fp_rate": 0.020}
    assert mining.stop_reason(before, {"round": 1, "fp_rate": 0.015, "negatives_added": 3},
                              0.05) is None
    assert "improved the FP rate by 2.5%" in mining.stop_reason(
        before, {"round": 1, "fp_rate": 0.0195, "negatives_added": 3}, 0.05)
    assert "no mistake" in mining.stop_reason(
        before, {"round": 1, "fp_rate": 0.0, "negatives_added": 0}, 0.05)


def test_mining_needs_the_train_stage(tmp_path: Path) -> None:
    cfg = pool_config(tmp_path)
    with pytest.raises(mining_pool.MiningError, match=r"manifest.json: no shard manifest"):
        mining.trained_base(cfg)
    storage.write_json(RunLayout(cfg.run_uri).manifest, {"shards": []})
    with pytest.raises(mining_pool.MiningError, match=r"result.json: no finished training"):
        mining.trained_base(cfg)


# --- the demo town (slow) ---------------------------------------------------------------

# Small and fast, yet a model good enough that its mistakes are distractors rather than
# noise: GroupNorm (stable with 4-sample batches), whole epochs in one process
# (num_workers 0), 2 x 2 tile val blocks so ~20% of the 7 x 7 tiles are val.
FAST = {
    "pack": {"split_zoom_offset": 1},
    "train": {"architecture": "scratch", "epochs": 8, "steps_per_epoch": 25, "batch_size": 4,
              "crop_size": 128, "width": 8, "depth": 3, "norm": "group", "lr": 0.01,
              "num_workers": 0, "preview_samples": 0},
    "mining": {"rounds": 2, "min_gain": 0.0, "finetune_epochs": 4, "max_negatives": 32},
    "inference": {"loader_workers": 0, "batch_size": 4},
    "runner": {"kind": "thread", "workers": 1},
}


def withheld_footprints(scene: Any) -> list[shapely.Geometry]:
    """The buildings the demo town's OSM file leaves out: really missing from OSM."""
    features = json.loads(Path(scene.withheld).read_text())["features"]
    return [shapely.geometry.shape(f["geometry"]) for f in features]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    import hashlib

    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demo town trained, then mined twice: the first mining run fails at the
    start of round 2 (injected), the second resumes. Everything the tests read."""
    import os
    from types import SimpleNamespace

    import torch

    from mapgap.conf.mining import FAIL_ROUND_ENV
    from mapgap.conf.schema import deep_merge, load_config
    from mapgap.demo import DEMO_YAML, demo_overrides
    from mapgap.demo_scene import generate_scene
    from mapgap.flows.mine import mine_flow
    from mapgap.flows.pipeline import pipeline_flow
    from mapgap.orchestration import configured
    from mapgap.tileserver import TileServer

    threads = torch.get_num_threads()
    # Two cores shared with other work: one intra-op thread avoids oversubscription,
    # which makes small CPU training many times slower.
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("mining")
    scene = generate_scene(tmp / "scene", seed=0)
    try:
        with TileServer(scene.tiles_dir, "{z}/{x}/{y}.png") as server:
            overrides = deep_merge(demo_overrides(scene, server.url_template, tmp / "out"), FAST)
            cfg = load_config(DEMO_YAML, overrides)
            configured(pipeline_flow, cfg)(cfg, stages=["harvest", "fetch", "pack", "train"])
        round_1 = Path(RunLayout(cfg.run_uri).mining_round(1))
        os.environ[FAIL_ROUND_ENV] = "2"
        try:
            with pytest.raises(mining.InjectedFailure) as failure:
                configured(mine_flow, cfg)(cfg)
        finally:
            del os.environ[FAIL_ROUND_ENV]
        after_failure = snapshot(round_1)
        summary = configured(mine_flow, cfg)(cfg)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(cfg=cfg, scene=scene, summary=summary, failure=str(failure.value),
                           round_1=round_1, after_failure=after_failure)


def client_for(cfg: Any) -> Any:
    from mapgap import tracking

    return tracking.client(tracking.tracking_uri(cfg))


def by_step(c: Any, run_id: str, key: str) -> dict[int, float]:
    history = c.get_metric_history(run_id, key)
    assert len({m.step for m in history}) == len(history), f"{key} logged twice for a step"
    return {m.step: m.value for m in history}


@pytest.mark.slow
def test_two_rounds_cut_false_positives_without_losing_val_iou(mined: Any) -> None:
    c = client_for(mined.cfg)
    parent = c.get_run(mined.summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mapgap.stage"] == "mining"
    fp = by_step(c, parent.info.run_id, "mining/fp_pixels_per_tile")
    iou = by_step(c, parent.info.run_id, "mining/val_iou")
    assert sorted(fp) == sorted(iou) == [0, 1, 2]
    print(f"FP px per held-back tile {fp}, val IoU {iou}")
    # Measurably fewer false positives where OSM is complete, val IoU kept.
    assert fp[2] <= 0.9 * fp[0], fp
    assert iou[2] >= iou[0] - 0.02, iou
    base = mining.trained_base(mined.cfg)
    assert iou[0] == pytest.approx(base["val_metrics"]["val/iou"])

    # One child run per round: its fine-tune curves and the round's numbers.
    children = c.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))
    rounds = {int(r.data.tags[mining.ROUND_TAG]): r for r in children}
    assert sorted(rounds) == [1, 2]
    for k, run in rounds.items():
        m = run.data.metrics
        assert m["mining/fp_pixels_per_tile"] == pytest.approx(fp[k])
        assert m["mining/val_iou"] == pytest.approx(iou[k])
        assert m["mining/mistakes_found"] >= m["mining/negatives_added"] > 0
        assert m["mining/wall_time_s"] > 0 and 0 < m["mining/val_precision"] <= 1
        assert len(c.get_metric_history(run.info.run_id, "val/iou")) == 4  # finetune_epochs
        assert "mining/picks.json" in {a.path for a in c.list_artifacts(run.info.run_id,
                                                                         "mining")}
    assert by_step(c, parent.info.run_id, "mining/negatives_total")[2] == (
        rounds[1].data.metrics["mining/negatives_added"]
        + rounds[2].data.metrics["mining/negatives_added"])

    # The final model is registered; the Prefect UI shows the rounds.
    from prefect.artifacts import Artifact

    from mapgap.models.inference import load_model
    from mapgap.tracking import tracking_uri

    final = load_model(mined.summary["final_model_uri"], tracking_uri(mined.cfg))
    assert final.classes == ["building"] and mined.summary["final_round"] > 0
    # Mining chose it over the trained model (the champion): predict now uses it,
    # and no other round holds an alias.
    assert mined.summary["aliases"] == ["candidate", "champion"]
    name = parent.data.tags["mapgap.base_model"].split("/")[1]
    versions = {str(mv.version): c.get_model_version(name, mv.version).aliases
                for mv in c.search_model_versions(f"name='{name}'")}
    final_version = mined.summary["final_model_uri"].rsplit("/", 1)[1]
    assert {v for v, aliases in versions.items() if aliases} == {final_version}
    table = json.loads(Artifact.get("mining-rounds").data)
    assert [row["round"] for row in table] == [0, 1, 2]


@pytest.mark.slow
def test_a_rerun_after_a_failure_in_round_2_does_not_redo_round_1(mined: Any) -> None:
    assert "MAPGAP_FAIL_MINING_ROUND=2" in mined.failure
    rows = mined.summary["rounds"]
    assert [(r["round"], r["cached"]) for r in rows] == [(0, True), (1, True), (2, False)]
    # Round 1's shards, picks, checkpoint and result: the very same files.
    assert {"picks.json", "model.pt", "result.json"} <= set(mined.after_failure)
    assert any(name.startswith("shards/mined-r01-") for name in mined.after_failure)
    assert snapshot(mined.round_1) == mined.after_failure
    # No second parent run and no second round-1 fine-tune in MLflow.
    c = client_for(mined.cfg)
    exp = c.get_experiment_by_name(mined.cfg.name).experiment_id
    assert len(c.search_runs([exp], "tags.`mapgap.stage` = 'mining' and "
                                    "tags.`mapgap.mining_round` = '1'")) == 1
    parents = [r for r in c.search_runs([exp], "tags.`mapgap.stage` = 'mining'")
               if mining.ROUND_TAG not in r.data.tags]
    assert [p.info.run_id for p in parents] == [mined.summary["parent_run_id"]]


def window_owners(tile: grid.Tile, offset: tuple[int, int], size: int
                  ) -> list[tuple[grid.Tile, np.ndarray]]:
    """The tiles a mined window covers, each with the window pixels it supplies."""
    rows = np.floor_divide(np.arange(size) + offset[1], size)
    cols = np.floor_divide(np.arange(size) + offset[0], size)
    return [(grid.Tile(tile.x + dx, tile.y + dy, tile.z), (rows[:, None] == dy)
             & (cols[None, :] == dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def mined_samples(cfg: Any, rounds: list[int]) -> list[tuple[grid.Tile, np.ndarray, dict]]:
    from mapgap.tasks.shards import decode_sample
    from tests.test_pack import read_shards

    uris = [s for k in rounds for s in storage.read_json(storage.join(
        RunLayout(cfg.run_uri).mining_round(k), mining.PICKS_FILE))["shards"]]
    out = []
    for sample in read_shards(uris):
        _, mask, meta = decode_sample(sample)
        out.append((grid.parse_tile_key(sample["__key__"]), mask, meta))
    return out


@pytest.mark.slow
def test_real_missing_buildings_never_become_negatives(mined: Any) -> None:
    """Withheld buildings lie outside the complete areas: no pick touches one, and
    every negative's mask ignores them and every tile that is not mined."""
    import rasterio.features
    from affine import Affine

    cfg, size = mined.cfg, mined.cfg.tile_size
    withheld = withheld_footprints(mined.scene)
    tree = shapely.STRtree(withheld)
    pool = storage.read_json(RunLayout(cfg.run_uri).mining_pool)
    mined_tiles = set(pool["mine"])
    picks = [p for k in (1, 2) for p in storage.read_json(storage.join(
        RunLayout(cfg.run_uri).mining_round(k), mining.PICKS_FILE))["negatives"]]
    assert picks and {p["tile"] for p in picks} <= mined_tiles
    for p in picks:
        tile = grid.parse_tile_key(p["tile"])
        c0, r0, c1, r1 = p["mistake"]["bbox"]
        (w, n), (e, s) = (grid.pixel_to_lonlat(tile, size, c0, r0),
                          grid.pixel_to_lonlat(tile, size, c1, r1))
        assert not len(tree.query(shapely.box(w, s, e, n), predicate="intersects")), p
    withheld_3857 = [grid.reproject(g, grid.WGS84, grid.WEB_MERCATOR) for g in withheld]
    samples = mined_samples(cfg, [1, 2])
    assert len(samples) == len(picks)
    for tile, mask, meta in samples:
        dx, dy = meta["window_offset_px"]
        for owner, region in window_owners(tile, (dx, dy), size):
            if grid.tile_key(owner) not in mined_tiles:
                assert (mask[region] == IGNORE).all(), (tile, owner)
        transform = grid.tile_transform(tile, size) @ Affine.translation(dx, dy)
        inside = rasterio.features.rasterize(withheld_3857, out_shape=(size, size),
                                             transform=transform).astype(bool)
        assert (mask[inside] == IGNORE).all(), tile


@pytest.mark.slow
def test_tiles_outside_a_complete_tile_list_never_give_negatives(mined: Any,
                                                                 tmp_path: Path) -> None:
    import shutil

    src = Path(mined.cfg.run_uri)
    root = tmp_path / "out"
    shutil.copytree(src, root / "runs" / mined.cfg.name, ignore=shutil.ignore_patterns(
        "mining", "train", "prefect-results", "mlflow.db", "mlartifacts"))
    aoi = grid.tiles_for_geometry(mined.cfg.aoi_geometry, mined.cfg.zoom)
    west = min(t.x for t in aoi) + 3
    listed = sorted(grid.tile_key(t) for t in aoi if t.x < west)
    data = mined.cfg.model_dump(mode="json")
    data["storage"]["root"] = str(root)
    data["labels"]["complete_areas"] = listed
    cfg = type(mined.cfg).model_validate(data)

    base = mining.trained_base(mined.cfg)
    pool = mining_pool.write_pool(cfg, base["val_shards"])
    chosen = storage.read_json(pool["uri"])
    assert set(chosen["mine"]) | set(chosen["holdout"]) <= set(listed)
    previous = {"checkpoint": base["checkpoint"],
                "checkpoint_fingerprint": base["checkpoint_fingerprint"]}
    picks = mining.mine_negatives(cfg, 1, pool, previous, None)
    assert picks["negatives"] and {p["tile"] for p in picks["negatives"]} <= set(chosen["mine"])
    for tile, mask, meta in mined_samples(cfg, [1]):
        assert grid.tile_key(tile) in listed
        for owner, region in window_owners(tile, tuple(meta["window_offset_px"]),
                                           cfg.tile_size):
            if grid.tile_key(owner) not in chosen["mine"]:
                assert (mask[region] == IGNORE).all(), (tile, owner)
