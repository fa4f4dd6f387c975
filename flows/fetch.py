"""Fetch flow: every AOI tile's imagery into ``<run>/tiles/{z}/{x}/{y}.png`` and
one merged ``tiles/fetch_report.json``.

Tiles already stored are skipped before any task is submitted, and batches are
cut from the stable AOI tile order, so a rerun only resubmits batches that still
have work (failed, missing or blank tiles) and every finished batch's task is
never run again. ``mapgap run CONFIG --refresh fetch`` fetches every tile again;
the stages after it see the tiles' new versions and recompute.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

from mapgap import grid, storage
from mapgap.conf.schema import PipelineConfig
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.imagery import describe_raster_task, fetch_tiles_task, tile_store
from mapgap.tasks.tilestore import FetchReport, ImageryError, merge_reports


@flow(name="fetch")
def fetch_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Fetch the AOI's tiles at ``cfg.zoom``; returns the report's counts and URI."""
    log = get_logger()
    imagery = cfg.imagery
    tiles = grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom)
    # Stored tiles are this stage's cached results: refreshing it fetches them again.
    refetch = bool(PREFECT_TASKS_REFRESH_CACHE.value())
    existing = tile_store(cfg.run_uri, imagery, cfg.tile_size, refetch).existing(tiles)
    raster = None
    if imagery.kind == "geotiff":
        raster = describe_raster_task(imagery, cfg.aoi_geometry.wkt)
    futures = []
    for batch in grid.iter_batches(tiles, imagery.tiles_per_task):
        todo = [grid.tile_key(t) for t in batch if t not in existing]
        if todo:
            futures.append(
                fetch_tiles_task.submit(cfg.run_uri, imagery, cfg.tile_size, todo, raster,
                                        refetch)
            )
    log.info("fetch: %d tiles, %d already stored, %d batches to run",
             len(tiles), len(existing), len(futures))
    parts = [f.result() for f in futures]
    parts.append(FetchReport(skipped_existing=len(existing)).to_dict())
    report = merge_reports(parts, source=imagery.source, zoom=cfg.zoom, tile_size=cfg.tile_size,
                           raster=raster)
    uri = RunLayout(cfg.run_uri).fetch_report
    storage.write_json(uri, report)
    counts = report["counts"]
    log.info("fetch: %s", ", ".join(f"{v} {k}" for k, v in counts.items() if k != "tiles"))
    if tiles and counts["fetched"] + counts["skipped_existing"] == 0:
        raise ImageryError(
            f"{imagery.source}: none of the {len(tiles)} AOI tiles could be fetched"
            f" ({counts['missing']} missing, {counts['failed']} failed, {counts['blank']} blank);"
            f" see {uri}"
        )
    return {**counts, "report": uri}
