"""Where OSM is known to be complete (``labels.complete_areas``).

OSM's buildings are trustworthy where they are mapped; its *absence* of a building
is only trustworthy where somebody has mapped everything (a Tasking Manager
project's validated squares, an area a local community finished). Elsewhere an
unlabelled roof may be exactly the missing building mapgap exists to find, so:

* masks mark background outside the complete areas as "ignore" (OSM features
  there stay positive), so training never learns that a missing building is
  background, and validation does not count it as a false positive;
* hard-negative mining only mines inside them.

The areas are a GeoJSON file of polygons, or a list of tile keys (a coarser tile
stands for all its children at the run's zoom).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import rasterio.features
import shapely

from mapgap import grid
from mapgap.conf.base import read_aoi_file
from mapgap.grid import Tile


class CompleteAreaError(ValueError):
    """Complete areas that do not fit the run (one line naming the field)."""


def burn(geoms: np.ndarray, tile: Tile, size: int, all_touched: bool) -> np.ndarray:
    """Bool [size, size]: pixels covered by EPSG:3857 geometries (``all_touched``:
    every pixel a geometry touches, i.e. "intersects")."""
    geoms = [g for g in geoms if not g.is_empty]
    if not geoms:
        return np.zeros((size, size), bool)
    return rasterio.features.rasterize(
        geoms, out_shape=(size, size), transform=grid.tile_transform(tile, size),
        all_touched=all_touched, fill=0, default_value=1, dtype="uint8").astype(bool)


def area_geometry(areas: str | Sequence[str] | None) -> shapely.Geometry | None:
    """The GeoJSON complete areas in EPSG:3857; None for a tile list or no areas."""
    if not isinstance(areas, str):
        return None
    return grid.reproject(read_aoi_file(areas), grid.WGS84, grid.WEB_MERCATOR)


def listed_tiles(keys: Sequence[str], zoom: int) -> set[str]:
    """Tile keys at the run's zoom; a coarser tile stands for all its children."""
    out: set[str] = set()
    for key in keys:
        tile = grid.parse_tile_key(key)
        if tile.z > zoom:
            raise CompleteAreaError(f"labels.complete_areas: tile {key} is finer than the "
                                    f"run's zoom {zoom}")
        out.update(grid.tile_key(t) for t in ([tile] if tile.z == zoom
                                             else grid.children(tile, zoom)))
    return out


def trusted_pixels(area: shapely.Geometry | None, tile: Tile, size: int) -> np.ndarray | None:
    """Where OSM is complete on this tile (EPSG:3857 area): None = the whole tile."""
    if area is None:
        return None
    tile_box = shapely.box(*grid.tile_xy_bounds(tile))
    if area.contains(tile_box):
        return None
    return burn(np.array([area.intersection(tile_box)], dtype=object), tile, size, False)


def has_trusted_pixel(area: shapely.Geometry, key: str, size: int) -> bool:
    """At least a pixel's worth of the tile in the area (not just touching its edge)."""
    left, bottom, right, top = grid.tile_xy_bounds(grid.parse_tile_key(key))
    tile_box = shapely.box(left, bottom, right, top)
    return area.intersects(tile_box) and (
        area.intersection(tile_box).area >= ((right - left) / size) ** 2)


class CompleteAreas:
    """Per tile, the pixels where OSM is complete, for either form of the areas."""

    def __init__(self, areas: str | Sequence[str], zoom: int) -> None:
        self.area = area_geometry(areas)
        self.listed = None if isinstance(areas, str) else listed_tiles(areas, zoom)

    def trusted(self, tile: Tile, size: int) -> np.ndarray | None:
        """Bool [size, size] of trusted pixels, or None when the whole tile is."""
        if self.listed is not None:
            return None if grid.tile_key(tile) in self.listed else np.zeros((size, size), bool)
        return trusted_pixels(self.area, tile, size)
