"""Dedup flow: compare each class's predictions with OSM, then write the review
files (candidates GeoJSON + JOSM, unsupported OSM, quality grid, report, map).

The dedup tasks are keyed on a digest of their input files, so a rerun after new
predictions or re-harvested labels recomputes, and an unchanged rerun does not.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mapgap import storage
from mapgap.conf.schema import PipelineConfig
from mapgap.layout import RunLayout
from mapgap.tasks.aligned_labels import label_uri
from mapgap.tasks.dedup import DedupError, dedup_class_task
from mapgap.tasks.geometry import read_geojson
from mapgap.tasks.review import review_task

DEFAULT_IMAGERY = "tiles/{z}/{x}/{y}.png"  # the run's own tiles, relative to review.html


@flow(name="mapgap-dedup", log_prints=True)
def dedup_flow(cfg: PipelineConfig) -> dict[str, Any]:
    layout = RunLayout(cfg.run_uri)
    if not storage.exists(layout.predictions):
        raise DedupError(f"{layout.predictions}: no such file (run mapgap predict first)")
    meta = storage.read_json(layout.predict_meta) if storage.exists(layout.predict_meta) else {}
    _, props = read_geojson(layout.predictions)
    polygons = meta.get("polygons", {})
    if not props:
        raise DedupError(f"{layout.predictions}: no predicted polygon at threshold "
                         f"{polygons.get('threshold')} and min area "
                         f"{polygons.get('min_area_m2')} m2; nothing to compare with OSM "
                         "(check the model and inference settings)")
    names = meta.get("classes") or sorted({p["class"] for p in props})
    futures = []
    for name in names:
        osm = label_uri(layout, name, cfg.labels.align is not None)  # aligned, if so
        digest = storage.fingerprint([layout.predictions, osm])
        futures.append(dedup_class_task.submit(cfg.run_uri, name, cfg.dedup, cfg.zoom, osm,
                                               digest))
    summaries = [f.result() for f in futures]
    report = {
        "run": cfg.name, "zoom": cfg.zoom, "model": meta.get("model"),
        "model_version": meta.get("model_key"), "mlflow_run_id": meta.get("run_id"),
        "thresholds": {
            "probability": polygons.get("threshold"), "open_m": cfg.inference.open_m,
            "close_m": cfg.inference.close_m, "simplify_m": cfg.inference.simplify_m,
            "min_area_m2": polygons.get("min_area_m2"),
            "calibrated": polygons.get("calibrated", False), "dedup_iou": cfg.dedup.iou,
            "dedup_overlap": cfg.dedup.overlap, "unsupported_below": cfg.dedup.support},
    }
    class_tags = {n: cfg.class_named(n).output_tags() for n in names}
    parts = [uri for s in summaries for uri in s["parts"].values()]
    outputs = review_task(cfg.run_uri, summaries, class_tags, report,
                          cfg.dedup.review_imagery or DEFAULT_IMAGERY, cfg.zoom,
                          storage.fingerprint([layout.predictions, *parts]))
    return {"classes": {s["class"]: {k: s[k] for k in ("predictions", "osm", "candidates",
                                                       "unsupported")} for s in summaries},
            "outputs": outputs}
