"""Evaluation against hand-computed TP/FP/FN, score-order matching, pixel IoU, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from typer.testing import CliRunner

from mapgap.cli import app
from mapgap.layout import RunLayout
from mapgap.tasks.evaluate import EvaluationError, evaluate_files, evaluate_run
from mapgap.tasks.geometry import write_geojson

U = 1e-4  # fixture unit in degrees (~11 m) near Kampala
LON, LAT = 32.58, 0.34


def box(x0: float, y0: float, x1: float, y1: float) -> shapely.Polygon:
    return shapely.box(LON + x0 * U, LAT + y0 * U, LON + x1 * U, LAT + y1 * U)


def write(path: Path, boxes: list[shapely.Polygon], scores: list[float] | None = None) -> Path:
    props = [{"score": s} for s in scores] if scores else [{} for _ in boxes]
    write_geojson(str(path), boxes, props)
    return path


@pytest.fixture()
def truth(tmp_path) -> Path:
    return write(tmp_path / "truth.geojson",
                 [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10), box(60, 0, 70, 10)])


def test_hand_computed_counts(tmp_path, truth) -> None:
    pred = write(tmp_path / "pred.geojson", [
        box(0, 0, 10, 10),    # exact T1: TP
        box(22, 0, 32, 10),   # T2 at IoU 80/120 = 0.67: TP
        box(20, 0, 30, 10),   # exact T2 but lower score, T2 already taken: FP
        box(45, 0, 55, 10),   # T3 at IoU 50/150 = 0.33: FP (T3 stays FN)
        box(100, 0, 110, 10),  # nothing there: FP
    ], scores=[0.9, 0.8, 0.3, 0.7, 0.6])
    r = evaluate_files(pred, truth, iou=0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 3, 2)
    assert r["precision"] == 0.4 and r["recall"] == 0.5
    assert r["f1"] == pytest.approx(4 / 9, abs=1e-4)
    assert r["mean_matched_iou"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-3)
    assert r["matched_in"] == "score order"
    loose = evaluate_files(pred, truth, iou=0.3)
    assert (loose["tp"], loose["fp"], loose["fn"]) == (3, 2, 1)


def test_matching_follows_score_not_file_order(tmp_path) -> None:
    """P_a (IoU 0.47 with Tx, 0.39 with Ty) is more confident than P_b (0.9 with Tx):
    in score order P_a claims Tx and P_b is left over; in file order (no scores,
    P_b first) both match."""
    t = write(tmp_path / "t.geojson", [box(0, 0, 10, 10), box(10, 0, 20, 10)])
    pa, pb = box(2, 0, 17, 10), box(0, 0, 9, 10)
    scored = evaluate_files(write(tmp_path / "s.geojson", [pb, pa], [0.1, 0.9]), t, iou=0.3)
    assert (scored["tp"], scored["fp"], scored["fn"]) == (1, 1, 1)
    unscored = evaluate_files(write(tmp_path / "u.geojson", [pb, pa]), t, iou=0.3)
    assert (unscored["tp"], unscored["fp"], unscored["fn"]) == (2, 0, 0)
    assert unscored["matched_in"].startswith("file order")


def test_empty_predictions_have_undefined_precision(tmp_path, truth) -> None:
    r = evaluate_files(write(tmp_path / "empty.geojson", []), truth)
    assert (r["tp"], r["fp"], r["fn"], r["precision"], r["recall"], r["f1"]) == (
        0, 0, 4, None, 0.0, 0.0)


def test_bad_inputs_are_one_line_errors(tmp_path, truth) -> None:
    with pytest.raises(EvaluationError, match=r"nope.geojson: no such file"):
        evaluate_files(tmp_path / "nope.geojson", truth)
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(EvaluationError, match=r"bad.geojson: not a readable vector file"):
        evaluate_files(bad, truth)
    points = tmp_path / "points.geojson"
    write_geojson(str(points), [shapely.Point(LON, LAT)], [{}])
    with pytest.raises(EvaluationError, match=r"points.geojson: no polygon features"):
        evaluate_files(points, truth)
    with pytest.raises(EvaluationError, match="two vector files or two rasters"):
        evaluate_files(truth, _png(tmp_path / "m.png", np.zeros((4, 4), np.uint8)))


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), arr)
    return path


def test_pixel_iou_of_rasters_and_tile_folders(tmp_path) -> None:
    pred = np.zeros((4, 4), np.uint8)
    pred[:2, :] = 200  # 8 foreground pixels (>= half of 255)
    pred[3, 3] = 100   # below half: background
    truth = np.zeros((4, 4), np.uint8)
    truth[1:3, :] = 1  # 8 foreground pixels, 4 shared with pred
    truth[0, 0] = 255  # ignored: neither FP nor TP
    r = evaluate_files(_png(tmp_path / "p.png", pred), _png(tmp_path / "t.png", truth))
    # TP 4, FP 3 (row 0 minus the ignored pixel), FN 4 -> IoU 4/11
    assert r["pixel_iou"] == pytest.approx(4 / 11, abs=1e-4)
    assert r["pixel_precision"] == pytest.approx(4 / 7, abs=1e-4)
    assert r["pixel_recall"] == 0.5
    _png(tmp_path / "probs/18/1/2.png", pred)
    _png(tmp_path / "masks/18/1/2.png", truth)
    _png(tmp_path / "masks/18/1/3.png", truth)  # no prediction for it: not compared
    d = evaluate_files(tmp_path / "probs", tmp_path / "masks")
    assert d["rasters"] == 1 and d["pixel_iou"] == r["pixel_iou"]


def test_cli_prints_json_and_fails_cleanly(tmp_path, truth) -> None:
    pred = write(tmp_path / "pred.geojson", [box(0, 0, 10, 10)], [1.0])
    out = CliRunner().invoke(app, ["evaluate", "--pred", str(pred), "--truth", str(truth),
                                   "--iou", "0.5"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["tp"] == 1
    bad = CliRunner().invoke(app, ["evaluate", "--pred", str(tmp_path / "x.geojson"),
                                   "--truth", str(truth)])
    assert bad.exit_code == 2 and "x.geojson: no such file" in bad.output


def test_evaluate_run_scores_candidates_against_withheld(tmp_path, truth) -> None:
    layout = RunLayout(str(tmp_path / "run"))
    write(Path(layout.predictions), [box(0, 0, 10, 10), box(20, 0, 30, 10)], [0.9, 0.8])
    write(Path(layout.output("candidates.geojson")), [box(20, 0, 30, 10)], [0.8])
    withheld = write(tmp_path / "withheld.geojson", [box(20, 0, 30, 10)])
    r = evaluate_run(layout.root, truth, withheld)
    assert r["predictions_vs_truth"]["recall"] == 0.5
    assert r["candidates_vs_withheld"]["precision"] == 1.0
    assert r["candidates_vs_withheld"]["recall"] == 1.0
