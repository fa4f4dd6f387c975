"""Where imagery comes from and how it is turned into 8-bit RGB tiles."""

from __future__ import annotations

from typing import Literal

from mapgap.conf.base import Strict, resolve_path
from pydantic import Field, ValidationInfo, field_validator

_TEMPLATE_KEYS = ("{x}", "{y}", "{-y}", "{q}")
_RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")


class ImageryConfig(Strict):
    # XYZ/TMS template ({z} {x} {y} {-y} {q} {s}; http(s)://, file:// or a local
    # directory) or a GeoTIFF/COG path or s3:// URI.
    source: str
    headers: dict[str, str] = {}
    # Name of an environment variable holding an API key; substituted for {key}
    # in the template. The key itself never appears in config, logs or reports.
    api_key_env: str | None = None
    subdomains: list[str] = ["a", "b", "c"]
    concurrency: int = Field(default=16, ge=1, le=256)
    retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=10, gt=0)
    # Tiles with more blank/nodata pixels than this are skipped and reported.
    max_blank_fraction: float = Field(default=0.95, ge=0, le=1)
    # Build tile_size px tiles from the 4 children at zoom+1 (e.g. 512 px from 256 px).
    overzoom: bool = False
    # Per-band percentile stretch for non-8-bit or single-band rasters.
    stretch_percentiles: tuple[float, float] = (2.0, 98.0)
    bands: list[int] | None = None
    tiles_per_task: int = Field(default=1024, ge=1)

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str, info: ValidationInfo) -> str:
        if v.lower().endswith(_RASTER_SUFFIXES):
            return resolve_path(v, info)
        if "{z}" not in v:
            raise ValueError(
                f"neither a GeoTIFF path nor a tile template with {{z}}: {v}"
            )
        if not any(k in v for k in _TEMPLATE_KEYS):
            raise ValueError(f"tile template needs {{x}}/{{y}} (or {{q}}): {v}")
        return v if "://" in v or v.startswith("/") else resolve_path(v, info, must_exist=False)

    @property
    def kind(self) -> Literal["xyz", "geotiff"]:
        return "geotiff" if self.source.lower().endswith(_RASTER_SUFFIXES) else "xyz"
