"""The one config model for a whole pipeline run, and its loader.

A bad config is reported as a single line naming the file, the field and the
problem (see :class:`ConfigError`); the CLI turns that into exit code 2.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from mapgap import grid
from mapgap.conf.base import ConfigError, Strict, read_aoi_file, resolve_path
from mapgap.conf.imagery import ImageryConfig
from mapgap.conf.inference import DedupConfig, InferenceConfig
from mapgap.conf.labels import ClassSpec, LabelsConfig
from mapgap.conf.mining import MiningConfig
from mapgap.conf.training import PackConfig, TrainConfig

MAX_LAT = 85.0511287798  # web-mercator limit
AOI_FORMS = "expected 4 numbers [west, south, east, north] or a GeoJSON file path"


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
    # The most AOI tiles a run may have (~2 M tiles: ~130 GB of 256 px imagery,
    # ~5 km x 5 km... 300 km x 300 km from zoom 20 to 15). Checked at load from the
    # AOI's bounds: a continent at zoom 18 fails here, not hours into harvest.
    max_tiles: int = Field(default=2_000_000, ge=1)
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
            path = resolve_path(v, info)
            read_aoi_file(path)  # a broken file is a config error now, not in the flow
            return path
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

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        """Checks across fields; each message starts with the field it is about."""
        self._check_tile_count()
        names = [c.name for c in self.classes]
        for field, chosen in (("train.classes", self.train.classes),
                              ("labels.align.classes",
                               self.labels.align and self.labels.align.classes)):
            unknown = [c for c in chosen or [] if c not in names]
            if unknown:
                raise ValueError(f"{field}: unknown class {unknown[0]!r}"
                                 f" (classes: {', '.join(names)})")
        if self.labels.kind in ("osm", "overpass"):
            for i, c in enumerate(self.classes):
                if not c.tags_given:
                    raise ValueError(
                        f"classes[{i}].tags: required with an {self.labels.kind.upper()} labels"
                        f" source (which OSM tags make a {c.name!r}?), e.g."
                        f" tags: {{include: {{{c.name}: '*'}}}}")
        self._check_complete_areas()
        return self

    def _check_tile_count(self) -> None:
        count = grid.geometry_tile_bound(self.aoi_geometry, self.zoom)
        if count > self.max_tiles:
            raise ValueError(
                f"aoi: up to {count:,} tiles at zoom {self.zoom}, more than max_tiles="
                f"{self.max_tiles:,}: split the AOI into several runs, lower the zoom, or"
                f" raise max_tiles if this machine can hold that many tiles")

    def _check_complete_areas(self) -> None:
        areas = self.labels.complete_areas
        if areas is not None and not isinstance(areas, str):  # files: LabelsConfig reads them
            total = 0
            for key in areas:
                z = grid.parse_tile_key(key).z
                if z > self.zoom:
                    raise ValueError(f"labels.complete_areas: tile {key} is finer than the"
                                     f" run's zoom {self.zoom}")
                total += 4 ** (self.zoom - z)
            if total > self.max_tiles:
                raise ValueError(f"labels.complete_areas: {total:,} tiles at zoom {self.zoom},"
                                 f" more than max_tiles={self.max_tiles:,}")

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


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


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
        # a default computed from a field that failed is not a second problem
        errs = [e for e in exc.errors() if e["type"] != "default_factory_not_called"]
        first = errs[0]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        # a check across fields (no location) names its field in its message
        where = _field_path(first["loc"]) + ": " if first["loc"] else ""
        raise ConfigError(f"{source}: {where}{_message(first)}{more}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a YAML config (safe_load); relative paths are relative to its folder."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x});"
                          " save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}invalid YAML ({getattr(err, 'problem', err)})") from None
    if overrides and isinstance(data, dict):
        data = deep_merge(data, overrides)
    cfg = validate_config(data, str(path), path.resolve().parent)
    check_environment(cfg, str(path))
    return cfg


def check_environment(cfg: PipelineConfig, source: str) -> None:
    """What the config needs from this machine's environment, checked before
    anything runs (the config itself names the variable, never the secret)."""
    env = cfg.imagery.api_key_env
    if env and not os.environ.get(env):
        raise ConfigError(f"{source}: imagery.api_key_env: environment variable {env} is not"
                          " set (it holds the key for {key} in imagery.source / headers)")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        both_maps = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both_maps else v
    return out
