"""Object-level validation: choose models by what mappers get, and say how far to
trust each polygon.

Pixel IoU rewards blobs; a mapper needs one polygon per building. So the val
tiles are predicted with the run's imagery as context (into a scratch dir, never
the run's ``predict/``), vectorized exactly as the predict stage does (per-tile
pieces, cross-tile merge, finishing), clipped to the val area like the truth, and
matched one-to-one with the harvested OSM labels by :mod:`mapgap.tasks.evaluate`.

- :class:`ObjectF1Callback` logs ``val/object_f1`` each validation epoch, so the
  checkpoint kept is the one with the best objects, not the best pixels.
- :func:`calibrate` picks the threshold and minimum area that maximise val object
  F1 and builds a confidence table: for a polygon of score ``s``, the val
  precision of the polygons scoring at least ``s`` (made monotone). A mapper can
  then read "80 % of polygons this confident were real buildings".

Probabilities are computed once per call; every threshold / minimum area is
vectorized from the same PNGs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import lightning as L
import numpy as np
import shapely
import torch
from lightning.pytorch.callbacks import Callback
from shapely.geometry.base import BaseGeometry
from torch import nn

from mapgap import storage
from mapgap.conf.schema import PipelineConfig
from mapgap.grid import Tile, tile_bounds
from mapgap.layout import RunLayout
from mapgap.tasks.evaluate import match_objects, object_metrics
from mapgap.tasks.geometry import metric_crs_for, polygonal, to_metric
from mapgap.tasks.labels import read_labels
from mapgap.tasks.predict import PredictSettings, predict_tiles
from mapgap.tasks.vectorize import VectorSettings, finish, merge_border_pieces, vectorize_tiles

THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.3 .. 0.7
AREA_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0)  # x the configured minimum area
TABLE_KNOTS = 32


class ObjectValError(ValueError):
    """Unusable object-validation input (one line naming the file or field)."""


@dataclass(frozen=True)
class Objects:
    """Predicted polygons of one class (lon/lat, clipped to the val area)."""

    geoms: np.ndarray
    scores: np.ndarray  # mean probability of the polygon's pixels, 0..1
    areas_m2: np.ndarray  # before clipping: what ``min_area_m2`` is compared with

    def at_least(self, min_area_m2: float) -> Objects:
        """The polygons a larger minimum area keeps (finishing does not depend on it)."""
        keep = self.areas_m2 >= min_area_m2
        return Objects(self.geoms[keep], self.scores[keep], self.areas_m2[keep])


# --- the val area and its truth ------------------------------------------------------------

def val_area(tiles: Sequence[Tile]) -> BaseGeometry:
    """Union of the tiles' lon/lat footprints."""
    return shapely.union_all([shapely.box(*tile_bounds(t)) for t in tiles])


