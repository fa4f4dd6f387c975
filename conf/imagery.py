"""Where imagery comes from and how it is turned into 8-bit RGB tiles."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mapgap.conf.base import Strict, resolve_path

_TEMPLATE_KEYS = ("{x}", "{y}", "{-y}", "{q}")
Byte = Annotated[int, Field(ge=0, le=255)]
_RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")
_SCHEMES = {"xyz": ("http", "https", "file", "s3"), "geotiff": ("file", "s3")}
# Query parameters and header names that carry credentials: their value must come
# from the environment ({key}), or it would be stored wherever the config goes
# (Prefect flow-run parameters, fetch_report.json, logs).
_SECRET_PARAM = re.compile(
    r"^(key|api[-_]?key|access[-_]?token|token|auth|auth[-_]?token|secret|client[-_]?secret"
    r"|password|passwd|signature|sig|x-amz-signature|x-amz-credential)$", re.I)
_SECRET_HEADER = re.compile(r"auth|key|token|secret|password|cookie|credential", re.I)
USE_ENV = ("use {key} there and put the value in an environment variable named by"
           " imagery.api_key_env: config values are stored in the Prefect DB and reports")


class ImageryConfig(Strict):
    # XYZ/TMS template ({z} {x} {y} {-y} {q} {s}; http(s)://, file:// or a local
    # directory) or a GeoTIFF/COG path or s3:// URI.
    source: str
    headers: dict[str, str] = {}
    # Name of an environment variable holding an API key; substituted for {key}
    # in the template. The key itself never appears in config, logs or reports.
    api_key_env: str | None = None
    subdomains: list[str] = Field(default=["a", "b", "c"], min_length=1)
    concurrency: int = Field(default=16, ge=1, le=256)
    retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=10, gt=0)
    # Retry waits double from backoff_s (with jitter) up to max_backoff_s; a 429's
    # Retry-After is honoured up to max_backoff_s.
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=30, ge=0)
    # Tiles with more blank/nodata pixels than this are skipped and reported.
    max_blank_fraction: float = Field(default=0.95, ge=0, le=1)
    # Besides transparent pixels, XYZ pixels of exactly these colours count as
    # blank (servers paint areas without imagery black or white).
    blank_colors: list[tuple[Byte, Byte, Byte]] = [(0, 0, 0), (255, 255, 255)]
    # XYZ: build tile_size px tiles from the 4 children at zoom+1 (e.g. 512 px from 256 px).
    overzoom: bool = False
    # Per-band percentile stretch for non-8-bit or single-band rasters.
    stretch_percentiles: tuple[float, float] = (2.0, 98.0)
    # GeoTIFF bands to use as R, G, B (or one gray band); default: the bands
    # tagged red/green/blue, else the first three, else band 1.
    bands: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, max_length=3)
    # GeoTIFF nodata value when the file does not declare one.
    nodata: float | None = None
    resampling: Literal["nearest", "bilinear", "cubic", "lanczos", "average"] = "bilinear"
    tiles_per_task: int = Field(default=1024, ge=1)

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str, info: ValidationInfo) -> str:
        _no_literal_credentials(v)
        kind = "geotiff" if v.lower().endswith(_RASTER_SUFFIXES) else "xyz"
        scheme = urlsplit(v).scheme.lower() if "://" in v else ""
        if scheme and scheme not in _SCHEMES[kind]:
            where = "a GeoTIFF" if kind == "geotiff" else "tiles"
            raise ValueError(f"unsupported URI scheme {scheme}:// for {where} (use "
                             f"{', '.join(s + '://' for s in _SCHEMES[kind])} or a local path)")
        if kind == "geotiff":
            return resolve_path(v, info)
        if "{z}" not in v and "{q}" not in v:  # a quadkey encodes the zoom
            raise ValueError(
                f"neither a GeoTIFF path nor a tile template with {{z}}: {v}"
            )
        if not any(k in v for k in _TEMPLATE_KEYS):
            raise ValueError(f"tile template needs {{x}}/{{y}} (or {{q}}): {v}")
        return v if "://" in v or v.startswith("/") else resolve_path(v, info, must_exist=False)

    @field_validator("headers")
    @classmethod
    def _no_literal_secret_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if _SECRET_HEADER.search(name) and "{key}" not in value:
                raise ValueError(f"header {name!r} has a literal value: {USE_ENV}")
        return v

    @model_validator(mode="after")
    def _key_placeholder_and_env(self) -> ImageryConfig:
        uses_key = "{key}" in self.source or any("{key}" in v for v in self.headers.values())
        if uses_key and not self.api_key_env:
            raise ValueError("source or a header uses {key} but api_key_env (the environment"
                             " variable holding the key) is not set")
        if self.api_key_env and not uses_key:
            raise ValueError(f"api_key_env is {self.api_key_env} but neither source nor a"
                             " header uses {key}: the key would never be sent")
        return self

    @property
    def kind(self) -> Literal["xyz", "geotiff"]:
        return "geotiff" if self.source.lower().endswith(_RASTER_SUFFIXES) else "xyz"

    @field_validator("bands")
    @classmethod
    def _rgb_or_gray(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(v) == 2:
            raise ValueError("give 3 bands (R, G, B) or 1 gray band, not 2")
        return v

    @field_validator("stretch_percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"need 0 <= low < high <= 100, got {v[0]}, {v[1]}")
        return v


def _no_literal_credentials(source: str) -> None:
    """Refuse a password in the URL or a credential query parameter that is not
    ``{key}`` (the value is never quoted: the message goes to logs too)."""
    if "://" not in source:
        return
    parts = urlsplit(source)
    if parts.password:
        raise ValueError(f"a password in the URL: {USE_ENV}")
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_PARAM.match(name) and "{key}" not in value:
            raise ValueError(f"query parameter {name}= has a literal value: {USE_ENV}")
