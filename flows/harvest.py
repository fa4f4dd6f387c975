"""Harvest flow: labels per class from OSM (.pbf/.osm/.osm.bz2 with osmium, or
the Overpass API) or the user's vector files, then one mask per AOI tile.

Outputs (see :class:`mapgap.layout.RunLayout`):

* ``labels/<class>.parquet``: GeoParquet, EPSG:4326, one row per feature with
  ``class, osm_id, osm_type, tags`` (JSON of the tags the class looks at),
  ``width_m`` (buffer width of lines/points, NaN for areas) and ``geometry``
  (always a (multi)polygon: lines and points are buffered in metres).
  ``osm_type`` is node/way/relation; vector files give the type from their
  ``osm_type``/``@type``/``@id`` columns ("unknown" with only an id), or
  "feature" with ``osm_id`` = the row number. Rows are in Hilbert order with a
  bbox covering column, so ``tasks.labels.read_labels(uri, bbox=...)`` is cheap;
* ``labels/summary.json``: per class the features written and what was skipped
  (``repaired, skipped_invalid, skipped_geometry, outside_aoi, clipped``), plus
  warnings (e.g. an AOI outside the file);
* ``masks/{z}/{x}/{y}.png``: uint8 single band, one per AOI tile, negatives too.
  **Mask values**: ``0`` background; ``i + 1`` for the class at index ``i`` of
  ``cfg.classes`` (where classes overlap the higher ``priority`` wins; equal
  priority: the later class in the list); ``255`` ignore (a band of
  ``labels.edge_ignore_px`` pixels along every feature outline, only when > 0);
* ``masks/stats.json``: ``{tile key: {"features": {class: n}, "foreground":
  {class: fraction}[, "ignore": fraction]}}``;
* ``masks-sdt/{z}/{x}/{y}.png`` with ``labels.signed_distance``.

Each source is one cached task (Overpass: one per sub-box), masks are drawn by
batches of ``labels.tiles_per_task`` tiles; a rerun redoes only what changed or
failed. Cache keys include the source file's size/mtime and the labels' content
hashes, and a task whose outputs were deleted runs again.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from typing import Any

from prefect import flow
from prefect.futures import wait

from mapgap import grid, storage
from mapgap.conf.schema import PipelineConfig
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.aligned_labels import current_labels
from mapgap.tasks.labels import aoi_to_wkb, source_fingerprint
from mapgap.tasks.osm import harvest_osm_task
from mapgap.tasks.overpass import build_query, fetch_box_task, harvest_overpass_task, split_boxes
from mapgap.tasks.rasterize import (
    RasterSpec,
    batch_id,
    merge_stats,
    order_tiles,
    rasterize_batch_task,
)
from mapgap.tasks.vector_labels import harvest_vector_task


def _unless_done(task: Any, outputs: Iterable[str],
                 present: Callable[[str], bool] = storage.exists) -> Any:
    """The task as is, or forced to run when one of its outputs is missing
    (a cached result must not point at deleted files)."""
    if all(present(u) for u in outputs):
        return task
    return task.with_options(refresh_cache=True)


def _written(layout: RunLayout, tile: Tile, signed_distance: bool) -> set[str]:
    """The rasterize outputs already stored, from one listing per folder: the
    masks (and distance targets) of ``tile``'s zoom and the stats parts."""
    per_tile = [layout.mask(tile), *([layout.signed_distance(tile)] if signed_distance else [])]
    folders = {posixpath.dirname(posixpath.dirname(u)) for u in per_tile}
    folders.add(posixpath.dirname(layout.mask_stats_part("batch")))
    # One recursive listing per folder: a rerun over a large AOI on S3 lists a
    # few pages instead of asking about each tile.
    return set().union(*map(storage.files_under, folders))


def _batch_outputs(layout: RunLayout, batch: list[Tile], signed_distance: bool) -> list[str]:
    """Every file a rasterize batch writes: masks, distance targets, stats part."""
    outputs = [layout.mask(t) for t in batch]
    if signed_distance:
        outputs += [layout.signed_distance(t) for t in batch]
    return [*outputs, layout.mask_stats_part(batch_id([grid.tile_key(t) for t in batch]))]


