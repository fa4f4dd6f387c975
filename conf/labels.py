"""Which OSM features become labels, and where they come from."""

from __future__ import annotations

from typing import Literal

from mapgap.conf.base import Strict, is_uri, resolve_path
from pydantic import Field, ValidationInfo, field_validator, model_validator

TagValues = list[str] | Literal["*"]


class TagFilter(Strict):
    """A feature matches when any ``include`` key has an allowed value and no
    ``exclude`` key does ("*" means any value)."""

    include: dict[str, TagValues] = Field(min_length=1)
    exclude: dict[str, TagValues] = {}


class ClassSpec(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    tags: TagFilter
    geometry: Literal["polygon", "line", "point"] = "polygon"
    # Lines: default full width; points: diameter. Metres, buffered in a local UTM CRS.
    width_m: float | None = Field(default=None, gt=0)
    # Lines: default width per value of the first include key (e.g. per highway class).
    widths_m: dict[str, float] = {}
    lane_width_m: float = Field(default=3.5, gt=0)
    # Higher priority wins where classes overlap in a multi-class mask.
    priority: int = 1
    # Tags written on candidates for JOSM; default: the first include key=value.
    josm_tags: dict[str, str] = {}

    @model_validator(mode="after")
    def _width_for_buffers(self) -> ClassSpec:
        if self.geometry != "polygon" and self.width_m is None:
            raise ValueError(f"class {self.name!r}: {self.geometry} classes need width_m")
        return self

    def output_tags(self) -> dict[str, str]:
        if self.josm_tags:
            return dict(self.josm_tags)
        key, values = next(iter(self.tags.include.items()))
        return {key: "yes" if values == "*" else values[0]}


class OverpassConfig(Strict):
    max_box_deg: float = Field(default=0.05, gt=0)
    timeout_s: int = Field(default=180, gt=0)
    retries: int = Field(default=4, ge=0)
    max_slot_wait_s: float = Field(default=300, ge=0)
    user_agent: str = "mapgap/0.1 (OSM gap finder; https://github.com/mapgap/mapgap)"


class LabelsConfig(Strict):
    # A .osm.pbf / .osm / .osm.bz2 file, an Overpass endpoint URL (http...), or a
    # vector file (GeoJSON, GeoPackage, GeoParquet).
    source: str
    class_column: str = "class"
    overpass: OverpassConfig = OverpassConfig()
    # Pixels along every feature edge set to 255 (ignored by the loss).
    edge_ignore_px: int = Field(default=0, ge=0)
    signed_distance: bool = False

    @field_validator("source")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        return resolve_path(v, info)

    @property
    def kind(self) -> Literal["osm", "overpass", "vector"]:
        if self.source.startswith(("http://", "https://")):
            return "overpass"
        if self.source.endswith((".pbf", ".osm", ".osm.bz2", ".osm.gz")):
            return "osm"
        if is_uri(self.source) and not self.source.startswith("s3://"):
            raise ValueError(f"labels.source: unsupported URI scheme: {self.source}")
        return "vector"
