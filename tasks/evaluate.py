"""Object-level and pixel-level evaluation.

Objects: one-to-one matching in descending *score* order (a confident
prediction claims its truth first, as in COCO; matching in file order, as some
tools do, makes the numbers depend on how the file was written). A pair
matches when IoU > threshold, IoU measured in metres (equal-area CRS).
Pixels: IoU of foreground between two rasters or two folders of z/x/y tiles.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from mapgap import storage
from mapgap.layout import RunLayout
from mapgap.tasks.geometry import metric_crs_for, polygonal, to_metric

RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".webp")


class EvaluationError(ValueError):
    """Unusable evaluation input (one line naming the file and the problem)."""


@dataclass
class Matches:
    pred: np.ndarray  # matched prediction indices, in matching order
    truth: np.ndarray  # their truth indices
    iou: np.ndarray


def match_objects(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                  iou: float) -> Matches:
    """Greedy one-to-one matching: predictions by descending score each take the
    unmatched truth with the highest IoU above ``iou`` (metric geometries)."""
    if not len(pred) or not len(truth):
        return Matches(np.empty(0, int), np.empty(0, int), np.empty(0))
    pi, ti = shapely.STRtree(truth).query(pred, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred[pi], truth[ti]))
    union = shapely.area(pred)[pi] + shapely.area(truth)[ti] - inter
    ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    ok = ious > iou
    pi, ti, ious = pi[ok], ti[ok], ious[ok]
    rank = np.empty(len(pred), int)
    rank[np.argsort(-np.asarray(scores, float), kind="stable")] = np.arange(len(pred))
    order = np.lexsort((-ious, rank[pi]))
    pred_done = np.zeros(len(pred), bool)
    truth_done = np.zeros(len(truth), bool)
    out_p, out_t, out_iou = [], [], []
    for k in order:
        p, t = pi[k], ti[k]
        if pred_done[p] or truth_done[t]:
            continue
        pred_done[p] = truth_done[t] = True
        out_p.append(p)
        out_t.append(t)
        out_iou.append(ious[k])
    return Matches(np.array(out_p, int), np.array(out_t, int), np.array(out_iou))


def object_metrics(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                   iou: float = 0.5) -> dict[str, Any]:
    """Precision, recall, F1 of lon/lat polygons (None where undefined: 0/0)."""
    crs = metric_crs_for(pred, truth)
    m = match_objects(to_metric(pred, crs), scores, to_metric(truth, crs), iou)
    tp = len(m.pred)
    fp, fn = len(pred) - tp, len(truth) - tp
    return {
        "iou_threshold": iou, "predictions": len(pred), "truth": len(truth),
        "tp": tp, "fp": fp, "fn": fn,
        "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mean_matched_iou": round(float(m.iou.mean()), 4) if tp else None,
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


# --- files ---------------------------------------------------------------------------------

def read_polygons(path: Path | str) -> tuple[np.ndarray, np.ndarray | None]:
    """(lon/lat polygons, scores or None) of a vector file (GeoJSON, GPKG, ...)."""
    import geopandas as gpd

    path = str(path)  # a local path or a URI (a run dir on S3)
    try:
        with storage.local_file(path) as local:
            frame = gpd.read_file(local)
    except storage.StorageError:
        raise EvaluationError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - GDAL raises many types; one line names the file
        raise EvaluationError(f"{path}: not a readable vector file ({str(err)[:160]})") from None
    if frame.crs is not None and not frame.crs.equals("EPSG:4326"):
        frame = frame.to_crs("EPSG:4326")
    geoms = np.asarray(frame.geometry.values, dtype=object)
    keep = np.isin(shapely.get_type_id(geoms), (3, 6))  # polygons, multipolygons
    if len(geoms) and not keep.any():
        raise EvaluationError(f"{path}: no polygon features (found "
                              f"{sorted(set(shapely.get_type_id(geoms).tolist()))} type ids)")
    scores = None
    if "score" in frame.columns:
        scores = frame["score"].to_numpy(dtype=float, na_value=0.0)[keep]
    return polygonal(geoms[keep]), scores


def evaluate_vectors(pred: Path | str, truth: Path | str, iou: float = 0.5) -> dict[str, Any]:
    pred_geoms, scores = read_polygons(pred)
    truth_geoms, _ = read_polygons(truth)
    result = object_metrics(pred_geoms, np.ones(len(pred_geoms)) if scores is None else scores,
                            truth_geoms, iou)
    result["matched_in"] = "file order (no 'score' property)" if scores is None else "score order"
    return result


def _foreground(arr: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, valid) pixels: predictions are probabilities (>= half scale),
    truth masks are class indices with 255 = ignore."""
    if kind == "pred":
        half = 127.5 if arr.dtype == np.uint8 else 0.5
        return arr >= half, np.ones(arr.shape, bool)
    return (arr > 0) & (arr != 255), arr != 255