def clip_to(geoms: np.ndarray, area: BaseGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(polygons cut to ``area``, which ones were cut); parts reduced to lines or
    points by the cut are dropped (left empty)."""
    geoms = np.asarray(geoms, dtype=object)
    shapely.prepare(area)
    cut = ~shapely.covered_by(geoms, area)
    out = geoms.copy()
    if cut.any():
        pieces = shapely.intersection(geoms[cut], area)
        mixed = shapely.get_type_id(pieces) == 7  # collections: polygons with slivers of line
        pieces[mixed] = shapely.buffer(pieces[mixed], 0)
        out[cut] = pieces
    return out, cut


def val_truth(layout: RunLayout, classes: Sequence[str], tiles: Sequence[Tile],
              min_area_m2: float = 0.0) -> dict[str, np.ndarray]:
    """The harvested labels of each class clipped to the val tiles (lon/lat).

    A label cut by the val-area edge keeps only its inside part; parts smaller
    than ``min_area_m2`` (pass the vectorize minimum) are dropped, because the
    prediction of that same sliver is dropped by the minimum area too.
    """
    area = val_area(tiles)
    out = {}
    for name in classes:
        uri = layout.labels(name)
        if not storage.exists(uri):
            raise ObjectValError(f"{uri}: no harvested labels for class {name!r} "
                                 "(run mapgap harvest first)")
        frame = read_labels(uri, bbox=area.bounds)
        geoms, cut = clip_to(polygonal(np.asarray(frame.geometry.values, dtype=object)), area)
        m2 = shapely.area(to_metric(geoms, metric_crs_for(geoms)))
        out[name] = geoms[(m2 > 0) & ~(cut & (m2 < min_area_m2))]
    return out


# --- predicted objects ---------------------------------------------------------------------

def vectorize_objects(probs: RunLayout, tiles: Sequence[Tile], v: VectorSettings,
                      area: BaseGeometry) -> dict[str, Objects]:
    """The predict stage's polygons of ``tiles`` (whose PNGs are in ``probs``): interior
    pieces finished per tile, border pieces merged across tiles then finished."""
    interior, border = vectorize_tiles(probs, list(tiles), v)
    out = {}
    for name in v.classes:
        (inner, inner_props), (merged, merged_props) = (
            finish(interior[name], name, v), finish(merge_border_pieces(border[name]), name, v))
        geoms, _ = clip_to(np.concatenate([inner, merged]), area)
        props = inner_props + merged_props
        keep = ~shapely.is_empty(geoms)
        out[name] = Objects(geoms[keep], np.array([p["score"] for p in props], float)[keep],
                            np.array([p["area_m2"] for p in props], float)[keep])
    return out


def predict_objects(layout: RunLayout, tiles: Sequence[Tile], model: nn.Module,
                    vectors: Sequence[VectorSettings],
                    s: PredictSettings) -> list[dict[str, Objects]]:
    """Predict ``tiles`` once (imagery and context from ``layout``, PNGs into a scratch
    dir) and vectorize them with each of ``vectors``: one {class: Objects} per entry."""
    area = val_area(tiles)
    with tempfile.TemporaryDirectory(prefix="mapgap-objectval-") as tmp:
        scratch = RunLayout(tmp)
        predict_tiles(layout, list(tiles), model, s, out=scratch)
        return [vectorize_objects(scratch, tiles, v, area) for v in vectors]


# --- scores --------------------------------------------------------------------------------

def object_scores(pred: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray],
                  truth: Mapping[str, np.ndarray], iou: float = 0.5) -> dict[str, dict[str, Any]]:
    """Per class: :func:`~mapgap.tasks.evaluate.object_metrics` (precision, recall,
    f1, tp, fp, fn; None where 0/0) of lon/lat predictions against the truth."""
    empty = np.empty(0, dtype=object)
    return {c: object_metrics(pred.get(c, empty), scores.get(c, np.empty(0)),
                              truth.get(c, empty), iou)
            for c in dict.fromkeys([*truth, *pred])}


def score_objects(objects: Mapping[str, Objects], truth: Mapping[str, np.ndarray],
                  iou: float = 0.5) -> dict[str, dict[str, Any]]:
    return object_scores({c: o.geoms for c, o in objects.items()},
                         {c: o.scores for c, o in objects.items()}, truth, iou)


def mean_scores(per_class: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean f1 / precision / recall over the classes with any truth or prediction;
    an undefined value (nothing predicted, nothing to find) counts 0, so a model
    that predicts nothing is never chosen for it."""
    live = [m for m in per_class.values() if m["truth"] or m["predictions"]]
    return {k: float(np.mean([m[k] or 0.0 for m in live])) if live else 0.0
            for k in ("f1", "precision", "recall")}


def matched(objects: Objects, truth: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Which predictions the one-to-one matching pairs with a truth object."""
    crs = metric_crs_for(objects.geoms, truth)
    m = match_objects(to_metric(objects.geoms, crs), objects.scores, to_metric(truth, crs), iou)
    hits = np.zeros(len(objects.geoms), bool)
    hits[m.pred] = True
    return hits


# --- calibration ---------------------------------------------------------------------------

Table = tuple[tuple[float, float], ...]  # (score, confidence), score ascending


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [weighted sum, weight, length]
    for yi, wi in zip(y, w, strict=True):
        blocks.append([yi * wi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, wt, n = blocks.pop()
            blocks[-1] = [blocks[-1][0] + s, blocks[-1][1] + wt, blocks[-1][2] + n]
    return np.concatenate([np.full(int(n), s / wt) for s, wt, n in blocks])


def confidence_table(scores: np.ndarray, hits: np.ndarray, knots: int = TABLE_KNOTS) -> Table:
    """Knots (s, precision of the predictions scoring >= s), at most ``knots`` of them
    spread evenly by rank, the precision made non-decreasing in s (isotonic, each
    knot weighted by how many predictions its precision counts)."""
    scores, hits = np.asarray(scores, float), np.asarray(hits, bool)
    if not len(scores):
        return ()
    order = np.argsort(-scores, kind="stable")
    s, h = scores[order], hits[order]
    precision = np.cumsum(h) / np.arange(1, len(s) + 1)
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last rank of each distinct score
    if len(ends) > knots:
        ends = ends[np.unique(np.linspace(0, len(ends) - 1, knots).round().astype(int))]
    fitted = _isotonic(precision[ends][::-1], (ends + 1)[::-1].astype(float))
    return tuple((round(float(a), 4), round(float(b), 4))
                 for a, b in zip(s[ends][::-1], fitted, strict=True))


def confidence(score: float, table: Table) -> float:
    """Calibrated confidence 0..1 of a polygon's score: linear between the knots,
    the end values beyond them (0 with an empty table); non-decreasing in score."""
    if not table:
        return 0.0
    xs, ys = zip(*table, strict=True)
    return float(np.interp(score, xs, ys))


@dataclass(frozen=True)
class Calibration:
    """Vectorize settings chosen on val, their val object metrics and the
    confidence table (stored with the registered model)."""

    threshold: float
    min_area_m2: float
    table: Table
    object_f1: float
    precision: float
    recall: float

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_area_m2": self.min_area_m2,
                "table": [list(k) for k in self.table], "object_f1": self.object_f1,
                "precision": self.precision, "recall": self.recall}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration") -> Calibration:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ObjectValError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            table = tuple((float(s), float(c)) for s, c in data["table"])
            values = {n: float(data[n]) for n in names if n != "table"}
        except (TypeError, ValueError):
            raise ObjectValError(f"{source}: table must be [[score, confidence], ...] and the "
                                 "other fields numbers") from None
        return cls(table=table, **values)

    def confidence(self, score: float) -> float:
        return confidence(score, self.table)

    def apply(self, v: VectorSettings, threshold: bool = True,
              min_area: bool = True) -> VectorSettings:
        """``v`` with the confidence table, and the calibrated threshold and minimum
        area unless told to keep ``v``'s."""
        return replace(v, threshold=self.threshold if threshold else v.threshold,
                       min_area_m2=self.min_area_m2 if min_area else v.min_area_m2,
                       confidence=self.table)


def vector_settings(cfg: PipelineConfig, classes: list[str], bands: list[str] | None = None,
                    calibration: Mapping[str, Any] | None = None) -> VectorSettings:
    """The settings predict vectorizes with: the config, the PNGs' ``bands`` (the
    distance band, if any) and the model's stored calibration, whose threshold and
    minimum area apply where the config leaves them unset (None)."""
    v = VectorSettings.from_config(cfg, classes, bands)
    if calibration is None:
        return v
    inf = cfg.inference
    return Calibration.from_dict(calibration, "model calibration").apply(
        v, threshold=inf.threshold is None, min_area=inf.min_area_m2 is None)


def min_areas(base_m2: float, factors: Sequence[float] = AREA_FACTORS) -> list[float]:
    return sorted({round(base_m2 * f, 3) for f in factors})


def calibrate(layout: RunLayout, tiles: Sequence[Tile], model: nn.Module,
              truth: Mapping[str, np.ndarray], vector: VectorSettings, s: PredictSettings, *,
              thresholds: Sequence[float] = THRESHOLDS,
              area_factors: Sequence[float] = AREA_FACTORS, iou: float = 0.5,
              knots: int = TABLE_KNOTS) -> Calibration:
    """The (threshold, min area) of the grids with the best mean val object F1 (ties:
    the threshold nearest the configured one, then the smaller area), and the
    confidence table of the polygons those settings make (all classes pooled)."""
    areas = min_areas(vector.min_area_m2, area_factors)
    variants = [replace(vector, threshold=t, min_area_m2=areas[0]) for t in thresholds]
    candidates = []
    for v, objects in zip(variants, predict_objects(layout, tiles, model, variants, s),
                          strict=True):
        for a in areas:
            kept = {c: o.at_least(a) for c, o in objects.items()}
            mean = mean_scores(score_objects(kept, truth, iou))
            rank = (mean["f1"], -abs(v.threshold - vector.threshold), -a)
            candidates.append((rank, v.threshold, a, mean, kept))
    _, threshold, area, mean, kept = max(candidates, key=lambda c: c[0])
    empty = np.empty(0, dtype=object)
    hits = [matched(o, truth.get(c, empty), iou) for c, o in kept.items()]
    scores = [o.scores for o in kept.values()]
    table = confidence_table(np.concatenate([np.empty(0), *scores]),
                             np.concatenate([np.empty(0, bool), *hits]), knots)
    return Calibration(threshold, area, table, mean["f1"], mean["precision"], mean["recall"])


# --- during training -----------------------------------------------------------------------

class ObjectF1Callback(Callback):
    """Logs ``val/object_f1`` (+ ``_precision``, ``_recall``, ``val/object_f1_<class>``)
    at each validation epoch end, for ModelCheckpoint to monitor. Measured on the
    main process with the module's current ``model`` (eval, no grad, its mode
    restored), on the trainer's device, then broadcast so every rank logs it."""

    def __init__(self, layout: RunLayout, tiles: Sequence[Tile],
                 truth: Mapping[str, np.ndarray], vector: VectorSettings,
                 settings: PredictSettings, iou: float = 0.5) -> None:
        if not tiles:
            raise ObjectValError("object validation: no val tiles")
        self.layout, self.tiles, self.truth = layout, list(tiles), dict(truth)
        self.vector, self.settings, self.iou = vector, settings, iou

    def measure(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        # In-process decoding and the trainer's threads: nothing to spawn or retune mid-fit.
        s = replace(self.settings, device=str(device), threads=None, loader_workers=0)
        was_training = model.training
        try:
            with torch.no_grad():
                objects = predict_objects(self.layout, self.tiles, model.eval(), [self.vector],
                                          s)[0]
        finally:
            model.train(was_training)
        per_class = score_objects(objects, self.truth, self.iou)
        mean = mean_scores(per_class)
        out = {f"val/object_{k}": v for k, v in mean.items()}
        out.update({f"val/object_f1_{c}": float(m["f1"] or 0.0) for c, m in per_class.items()})
        return out

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = self.measure(pl_module.model, pl_module.device) if trainer.is_global_zero \
            else None
        for key, value in trainer.strategy.broadcast(values, src=0).items():
            pl_module.log(key, value)
