"""Web-mercator to WGS84, for the OSM extract and GeoJSON (the plan lives in EPSG:3857)."""

from __future__ import annotations

from functools import cache

import numpy as np
import shapely
from pyproj import Transformer


@cache
def _transformer() -> Transformer:
    return Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)


def lonlat(xy: np.ndarray) -> np.ndarray:
    """(N, 2) mercator metres -> (N, 2) lon/lat rounded to OSM's 1e-7 degree precision."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    lon, lat = _transformer().transform(xy[:, 0], xy[:, 1])
    return np.round(np.column_stack([lon, lat]), 7)


def to_wgs84(geom: shapely.Geometry) -> shapely.Geometry:
    return shapely.transform(geom, lonlat)
