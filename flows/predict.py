"""Predict flow: probabilities for every imagery tile of the AOI, then polygons.

Batches of ``inference.tiles_per_task`` tiles are cached tasks: a rerun after a
crash only predicts the batches that did not finish, and a new champion model
(another registry version or checkpoint digest) recomputes everything.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.futures import PrefectFuture, as_completed

from mapgap.artifacts import Progress
from mapgap.conf.schema import PipelineConfig
from mapgap.grid import iter_batches, tile_key
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.objectval import vector_settings
from mapgap.tasks.predict import (
    PredictSettings,
    band_names,
    blocked_order,
    imagery_digest,
    load_model,
    predict_batch,
    resolve_model,
    tiles_to_predict,
    write_meta,
)
from mapgap.tasks.vectorize import merge_batches, vectorize_batch


def follow(futures: list[PrefectFuture], total: int, log: Any) -> int:
    """Wait for the batches as they finish, with a log line and a progress artifact
    in the Prefect UI (``tiles 1200/5000``); returns the number of tiles predicted."""
    progress = Progress("predict-progress", total, f"Tiles predicted (of {total})")
    done = 0
    for future in as_completed(futures):
        n = future.result()["tiles"]
        done += n
        progress.advance(n)
        log.info("tiles %d/%d", done, total)
    return done


@flow(name="mapgap-predict", log_prints=True)
def predict_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Imagery tiles -> probability PNGs -> predictions.geojson."""
    log = get_logger()
    layout = RunLayout(cfg.run_uri)
    ref = resolve_model(cfg)
    settings = PredictSettings.from_config(cfg)
    versions, no_imagery = tiles_to_predict(cfg, layout)
    model = load_model(ref)
    classes, bands = list(model.classes), band_names(model)
    calibration = getattr(model, "calibration", None)
    vector = vector_settings(cfg, classes, bands, calibration)
    write_meta(layout, ref, classes, settings, bands, {
        "threshold": vector.threshold, "min_area_m2": vector.min_area_m2,
        "calibrated": calibration is not None, "score": "confidence" if vector.confidence
        else "mean probability"})
    n = cfg.inference.tiles_per_task
    batches = list(iter_batches(blocked_order(list(versions), n), n))
    keys = [[tile_key(t) for t in b] for b in batches]
    imagery = [imagery_digest(b, versions) for b in batches]
    log.info("predicting %d tiles in %d batches with %s (%s)", len(versions), len(batches),
             ref.spec, ref.key)
    futures = [predict_batch.submit(cfg.run_uri, k, ref, settings, digest)
               for k, digest in zip(keys, imagery, strict=True)]
    predicted = follow(futures, len(versions), log)

    futures = [vectorize_batch.submit(cfg.run_uri, k, vector, f"{ref.key}|{settings}|{digest}")
               for k, digest in zip(keys, imagery, strict=True)]
    polygons = merge_batches(cfg.run_uri, [f.result() for f in futures], vector)
    return {"tiles": predicted, "tiles_without_imagery": no_imagery, "batches": len(batches),
            "model": ref.spec, "model_version": ref.key, "mlflow_run_id": ref.run_id,
            "classes": classes, "polygons": polygons, "predictions": layout.predictions}
