"""The one config model for a whole pipeline run, and its loader.

A bad config is reported as a single line naming the file, the field and the
problem (see :class:`ConfigError`); the CLI turns that into exit code 2.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from mapgap.conf.base import Strict, resolve_path
from mapgap.conf.imagery import ImageryConfig
from mapgap.conf.inference import DedupConfig, InferenceConfig
from mapgap.conf.labels import ClassSpec, LabelsConfig
from mapgap.conf.mining import MiningConfig
from mapgap.conf.training import PackConfig, TrainConfig

MAX_LAT = 85.0511287798  # web-mercator limit
AOI_FORMS = "expected 4 numbers [west, south, east, north] or a GeoJSON file path"


class ConfigError(ValueError):
    """One line: ``<file>: <field>: <what is wrong>``."""


class StorageConfig(Strict):
    # Local folder (relative to the config file) or s3://bucket/prefix.
    root: str = "../mapgap-out"

    @field_validator("root")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        return resolve_path(v, info, must_exist=False)


class RunnerConfig(Strict):
    kind: Literal["thread", "process", "dask", "ray"] = "thread"
    # Dask scheduler / Ray cluster address; None starts a local cluster.
    address: str | None = None
    workers: int = Field(default=2, ge=1)


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    storage: StorageConfig = StorageConfig()
    # [west, south, east, north] in lon/lat, or a GeoJSON file of polygons.
    aoi: tuple[float, float, float, float] | str
    zoom: int = Field(ge=0, le=24)
    tile_size: Literal[256, 512] = 256
    classes: list[ClassSpec] = Field(min_length=1)
    labels: LabelsConfig
    imagery: ImageryConfig
    pack: PackConfig = PackConfig()
    train: TrainConfig = TrainConfig()
    mining: MiningConfig = MiningConfig()
    inference: InferenceConfig = InferenceConfig()
    dedup: DedupConfig = DedupConfig()
    runner: RunnerConfig = RunnerConfig()

    @field_validator("aoi", mode="before")
    @classmethod
    def _aoi_form(cls, v: Any) -> Any:
        # Checked before the union so a wrong shape gets one readable message,
        # not one error per union member.
        is_number = [isinstance(x, int | float) and not isinstance(x, bool) for x in v] \
            if isinstance(v, list | tuple) else []
        if isinstance(v, str) or (len(is_number) == 4 and all(is_number)):
            return v
        raise ValueError(f"{AOI_FORMS}, got {v!r}"[:160])

    @field_validator("aoi")
    @classmethod
    def _check_aoi(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str):
            return resolve_path(v, info)
        w, s, e, n = v
        if not (-180 <= w < e <= 180):
            raise ValueError(
                f"bbox longitudes must satisfy -180 <= west < east <= 180, got {w}, {e}"
            )
        if not (-MAX_LAT <= s < n <= MAX_LAT):
            raise ValueError(
                f"bbox latitudes must satisfy -{MAX_LAT:.2f} <= south < north <= {MAX_LAT:.2f},"
                f" got {s}, {n}"
            )
        return v

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, v: list[ClassSpec]) -> list[ClassSpec]:
        names = [c.name for c in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate class names: {', '.join(dupes)}")
        return v

    @property
    def run_uri(self) -> str:
        """Everything this run writes lives under here."""
        from mapgap import storage

        return storage.join(self.storage.root, "runs", self.name)

    @cached_property
    def aoi_geometry(self) -> BaseGeometry:
        """The AOI as one lon/lat (multi)polygon."""
        if not isinstance(self.aoi, str):
            return box(*self.aoi)
        return read_aoi_file(self.aoi)

    def class_named(self, name: str) -> ClassSpec:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(f"no class named {name!r} (have: {', '.join(c.name for c in self.classes)})")


def read_aoi_file(path: str) -> BaseGeometry:
    from mapgap import storage

    try:
        data = json.loads(storage.read_text(path))
        feats = data["features"] if data.get("type") == "FeatureCollection" else [data]
        geoms = [shape(f.get("geometry", f)) for f in feats]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path}: not a GeoJSON polygon AOI ({err})") from None
    geom = unary_union([g for g in geoms if g.area > 0])
    if geom.is_empty:
        raise ConfigError(f"{path}: AOI has no polygon with area")
    return geom


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error", "assertion_error") and "input" in err:
        msg += f" (got {err['input']!r})"[:160]
    return msg


def validate_config(data: Any, source: str, base_dir: Path) -> PipelineConfig:
    """Validate a parsed YAML document; errors become one-line ConfigErrors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        where = _field_path(first["loc"])
        raise ConfigError(f"{source}: {where}: {_message(first)}{more}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a YAML config (safe_load); relative paths are relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}invalid YAML ({getattr(err, 'problem', err)})") from None
    if overrides and isinstance(data, dict):
        data = deep_merge(data, overrides)
    return validate_config(data, str(path), path.resolve().parent)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        both_maps = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both_maps else v
    return out
