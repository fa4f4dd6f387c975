"""Cut a GeoTIFF/COG (local, ``file://`` or ``s3://``; any CRS, any bit depth)
into web-mercator tiles.

Each tile is a WarpedVRT whose grid *is* the tile (EPSG:3857, ``tile_size`` px),
so GDAL reads and reprojects only the source blocks under that tile: memory
stays bounded by one tile whatever the raster size, and COG overviews are used
when the tile is coarser than the source. Non-8-bit and single-band imagery is
scaled to 8-bit with a per-band percentile stretch computed ONCE per raster
(from a decimated read, which GDAL serves from overviews when there are some),
so neighbouring tiles share one colour scale and show no seams.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from mapgap.conf.imagery import ImageryConfig
from mapgap.grid import WEB_MERCATOR, WGS84, Tile, tile_bounds, tile_transform
from mapgap.progress import track
from mapgap.tasks.tilestore import FetchReport, ImageryError, TileStore

_STATS_MAX_PX = 1024  # longest side of the decimated read that sets the stretch
_RGB = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


@dataclass(frozen=True)
class RasterInfo:
    """What every batch needs to know about a raster, computed once (JSON-able)."""

    uri: str
    bands: list[int]
    # Per band (low, high) mapped to 0..255; None: 8-bit RGB used as is.
    stretch: list[tuple[float, float]] | None
    nodata: float | None
    bounds: tuple[float, float, float, float]  # lon/lat footprint (w, s, e, n)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RasterInfo:
        stretch = [tuple(s) for s in d["stretch"]] if d["stretch"] is not None else None
        return cls(d["uri"], list(d["bands"]), stretch, d["nodata"], tuple(d["bounds"]))


def _gdal_s3_options() -> dict[str, str]:
    """GDAL's names for the S3 endpoint that boto/s3fs take from AWS_ENDPOINT_URL
    (a MinIO/moto server needs path-style addressing)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    parts = urlsplit(endpoint)
    return {
        "AWS_S3_ENDPOINT": parts.netloc + parts.path.rstrip("/"),
        "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


@contextlib.contextmanager
def open_raster(uri: str) -> Iterator[DatasetReader]:
    """Open a local or ``s3://`` raster; S3 is read in ranges through GDAL /vsis3/
    (never downloaded whole)."""
    options = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    path = uri.removeprefix("file://")
    if uri.startswith("s3://"):
        path = "/vsis3/" + uri.removeprefix("s3://")
        options.update(_gdal_s3_options())
    with rasterio.Env(**options):
        try:
            src = rasterio.open(path)
        except RasterioError as err:
            raise ImageryError(f"{uri}: cannot open as a raster ({_one_line(err)})") from None
        with src:
            yield src


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def select_bands(src: DatasetReader, wanted: Sequence[int] | None, uri: str) -> list[int]:
    """Configured bands, else the red/green/blue-tagged ones, else the first three
    non-alpha bands, else band 1 as gray."""
    if wanted:
        bad = [b for b in wanted if not 1 <= b <= src.count]
        if bad:
            raise ImageryError(f"{uri}: imagery.bands {bad} not in 1..{src.count}")
        return list(wanted)
    interp = list(src.colorinterp)
    if all(c in interp for c in _RGB):
        return [interp.index(c) + 1 for c in _RGB]
    data_bands = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
    return data_bands[:3] if len(data_bands) >= 3 else data_bands[:1]


def describe_raster(uri: str, imagery: ImageryConfig, aoi: BaseGeometry | None) -> RasterInfo:
    """Check that the raster can be tiled over ``aoi`` (lon/lat) and compute its
    stretch. Raises :class:`ImageryError` (one line) when it cannot."""
    with open_raster(uri) as src:
        if src.crs is None:
            raise ImageryError(f"{uri}: the raster has no CRS, so it cannot be placed on the map")
        if src.transform.is_identity:
            raise ImageryError(f"{uri}: the raster has no georeferencing (identity transform)")
        bounds = transform_bounds(src.crs, WGS84, *src.bounds, densify_pts=21)
        if aoi is not None and not aoi.intersects(box(*bounds)):
            raise ImageryError(
                f"{uri}: the AOI {_fmt(aoi.bounds)} is outside the raster, which covers"
                f" {_fmt(bounds)} (lon/lat)"
            )
        bands = select_bands(src, imagery.bands, uri)
        nodata = imagery.nodata if imagery.nodata is not None else src.nodata
        needs_stretch = len(bands) == 1 or any(src.dtypes[b - 1] != "uint8" for b in bands)
        stretch = None
        if needs_stretch:
            stretch = _percentiles(src, bands, nodata, imagery.stretch_percentiles, uri)
        return RasterInfo(uri, bands, stretch, nodata, tuple(bounds))


def _fmt(bounds: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6f}" for v in bounds) + "]"


