"""Keep what OSM lacks: predictions compared with the OSM features of their class.

A prediction is a *candidate* (missing from OSM) when both
- its IoU with the union of the OSM features it touches is below ``dedup.iou``, and
- the share of its area covered by OSM is below ``dedup.overlap``
(the second test stops a small prediction inside a big OSM polygon - a shed in
a mapped yard - from being reported as new, which IoU alone would do). The
other direction gives OSM features with no prediction support (demolished,
misplaced or wrongly tagged), and a per-tile quality grid. Areas are metres in
an equal-area CRS; an STRtree keeps everything n log n.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mercantile
import numpy as np
import shapely
from pyproj import CRS

from mapgap import storage
from mapgap.grid import Tile, tile_key
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.evaluate import object_metrics
from mapgap.tasks.geometry import (
    metric_crs_for,
    polygonal,
    project,
    read_geojson,
    to_metric,
    union_groups,
    write_geojson,
)


class DedupError(ValueError):
    """Missing or unusable dedup input (one line naming the file)."""


@dataclass
class Cover:
    """Per geometry of one layer, against the union of what it touches in the other."""

    inter: np.ndarray  # area of the intersection with that union (m2)
    touched: np.ndarray  # area of that union (m2)
    area: np.ndarray  # own area (m2)

    @property
    def iou(self) -> np.ndarray:
        union = self.area + self.touched - self.inter
        return np.divide(self.inter, union, out=np.zeros_like(union), where=union > 0)

    @property
    def covered(self) -> np.ndarray:
        return np.divide(self.inter, self.area, out=np.zeros_like(self.area),
                         where=self.area > 0)


def cover(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
          inter_ab: np.ndarray) -> Cover:
    """How much of each ``a`` the union of the ``b`` it touches covers, from the
    touching pairs (sorted by ``ia``) and their intersection areas. Most
    geometries touch one ``b`` and reuse those areas; only the rest build a union."""
    inter, touched = np.zeros(len(a)), np.zeros(len(a))
    n_touched = np.bincount(ia, minlength=len(a))
    one = n_touched[ia] == 1
    inter[ia[one]] = inter_ab[one]
    touched[ia[one]] = shapely.area(b[ib[one]])
    many_a, many_b = ia[~one], ib[~one]
    if len(many_a):
        starts = np.flatnonzero(np.r_[True, many_a[1:] != many_a[:-1]])
        firsts = many_a[starts]
        unions = np.array([shapely.union_all(b[g]) for g in np.split(many_b, starts[1:])],
                          dtype=object)
        inter[firsts] = shapely.area(shapely.intersection(a[firsts], unions))
        touched[firsts] = shapely.area(unions)
    return Cover(inter, touched, shapely.area(a))


@dataclass
class DedupResult:
    candidates: np.ndarray  # indices into the predictions
    pred_cover: Cover
    unsupported: np.ndarray  # indices into the OSM features
    osm_cover: Cover


def dedup(pred_m: np.ndarray, osm_m: np.ndarray, iou: float, overlap: float,
          support: float) -> DedupResult:
    """Candidates and unsupported OSM, both layers in the same metric CRS. One
    STRtree query and one intersection per touching pair serve both directions."""
    pi, oi = shapely.STRtree(osm_m).query(pred_m, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred_m[pi], osm_m[oi]))
    pred_cover = cover(pred_m, osm_m, pi, oi, inter)
    by_osm = np.argsort(oi, kind="stable")
    osm_cover = cover(osm_m, pred_m, oi[by_osm], pi[by_osm], inter[by_osm])
    is_new = (pred_cover.iou < iou) & (pred_cover.covered < overlap)
    return DedupResult(np.flatnonzero(is_new), pred_cover,
                       np.flatnonzero(osm_cover.covered < support), osm_cover)


# --- quality grid --------------------------------------------------------------------------

def tile_indices(points: np.ndarray, zoom: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) tile numbers of lon/lat points (vectorized mercantile.tile)."""
    lon, lat = shapely.get_x(points), shapely.get_y(points)
    n = 2**zoom
    x = np.floor((lon + 180) / 360 * n)
    s = np.sin(np.radians(np.clip(lat, -85.0511, 85.0511)))
    y = np.floor((0.5 - np.log((1 + s) / (1 - s)) / (4 * np.pi)) * n)
    return np.clip(x, 0, n - 1).astype(np.int64), np.clip(y, 0, n - 1).astype(np.int64)


