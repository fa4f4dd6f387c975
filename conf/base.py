"""Shared pieces of the config models: strictness and path resolution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union


class ConfigError(ValueError):
    """One line: ``<file>: <field>: <what is wrong>``."""


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default.

    So is a YAML boolean where a number belongs: pydantic would read ``zoom: true``
    as 1, which is never what the author meant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name and _numeric_only(cls.model_fields[info.field_name].annotation):
            found = _find_bool(value)
            if found is not None:
                raise ValueError(f"expected a number, got {str(found).lower()}")
        return value


def _numeric_only(annotation: Any) -> bool:
    """True when a field holds numbers (maybe in lists/dicts) and never a bool or a model."""
    leaves = _leaf_types(annotation)
    has_number = bool(leaves & {int, float})
    return has_number and bool not in leaves and not any(
        isinstance(t, type) and issubclass(t, BaseModel) for t in leaves
    )


def _leaf_types(annotation: Any) -> set[Any]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {type(a) for a in args}
    if origin is Annotated:  # Annotated[int, Field(ge=0)]: only the type counts
        return _leaf_types(args[0])
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


def _find_bool(value: Any) -> bool | None:
    """The first bool in a (nested) YAML value, or None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return next((b for b in map(_find_bool, value) if b is not None), None)
    return None


def is_uri(value: str) -> bool:
    return "://" in value


def resolve_path(value: str, info: ValidationInfo, *, must_exist: bool = True) -> str:
    """Resolve a local path against the config file's folder; leave URIs alone."""
    if is_uri(value):
        return value
    base = Path((info.context or {}).get("base_dir", "."))
    path = (base / value).expanduser().resolve()
    if must_exist and not path.exists():
        raise ValueError(f"file not found: {path}")
    return str(path)


def read_aoi_file(path: str) -> BaseGeometry:
    """The union of a GeoJSON file's polygons (the AOI, complete areas), lon/lat."""
    from mapgap import storage

    try:
        data = json.loads(storage.read_text(path))
        feats = data["features"] if data.get("type") == "FeatureCollection" else [data]
        geoms = [shape(f.get("geometry", f)) for f in feats]
    except storage.StorageError as err:
        raise ConfigError(str(err)) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        detail = " ".join(str(err).split())[:160]
        raise ConfigError(f"{path}: not a GeoJSON file of polygons ({detail})") from None
    geom = unary_union([g for g in geoms if g.area > 0])
    if geom.is_empty:
        raise ConfigError(f"{path}: no polygon with area")
    return geom