def _percentiles(
    src: DatasetReader, bands: list[int], nodata: float | None, pct: tuple[float, float], uri: str
) -> list[tuple[float, float]]:
    """Per-band (low, high) percentiles of valid pixels from a decimated read."""
    scale = max(src.width, src.height) / _STATS_MAX_PX
    shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale))) if scale > 1 \
        else (src.height, src.width)
    data = src.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
    valid = src.dataset_mask(out_shape=shape) > 0
    out = []
    for band in data:
        ok = valid & np.isfinite(band)
        if nodata is not None:
            ok &= band != nodata
        values = band[ok]
        if values.size == 0:
            raise ImageryError(f"{uri}: no valid pixels to compute the colour stretch from")
        low, high = np.percentile(values, pct)
        out.append((float(low), float(max(high, low + 1e-6))))
    return out


def to_rgb8(data: np.ndarray, stretch: list[tuple[float, float]] | None) -> np.ndarray:
    """(bands, H, W) samples -> (H, W, 3) uint8; one band becomes gray."""
    if stretch is not None:
        lo = np.array([s[0] for s in stretch], np.float32)[:, None, None]
        hi = np.array([s[1] for s in stretch], np.float32)[:, None, None]
        scaled = (data.astype(np.float32) - lo) * (255.0 / (hi - lo))
        data = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    if data.shape[0] == 1:
        data = np.repeat(data, 3, axis=0)
    return np.ascontiguousarray(data.transpose(1, 2, 0))


def render_tile(
    src: DatasetReader, tile: Tile, size: int, info: RasterInfo, resampling: Resampling
) -> tuple[np.ndarray, np.ndarray]:
    """One tile as (RGB uint8, valid mask): a warp of just the source under it."""
    nodata = {"src_nodata": info.nodata} if info.nodata is not None else {}
    # A source alpha band is warped along; otherwise an added one marks where the
    # tile is outside the raster (or on nodata).
    add_alpha = ColorInterp.alpha not in src.colorinterp
    with WarpedVRT(src, crs=WEB_MERCATOR, transform=tile_transform(tile, size), width=size,
                   height=size, resampling=resampling, add_alpha=add_alpha, **nodata) as vrt:
        data = vrt.read(info.bands)
        valid = vrt.dataset_mask() > 0
    return to_rgb8(data, info.stretch), valid


def fetch_geotiff(
    tiles: Sequence[Tile], imagery: ImageryConfig, info: RasterInfo, store: TileStore
) -> FetchReport:
    """Render ``tiles`` not yet in ``store`` from the raster; returns the batch report."""
    report = FetchReport()
    existing = store.existing(tiles)
    report.skipped_existing = len(existing)
    todo = [t for t in tiles if t not in existing]
    footprint = box(*info.bounds)
    resampling = Resampling[imagery.resampling]
    with open_raster(info.uri) as src:
        for tile in track(todo, len(todo), "tiles"):
            if not footprint.intersects(box(*tile_bounds(tile))):
                report.add("blank", tile, "outside the raster", fraction=1.0)
                continue
            try:
                rgb, valid = render_tile(src, tile, store.tile_size, info, resampling)
            except RasterioError as err:
                report.add("failures", tile, f"read error: {_one_line(err)}")
                continue
            store.save(tile, rgb, None if valid.all() else valid, report)
    return report
