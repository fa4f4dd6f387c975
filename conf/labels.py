"""Which OSM features become labels, and where they come from."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from mapgap.conf.base import Strict, is_uri, read_aoi_file, resolve_path

_TILE_KEY = re.compile(r"^z\d+_\d+_\d+$")

TagValues = list[str] | Literal["*"]
OSM_SUFFIXES = (".pbf", ".osm", ".osm.bz2", ".osm.gz")
VECTOR_SUFFIXES = (".parquet", ".geoparquet", ".gpkg", ".geojson", ".json", ".fgb", ".shp")


class TagFilter(Strict):
    """A feature matches when any ``include`` key has an allowed value and no
    ``exclude`` key does. "*" means any value except "no" (``building=no`` is not
    a building, ``tunnel=no`` is not a tunnel)."""

    include: dict[str, TagValues] = Field(min_length=1)
    exclude: dict[str, TagValues] = {}


def _tags_of_name(data: dict) -> TagFilter:
    return TagFilter(include={data.get("name") or "class": "*"})


class ClassSpec(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    # Which OSM tags make this class. Required for OSM and Overpass sources; a
    # vector label file that says the class itself (a file per class, a class
    # column, or one class only) needs none: then it is {<name>: "*"} (so
    # building=yes is what JOSM gets, unless josm_tags says otherwise).
    tags: TagFilter = Field(default_factory=_tags_of_name)
    geometry: Literal["polygon", "line", "point"] = "polygon"
    # Lines: default full width; points: diameter. Metres, buffered in a local UTM CRS.
    width_m: float | None = Field(default=None, gt=0)
    # Lines: default width per value of the first include key (e.g. per highway class).
    # A feature's own ``width=`` tag wins, then ``lanes=`` x lane_width_m.
    widths_m: dict[str, float] = {}
    lane_width_m: float = Field(default=3.5, gt=0)
    # Higher priority wins where classes overlap in a multi-class mask.
    priority: int = 1
    # Tags written on candidates for JOSM; default: the first include key=value.
    josm_tags: dict[str, str] = {}
    # Touching objects (terraced houses, dense blocks) come out as separate polygons:
    # harvest writes a per-instance distance target, the model learns it as an
    # extra band and vectorize splits merged blobs along it.
    separate_instances: bool = False

    @model_validator(mode="after")
    def _width_for_buffers(self) -> ClassSpec:
        if self.geometry != "polygon" and self.width_m is None:
            raise ValueError(f"class {self.name!r}: {self.geometry} classes need width_m")
        return self

    @property
    def tags_given(self) -> bool:
        """False when ``tags`` was left out and is the name's default."""
        return "tags" in self.model_fields_set

    def output_tags(self) -> dict[str, str]:
        if self.josm_tags:
            return dict(self.josm_tags)
        key, values = next(iter(self.tags.include.items()))
        return {key: "yes" if values == "*" else values[0]}


class OverpassConfig(Strict):
    # The AOI is split into sub-boxes of at most this size; each is its own
    # cached task, so a rerun re-asks only the boxes that failed.
    max_box_deg: float = Field(default=0.05, gt=0)
    # Server-side [timeout:]; the HTTP read timeout adds a margin to it.
    timeout_s: int = Field(default=180, gt=0)
    # Extra attempts after HTTP 429/502/503/504, connection errors, cut replies.
    retries: int = Field(default=4, ge=0)
    # First back-off delay, doubled per attempt up to max_backoff_s (Retry-After wins).
    backoff_s: float = Field(default=5.0, ge=0)
    max_backoff_s: float = Field(default=120.0, ge=0)
    # Longest total wait for a free slot announced by <endpoint>/status ...
    max_slot_wait_s: float = Field(default=300, ge=0)
    # ... which is re-read at most this often while waiting.
    status_poll_s: float = Field(default=15.0, gt=0)
    user_agent: str = "mapgap/0.1 (OSM gap finder; https://github.com/mapgap/mapgap)"


