"""Shared pieces of the config models: strictness and path resolution."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