def _per_cell(geoms_m: np.ndarray, cells_m: np.ndarray, tree: shapely.STRtree) -> np.ndarray:
    """Area of ``geoms`` inside each cell (geometries of one layer never overlap)."""
    gi, ci = tree.query(geoms_m, predicate="intersects")
    clipped = shapely.area(shapely.intersection(geoms_m[gi], cells_m[ci]))
    return np.bincount(ci, weights=clipped, minlength=len(cells_m))


def quality_grid(cells: list[Tile], pred_m: np.ndarray, osm_m: np.ndarray, crs: CRS,
                 counts: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    """Per cell: IoU between OSM and predictions (None where both are empty),
    areas and counts. ``counts``: name -> (x, y) tile numbers of points to count."""
    boxes = np.array([shapely.box(*mercantile.bounds(t)) for t in cells], dtype=object)
    cells_m = project(shapely.segmentize(boxes, 1e-4), "EPSG:4326", crs)
    tree = shapely.STRtree(cells_m)
    osm_flat, pred_flat = dissolve(osm_m), dissolve(pred_m)
    pi, oi = shapely.STRtree(osm_flat).query(pred_flat, predicate="intersects")
    both = shapely.intersection(pred_flat[pi], osm_flat[oi])
    o, p = _per_cell(osm_flat, cells_m, tree), _per_cell(pred_flat, cells_m, tree)
    i = _per_cell(both, cells_m, tree) if len(both) else np.zeros(len(cells))
    index = {(t.x, t.y): k for k, t in enumerate(cells)}
    tallies = {}
    for name, (xs, ys) in counts.items():
        tally = np.zeros(len(cells), int)
        for xy in zip(xs.tolist(), ys.tolist(), strict=True):
            if xy in index:
                tally[index[xy]] += 1
        tallies[name] = tally
    rows = []
    for k, t in enumerate(cells):
        union = o[k] + p[k] - i[k]
        rows.append({"tile": tile_key(t), "iou": round(i[k] / union, 4) if union > 0 else None,
                     "osm_m2": round(o[k], 1), "predicted_m2": round(p[k], 1),
                     **{name: int(tally[k]) for name, tally in tallies.items()}})
    return rows


def dissolve(geoms: np.ndarray) -> np.ndarray:
    """Merge geometries that overlap (with area), so areas are not counted twice."""
    if len(geoms) < 2:
        return geoms
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = a < b
    a, b = a[pair], b[pair]
    overlapping = shapely.area(shapely.intersection(geoms[a], geoms[b])) > 0
    return union_groups(geoms, a[overlapping], b[overlapping])[0]


# --- one class -----------------------------------------------------------------------------

def read_osm(layout: RunLayout, class_name: str, uri: str | None = None
             ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(lon/lat polygons, properties) of a class's OSM features: the harvested ones,
    or ``uri`` (e.g. their copy aligned to the imagery)."""
    from mapgap.tasks.labels import read_labels

    uri = uri or layout.labels(class_name)
    if not storage.exists(uri):
        raise DedupError(f"{uri}: no OSM labels for class {class_name!r} (run mapgap harvest)")
    frame = read_labels(uri)
    geoms = polygonal(np.asarray(frame.geometry.values, dtype=object))
    keep = ~shapely.is_empty(geoms)  # lines and points of a polygon class carry no area
    frame, geoms = frame[keep], geoms[keep]
    props = [{"class": class_name, "osm_id": int(i), "osm_type": str(t), "tags": _tags(g)}
             for i, t, g in zip(frame["osm_id"], frame["osm_type"], frame["tags"], strict=True)]
    return geoms, props


def _tags(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        return json.loads(value) if value else {}
    return dict(value) if value is not None else {}


def predicted_cells(layout: RunLayout, zoom: int, grid_zoom: int) -> list[Tile]:
    """Grid cells (tiles at ``grid_zoom``) holding at least one probability tile."""
    from mapgap.tasks.predict import stored_tiles

    if grid_zoom > zoom:
        raise DedupError(f"dedup.grid_zoom: {grid_zoom} is finer than the tile zoom {zoom}")
    tiles = stored_tiles(layout.probabilities, zoom)
    if not tiles:
        raise DedupError(f"{layout.probabilities}: no probability tiles (run mapgap predict)")
    return sorted({mercantile.parent(t, zoom=grid_zoom) if grid_zoom < zoom else t
                   for t in tiles}, key=lambda t: (t.y, t.x))


def dedup_class(layout: RunLayout, class_name: str, dedup_cfg: Any, zoom: int,
                osm_uri: str | None = None) -> dict[str, Any]:
    """Candidates, unsupported OSM and the quality grid of one class -> GeoJSON parts.
    ``osm_uri``: the OSM features to compare with (default: the harvested labels)."""
    preds_all, pred_props_all = read_geojson(layout.predictions)
    mine = [i for i, p in enumerate(pred_props_all) if p.get("class") == class_name]
    preds, pred_props = preds_all[mine], [pred_props_all[i] for i in mine]
    grid_zoom = dedup_cfg.grid_zoom if dedup_cfg.grid_zoom is not None else zoom
    cells = predicted_cells(layout, zoom, grid_zoom)
    cell_keys = {(t.x, t.y) for t in cells}
    osm_all, osm_props_all = read_osm(layout, class_name, osm_uri)
    ox, oy = tile_indices(shapely.point_on_surface(osm_all), grid_zoom)
    in_scope = np.flatnonzero([(x, y) in cell_keys for x, y in zip(ox, oy, strict=True)])
    osm, osm_props = osm_all[in_scope], [osm_props_all[i] for i in in_scope]

    crs = metric_crs_for(preds, osm)
    pred_m, osm_m = to_metric(preds, crs), to_metric(osm, crs)
    r = dedup(pred_m, osm_m, dedup_cfg.iou, dedup_cfg.overlap, dedup_cfg.support)
    if not len(preds):
        r.unsupported = np.empty(0, int)  # no prediction at all says nothing about OSM

    pred_iou, pred_covered = r.pred_cover.iou, r.pred_cover.covered
    osm_covered = r.osm_cover.covered
    cand_props = [{**pred_props[i], "iou": round(float(pred_iou[i]), 4),
                   "osm_overlap": round(float(pred_covered[i]), 4)} for i in r.candidates]
    uns_props = [{**osm_props[i], "support": round(float(osm_covered[i]), 4)}
                 for i in r.unsupported]
    pts = {"osm": (ox[in_scope], oy[in_scope]),
           "predicted": tile_indices(shapely.point_on_surface(preds), grid_zoom)}
    pts["candidates"] = (pts["predicted"][0][r.candidates], pts["predicted"][1][r.candidates])
    pts["unsupported"] = (pts["osm"][0][r.unsupported], pts["osm"][1][r.unsupported])
    grid = quality_grid(cells, pred_m, osm_m, crs, pts)
    grid_geoms = [shapely.box(*mercantile.bounds(t)) for t in cells]

    parts = {
        "osm": write_geojson(layout.dedup_part(class_name, "osm.geojson"), osm, osm_props),
        "candidates": write_geojson(layout.dedup_part(class_name, "candidates.geojson"),
                                    preds[r.candidates], cand_props),
        "unsupported": write_geojson(layout.dedup_part(class_name, "unsupported.geojson"),
                                     osm[r.unsupported], uns_props),
        "grid": write_geojson(layout.dedup_part(class_name, "quality_grid.geojson"), grid_geoms,
                              [{"class": class_name, **g} for g in grid]),
    }
    scores = np.array([p.get("score", 1.0) for p in pred_props], dtype=float)
    area = {"osm_m2": sum(g["osm_m2"] for g in grid),
            "predicted_m2": sum(g["predicted_m2"] for g in grid)}
    inter = float(r.pred_cover.inter.sum())
    summary = {
        "class": class_name, "predictions": len(preds), "osm": len(osm),
        "osm_outside_predicted_tiles": len(osm_all) - len(osm),
        "candidates": len(r.candidates), "unsupported": len(r.unsupported),
        "metrics": {
            "area_iou": _share(inter, area["osm_m2"] + area["predicted_m2"] - inter),
            "osm_objects_vs_predictions": object_metrics(preds, scores, osm, 0.5),
            "mean_tile_iou": _mean([g["iou"] for g in grid]),
            **area,
        },
        "parts": parts,
    }
    get_logger().info("%s: %d predictions, %d candidates, %d unsupported OSM", class_name,
                      len(preds), len(r.candidates), len(r.unsupported))
    return summary


def _share(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


@stage_task(name="dedup-class")
def dedup_class_task(run_uri: str, class_name: str, dedup_cfg: Any, zoom: int,
                     osm_uri: str, inputs: str) -> dict[str, Any]:
    """``inputs``: content digest of the predictions and labels (cache key only)."""
    return dedup_class(RunLayout(run_uri), class_name, dedup_cfg, zoom, osm_uri)