class AlignConfig(Strict):
    """Align the labels to the imagery before training, and OSM before dedup (see
    mapgap.tasks.alignment): per block of tiles, the shift of the labels within
    ``max_shift_m`` that best matches a reference model's probabilities."""

    # The reference model: models:/<name>@<alias|version> or a checkpoint path. A
    # model trained on other imagery or on labels known to be aligned: one trained
    # on this run's offset labels has learned part of their offset.
    model: str
    # Classes to align (default: every area class the model predicts).
    classes: list[str] | None = None
    max_shift_m: float = Field(default=3.0, gt=0, le=30)
    # Offsets are measured per parent tile this many zooms up (2: 4 x 4 tiles).
    block_zoom_offset: int = Field(default=2, ge=0, le=10)
    # A block's own offset is used only with this many label pixels and a clear peak.
    min_support: int = Field(default=500, ge=1)
    min_prominence: float = Field(default=0.02, ge=0)

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, v: str, info: ValidationInfo) -> str:
        if v.startswith("models:/"):
            return v
        return resolve_path(v, info, must_exist=False)


class LabelsConfig(Strict):
    # A .osm.pbf / .osm / .osm.bz2 file or a vector file (GeoJSON, GeoPackage,
    # GeoParquet; one with a class column, or a path template with "{class}"),
    # local, s3:// or http(s)://; a local folder of <class>.<ext> files; or an
    # Overpass endpoint: any http(s) URL without one of those suffixes.
    source: str
    class_column: str = "class"
    overpass: OverpassConfig = OverpassConfig()
    # Pixels within this distance of any feature edge set to 255 (ignored by the loss).
    edge_ignore_px: int = Field(default=0, ge=0)
    # Also write a signed-distance target per tile (RunLayout.signed_distance):
    # uint8, 128 on the edge, 128 + 127*d/clip inside, below 128 outside.
    signed_distance: bool = False
    signed_distance_clip_px: int = Field(default=16, ge=1)
    # Tiles rasterized per Prefect task.
    tiles_per_task: int = Field(default=512, ge=1)
    # Where OSM is complete (see mapgap.tasks.complete_areas): a GeoJSON file of
    # polygons, or tile keys z{z}_{x}_{y}. Outside them background is "ignore" in
    # the masks, and hard-negative mining only mines inside them.
    complete_areas: str | list[str] | None = None
    # Shift the labels onto the imagery (the align stage, after fetch); off by default.
    align: AlignConfig | None = None

    @field_validator("source")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        source_kind(v)  # an unsupported scheme is a config error, not a late surprise
        return resolve_path(v, info, must_exist="{class}" not in v)

    @field_validator("complete_areas")
    @classmethod
    def _areas(cls, v: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        if isinstance(v, str):
            path = resolve_path(v, info)
            read_aoi_file(path)  # a broken file fails the load, not the harvest
            return path
        if v is not None:
            bad = [k for k in v if not _TILE_KEY.match(k)]
            if bad:
                raise ValueError(f"not a tile key (expected z<z>_<x>_<y>): {bad[0]!r}")
            if not v:
                raise ValueError("an empty tile list: no area where OSM is complete")
        return v

    @property
    def kind(self) -> Literal["osm", "overpass", "vector"]:
        return source_kind(self.source)


def source_kind(source: str) -> Literal["osm", "overpass", "vector"]:
    """What a labels source is, by the suffix of its path first: an OSM or vector
    file may be served over HTTP too (``https://host/labels.geojson``); any other
    http(s) URL is an Overpass endpoint (``https://host/api/interpreter``)."""
    parts = urlsplit(source) if is_uri(source) else None
    scheme = parts.scheme.lower() if parts else ""
    if scheme not in ("", "http", "https", "s3"):
        raise ValueError(f"unsupported URI scheme: {source}")
    path = (parts.path if parts else source).lower()
    if path.endswith(OSM_SUFFIXES):
        return "osm"
    if path.endswith(VECTOR_SUFFIXES):
        return "vector"
    if scheme in ("http", "https"):
        return "overpass"
    return "vector"  # a folder of <class>.<ext> files, a "{class}" template


@cache
def class_presets() -> dict[str, ClassSpec]:
    """The recommended classes of conf/classes.yaml (building, road, parking)."""
    data = yaml.safe_load((Path(__file__).parent / "classes.yaml").read_text())
    return {name: ClassSpec.model_validate(block) for name, block in data.items()}
