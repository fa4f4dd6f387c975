"""Dedup against OSM: the five classic cases, the reverse direction, the quality
grid, and the flow's errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from mapgap import storage
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.tasks.dedup import DedupError, dedup, dedup_class, tile_indices
from mapgap.tasks.geometry import read_geojson, write_geojson
from mapgap.tasks.predict import encode_probability
from tests.helpers_inference import ORIGIN, SIZE, Z, make_config, tile_lonlat, write_labels

IOU, OVERLAP, SUPPORT = 0.3, 0.5, 0.2


def run(preds: list, osm: list):
    return dedup(np.array(preds, dtype=object), np.array(osm, dtype=object), IOU, OVERLAP,
                 SUPPORT)


B = shapely.box


def test_exact_match_is_not_a_candidate() -> None:
    r = run([B(0, 0, 10, 10)], [B(0, 0, 10, 10)])
    assert r.candidates.tolist() == [] and r.unsupported.tolist() == []
    assert r.pred_cover.iou[0] == pytest.approx(1.0)


def test_shifted_match_depends_on_the_overlap() -> None:
    near = run([B(3, 0, 13, 10)], [B(0, 0, 10, 10)])  # IoU 70/130 = 0.54
    assert near.candidates.tolist() == []
    far = run([B(8, 0, 18, 10)], [B(0, 0, 10, 10)])  # IoU 20/180 = 0.11, covered 0.2
    assert far.candidates.tolist() == [0]
    assert far.pred_cover.iou[0] == pytest.approx(20 / 180)
    assert far.unsupported.tolist() == []  # 20% of the OSM feature is predicted: supported


def test_small_prediction_inside_big_osm_polygon_is_not_new() -> None:
    """IoU alone (0.01) would call it new; it is wholly covered by OSM."""
    r = run([B(10, 10, 15, 15)], [B(0, 0, 50, 50)])
    assert r.pred_cover.iou[0] == pytest.approx(25 / 2500)
    assert r.pred_cover.covered[0] == pytest.approx(1.0)
    assert r.candidates.tolist() == []
    assert r.unsupported.tolist() == [0]  # 1% of the big OSM polygon is predicted


def test_partial_overlap_uses_both_thresholds() -> None:
    # IoU 40/160 = 0.25 < 0.3 and covered 0.4 < 0.5: new
    assert run([B(0, 0, 10, 10)], [B(6, 0, 16, 10)]).candidates.tolist() == [0]
    # IoU 0.25 < 0.3 but 60% covered (OSM is bigger): not new
    r = run([B(0, 0, 10, 10)], [B(4, -10, 24, 20)])
    assert r.pred_cover.iou[0] < IOU and r.pred_cover.covered[0] == pytest.approx(0.6)
    assert r.candidates.tolist() == []


def test_nothing_nearby_is_new_and_lonely_osm_is_unsupported() -> None:
    r = run([B(0, 0, 10, 10), B(100, 0, 110, 10)], [B(0, 0, 10, 10), B(0, 100, 10, 110)])
    assert r.candidates.tolist() == [1]
    assert r.pred_cover.iou[1] == 0 and r.pred_cover.covered[1] == 0
    assert r.unsupported.tolist() == [1]


def test_iou_is_against_the_union_of_touched_osm() -> None:
    """One blob over four mapped houses: each house alone has IoU 0.25, their union 1."""
    quarters = [B(0, 0, 5, 5), B(5, 0, 10, 5), B(0, 5, 5, 10), B(5, 5, 10, 10)]
    r = run([B(0, 0, 10, 10)], quarters)
    assert r.pred_cover.iou[0] == pytest.approx(1.0)
    assert r.candidates.tolist() == [] and r.unsupported.tolist() == []


def test_tile_indices_match_mercantile() -> None:
    import mercantile

    pts = shapely.points([(32.58, 0.34), (-73.99, 40.75), (139.7, -35.6)])
    xs, ys = tile_indices(pts, 17)
    for p, x, y in zip(pts, xs, ys, strict=True):
        assert mercantile.tile(p.x, p.y, 17)[:2] == (x, y)


def _lonlat_box(c0: float, r0: float, c1: float, r1: float) -> shapely.Polygon:
    """A box in pixel units of the 2x1-tile mosaic at ORIGIN."""
    w, n = tile_lonlat(ORIGIN.x + c0 / SIZE, ORIGIN.y + r0 / SIZE)
    e, s = tile_lonlat(ORIGIN.x + c1 / SIZE, ORIGIN.y + r1 / SIZE)
    return shapely.box(w, s, e, n)


@pytest.fixture()
def scene(tmp_path):
    """Two predicted tiles. Tile A: a house in OSM and predicted, plus a new one.
    Tile B: an OSM house nobody predicted. A third OSM house lies outside the
    predicted tiles and must be ignored."""
    cfg = make_config(tmp_path, cols=2, rows=1)
    layout = RunLayout(cfg.run_uri)
    for c in range(2):
        t = Tile(ORIGIN.x + c, ORIGIN.y, Z)
        storage.write_bytes(layout.probability(t), encode_probability(np.zeros((1, 8, 8),
                                                                               np.uint8)))
    mapped = _lonlat_box(20, 20, 60, 60)
    new = _lonlat_box(100, 100, 140, 130)
    write_geojson(layout.predictions, [mapped, new], [
        {"class": "building", "score": 0.9, "area_m2": 1.0, "tiles": ["a"]},
        {"class": "building", "score": 0.8, "area_m2": 1.0, "tiles": ["a"]}])
    write_labels(layout, [_lonlat_box(22, 20, 60, 60), _lonlat_box(300, 50, 340, 90),
                          _lonlat_box(600, 50, 640, 90)])
    return cfg, layout


def test_dedup_class_writes_candidates_unsupported_and_grid(scene) -> None:
    cfg, layout = scene
    s = dedup_class(layout, "building", cfg.dedup, cfg.zoom)
    assert (s["predictions"], s["osm"], s["osm_outside_predicted_tiles"]) == (2, 2, 1)
    assert (s["candidates"], s["unsupported"]) == (1, 1)
    geoms, props = read_geojson(s["parts"]["candidates"])
    assert props[0]["score"] == 0.8 and props[0]["iou"] == 0.0
    _, uns = read_geojson(s["parts"]["unsupported"])
    assert uns[0]["osm_id"] == 2 and uns[0]["tags"] == {"building": "yes"}
    _, grid = read_geojson(s["parts"]["grid"])
    a, b = sorted(grid, key=lambda g: g["tile"])
    # Tile A: OSM 38x40 px inside the predicted 40x40 px house + a 40x30 px new one.
    assert a["iou"] == pytest.approx(38 * 40 / (40 * 40 + 40 * 30), abs=2e-3)
    assert (a["osm"], a["predicted"], a["candidates"], a["unsupported"]) == (1, 2, 1, 0)
    assert b["iou"] == 0.0 and (b["osm"], b["predicted"], b["unsupported"]) == (1, 0, 1)
    m = s["metrics"]
    assert m["osm_objects_vs_predictions"]["tp"] == 1
    assert m["area_iou"] == pytest.approx(38 * 40 / (40 * 40 + 40 * 30 + 40 * 40), abs=2e-3)


def test_dedup_flow_rejects_missing_and_empty_predictions(tmp_path) -> None:
    from mapgap.flows.dedup import dedup_flow
    from mapgap.orchestration import configured

    cfg = make_config(tmp_path)
    layout = RunLayout(cfg.run_uri)
    with pytest.raises(DedupError, match=r"predictions.geojson: no such file \(run mapgap predict"):
        configured(dedup_flow, cfg)(cfg)
    write_geojson(layout.predictions, [], [])
    with pytest.raises(DedupError, match=r"predictions.geojson: no predicted polygon"):
        configured(dedup_flow, cfg)(cfg)


def test_missing_labels_is_a_clear_error(scene) -> None:
    cfg, layout = scene
    storage.remove(layout.labels("building"))
    with pytest.raises(DedupError, match=r"building.parquet: no OSM labels .*mapgap harvest"):
        dedup_class(layout, "building", cfg.dedup, cfg.zoom)


def test_dedup_compares_with_the_aligned_osm_while_it_is_current(scene) -> None:
    """With labels.align on, dedup reads the shifted copy of the OSM labels, but only
    while it was made from the labels harvested now (their sha256)."""
    import hashlib

    from mapgap.tasks.aligned_labels import aligned_summary_uri, label_uri
    from mapgap.tasks.alignment import aligned_labels_uri

    cfg, layout = scene
    harvested = layout.labels("building")
    sha = hashlib.sha256(storage.read_bytes(harvested)).hexdigest()
    storage.write_json(layout.labels_summary,
                       {"classes": {"building": {"uri": harvested, "sha256": sha}}})
    # The copy moved the mapped house off the predicted one: it becomes a candidate.
    original = storage.read_bytes(harvested)
    write_labels(layout, [_lonlat_box(150, 150, 190, 190), _lonlat_box(300, 50, 340, 90)])
    aligned = aligned_labels_uri(layout, "building")
    storage.write_bytes(aligned, storage.read_bytes(harvested))
    storage.write_bytes(harvested, original)
    entry = {"uri": aligned, "sha256": "x", "source_sha256": sha}
    storage.write_json(aligned_summary_uri(layout), {"building": entry})

    assert label_uri(layout, "building", aligned=False) == harvested
    assert label_uri(layout, "building", aligned=True) == aligned
    s = dedup_class(layout, "building", cfg.dedup, cfg.zoom, aligned)
    assert (s["candidates"], s["unsupported"]) == (2, 2)
    storage.write_json(aligned_summary_uri(layout), {"building": {**entry,
                                                                  "source_sha256": "old"}})
    assert label_uri(layout, "building", aligned=True) == harvested  # stale: not used
