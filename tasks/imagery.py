"""The fetch stage's tasks: imagery from an XYZ/TMS source (:mod:`.xyz`) or a
GeoTIFF/COG (:mod:`.geotiff`) onto the run's tile grid (:mod:`.tilestore`).

A task fetches a whole batch of tiles (``imagery.tiles_per_task``) and returns
its part of the fetch report; the flow merges the parts. Tasks take tile keys
and configs, return small dicts, and skip tiles already stored, so a rerun only
does what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shapely import wkt

from mapgap.conf.imagery import ImageryConfig
from mapgap.grid import Tile, parse_tile_key
from mapgap.orchestration import stage_task
from mapgap.tasks.geotiff import RasterInfo, describe_raster, fetch_geotiff
from mapgap.tasks.tilestore import TileStore
from mapgap.tasks.xyz import fetch_xyz


def tile_store(run_uri: str, imagery: ImageryConfig, tile_size: int,
               overwrite: bool = False) -> TileStore:
    """The run's tile store; for XYZ tiles, solid black/white also counts as blank
    (a GeoTIFF says where it has no data: its nodata/alpha)."""
    colors = imagery.blank_colors if imagery.kind == "xyz" else ()
    return TileStore(run_uri, tile_size, imagery.max_blank_fraction, tuple(map(tuple, colors)),
                     overwrite)


def fetch_batch(
    run_uri: str,
    imagery: ImageryConfig,
    tile_size: int,
    tiles: Sequence[Tile],
    raster: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fetch one batch into the run's tile store; returns its fetch report part.

    ``raster`` is :func:`describe_raster`'s result (GeoTIFF sources), computed
    once per run so all batches share one colour stretch. ``overwrite`` fetches
    tiles that are already stored again (each replaced atomically).
    """
    store = tile_store(run_uri, imagery, tile_size, overwrite)
    if imagery.kind == "xyz":
        return fetch_xyz(tiles, imagery, store).to_dict()
    if raster is None:
        raster = describe_raster(imagery.source, imagery, None).to_dict()
    info = RasterInfo.from_dict(raster)
    return fetch_geotiff(tiles, imagery, info, store).to_dict()


@stage_task(name="describe-raster")
def describe_raster_task(imagery: ImageryConfig, aoi_wkt: str) -> dict[str, Any]:
    """Validate a GeoTIFF against the AOI and compute its colour stretch, once."""
    return describe_raster(imagery.source, imagery, wkt.loads(aoi_wkt)).to_dict()


@stage_task(name="fetch-tiles")
def fetch_tiles_task(
    run_uri: str,
    imagery: ImageryConfig,
    tile_size: int,
    tile_keys: list[str],
    raster: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    return fetch_batch(run_uri, imagery, tile_size, [parse_tile_key(k) for k in tile_keys],
                       raster, overwrite)
