"""Predict flow: probabilities for every imagery tile of the AOI, then polygons.

Batches of ``inference.tiles_per_task`` tiles are cached tasks: a rerun after a
crash only predicts the batches that did not finish, and a new champion model
(another registry version or checkpoint digest) recomputes everything.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mapgap.conf.schema import PipelineConfig
from mapgap.grid import iter_batches, tile_key
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.predict import (
    PredictSettings,
    blocked_order,
    load_model,
    predict_batch,
    resolve_model,
    tiles_to_predict,
    write_meta,
)
from mapgap.tasks.vectorize import VectorSettings, merge_batches, vectorize_batch


@flow(name="mapgap-predict", log_prints=True)
def predict_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Imagery tiles -> probability PNGs -> predictions.geojson."""
    log = get_logger()
    layout = RunLayout(cfg.run_uri)
    ref = resolve_model(cfg)
    settings = PredictSettings.from_config(cfg)
    tiles, no_imagery = tiles_to_predict(cfg, layout)
    classes = list(load_model(ref).classes)
    write_meta(layout, ref, classes, settings)
    n = cfg.inference.tiles_per_task
    batches = [[tile_key(t) for t in b] for b in iter_batches(blocked_order(tiles, n), n)]
    log.info("predicting %d tiles in %d batches with %s (%s)", len(tiles), len(batches),
             ref.spec, ref.key)
    futures = [predict_batch.submit(cfg.run_uri, keys, ref, settings) for keys in batches]
    predicted = sum(f.result()["tiles"] for f in futures)

    vector = VectorSettings.from_config(cfg, classes)
    version = f"{ref.key}|{settings}"
    futures = [vectorize_batch.submit(cfg.run_uri, keys, vector, version) for keys in batches]
    polygons = merge_batches(cfg.run_uri, [f.result() for f in futures], vector)
    return {"tiles": predicted, "tiles_without_imagery": no_imagery, "batches": len(batches),
            "model": ref.spec, "model_version": ref.key, "mlflow_run_id": ref.run_id,
            "classes": classes, "polygons": polygons, "predictions": layout.predictions}