def harvest_labels(cfg: PipelineConfig) -> dict[str, Any]:
    """Labels of every class from ``cfg.labels.source``; returns the summary."""
    labels, layout = cfg.labels, RunLayout(cfg.run_uri)
    aoi = aoi_to_wkb(cfg.aoi_geometry)
    outputs = [layout.labels_summary, *(layout.labels(c.name) for c in cfg.classes)]
    if labels.kind == "overpass":
        boxes = split_boxes(cfg.aoi_geometry, labels.overpass.max_box_deg)
        get_logger().info("harvest: %d Overpass sub-boxes from %s", len(boxes), labels.source)
        futures = [
            fetch_box_task.submit(labels.source, b,
                                  build_query(cfg.classes, b, labels.overpass.timeout_s),
                                  layout.overpass_replies, labels.overpass)
            for b in boxes
        ]
        wait(futures)  # every box finishes (and is cached) before a failure stops the flow
        replies = [f.result() for f in futures]
        task = _unless_done(harvest_overpass_task, outputs)
        return task(labels.source, replies, cfg.classes, aoi, cfg.run_uri)
    fingerprint = source_fingerprint(labels.source, [c.name for c in cfg.classes])
    if labels.kind == "osm":
        task = _unless_done(harvest_osm_task, outputs)
        return task(labels.source, fingerprint, cfg.classes, aoi, cfg.run_uri)
    task = _unless_done(harvest_vector_task, outputs)
    return task(labels.source, fingerprint, cfg.classes, labels.class_column, aoi, cfg.run_uri)


def rasterize_masks(cfg: PipelineConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """A mask for every AOI tile, batched, from the labels in use (the aligned
    copies where ``labels.align`` made them); merges the per-batch stats.

    Masks drawn from other labels than now (alignment switched on or off, labels
    changed and changed back) are drawn again: a batch's cached result only says
    that *some* labels were drawn into its files."""
    layout = RunLayout(cfg.run_uri)
    spec = RasterSpec.from_config(cfg)
    labels = current_labels(layout, summary["classes"], cfg.labels.align is not None)
    drawn = layout.masks_drawn_from
    redraw = storage.exists(drawn) and storage.read_json(drawn) != labels
    tiles = order_tiles(grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom))
    written = _written(layout, tiles[0], spec.signed_distance) if tiles and not redraw else set()
    futures = []
    for batch in grid.iter_batches(tiles, cfg.labels.tiles_per_task):
        outputs = _batch_outputs(layout, batch, spec.signed_distance)
        task = _unless_done(rasterize_batch_task, outputs, written.__contains__)
        futures.append(task.submit(cfg.run_uri, [grid.tile_key(t) for t in batch], labels,
                                   spec))
    get_logger().info("harvest: rasterizing %d tiles in %d batches", len(tiles), len(futures))
    wait(futures)
    totals = merge_stats([f.result() for f in futures], layout.mask_stats)
    storage.write_json(drawn, labels)
    return {**totals, "mask_values": spec.values}


@flow(name="harvest")
def harvest_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Labels per class -> GeoParquet + summary, then masks + stats for every AOI tile.

    Mask values: 0 background, ``i + 1`` = ``cfg.classes[i]`` (higher priority
    wins overlaps), 255 ignore (edge band, only with ``labels.edge_ignore_px``).
    """
    log = get_logger()
    summary = harvest_labels(cfg)
    counts = {c: v["features"] for c, v in summary["classes"].items()}
    log.info("harvest: %s", ", ".join(f"{n} {c}" for c, n in counts.items()))
    for warning in summary["warnings"]:
        log.warning("harvest: %s", warning)
    masks = rasterize_masks(cfg, summary)
    layout = RunLayout(cfg.run_uri)
    skipped = {c: {k: v[k] for k in ("repaired", "skipped_invalid", "skipped_geometry",
                                      "outside_aoi")}
               for c, v in summary["classes"].items()}
    return {
        "features": counts,
        "skipped": skipped,
        "warnings": summary["warnings"],
        **masks,
        "labels_summary": layout.labels_summary,
        "mask_stats": layout.mask_stats,
    }