def _read_band(path: Path) -> np.ndarray:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with warnings.catch_warnings():  # plain PNG masks have no georeference: fine here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.read(1)
    except RasterioIOError as err:
        raise EvaluationError(f"{path}: not a readable raster ({str(err)[:160]})") from None


def _raster_pairs(pred: Path, truth: Path) -> list[tuple[Path, Path]]:
    if pred.is_file() and truth.is_file():
        return [(pred, truth)]
    pairs = [(p, truth / p.relative_to(pred)) for p in sorted(pred.rglob("*.png"))]
    pairs = [(p, t) for p, t in pairs if t.is_file()]
    if not pairs:
        raise EvaluationError(f"{pred}: no z/x/y tile also present under {truth}")
    return pairs


def evaluate_rasters(pred: Path | str, truth: Path | str) -> dict[str, Any]:
    """Pixel IoU / precision / recall of two rasters or two z/x/y tile folders."""
    tp = fp = fn = 0
    pairs = _raster_pairs(Path(pred), Path(truth))
    for p, t in pairs:
        a, b = _read_band(p), _read_band(t)
        if a.shape != b.shape:
            raise EvaluationError(f"{p}: {a.shape} px but {t} is {b.shape} px")
        (fa, _), (fb, valid) = _foreground(a, "pred"), _foreground(b, "truth")
        tp += int((fa & fb & valid).sum())
        fp += int((fa & ~fb & valid).sum())
        fn += int((~fa & fb & valid).sum())
    return {"rasters": len(pairs), "pixel_iou": _ratio(tp, tp + fp + fn),
            "pixel_precision": _ratio(tp, tp + fp), "pixel_recall": _ratio(tp, tp + fn)}


def evaluate_files(pred: Path, truth: Path, iou: float = 0.5) -> dict[str, Any]:
    """Vector files -> object metrics; rasters or tile folders -> pixel metrics."""
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise EvaluationError(f"{p}: no such file")
    if not 0 <= iou < 1:
        raise EvaluationError(f"--iou: must be in [0, 1), got {iou}")
    rasters = [p.is_dir() or p.suffix.lower() in RASTER_SUFFIXES for p in (pred, truth)]
    if all(rasters):
        return evaluate_rasters(pred, truth)
    if any(rasters):
        raise EvaluationError(f"{pred} and {truth}: give two vector files or two rasters")
    return evaluate_vectors(pred, truth, iou)


def evaluate_run(run_uri: str, truth: Path, withheld: Path | None = None,
                 iou: float = 0.5) -> dict[str, Any]:
    """The demo's closing numbers: predictions vs the full truth and, when OSM had
    buildings withheld, candidates vs those (how well missing buildings are found)."""
    layout = RunLayout(run_uri)
    out = {"predictions_vs_truth": evaluate_vectors(layout.predictions, truth, iou)}
    if withheld is not None:
        out["candidates_vs_withheld"] = evaluate_vectors(
            layout.output("candidates.geojson"), withheld, iou)
    return out
