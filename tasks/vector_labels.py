"""Harvest labels from the user's own vector files (GeoJSON, GeoPackage,
GeoParquet, anything pyogrio reads), in any CRS (reprojected to lon/lat).

Which rows belong to which class, in this order:

1. one file per class: ``source`` is a folder of ``<class>.<ext>`` files or a
   path template containing ``{class}``: every row of a class's file;
2. a ``labels.class_column`` column (default ``class``): rows whose value is
   the class name;
3. columns named like the class's include keys (an OSM export with one column
   per tag): the class's tag filter, exactly as for OSM data;
4. a single configured class: every row.

Then the shared class logic runs (line classes are buffered in metres, AOI
clip, repair), so a file of road centre lines works like OSM ways.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shapely.geometry.base import BaseGeometry

from mapgap import grid, storage
from mapgap.conf.labels import VECTOR_SUFFIXES, ClassSpec
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.tasks.labels import (
    ClassCollector,
    Harvester,
    HarvestResult,
    LabelError,
    aoi_from_wkb,
    check_aoi,
    write_outputs,
)

_OSM_REF = re.compile(r"^(node|way|relation)/(\d+)$")


class VectorLabelError(LabelError):
    pass


def class_files(source: str, names: list[str]) -> dict[str, str | None] | None:
    """Class -> file for one-file-per-class sources (None for a class without a
    file); None when ``source`` is a single file."""
    if "{class}" in source:
        files = {n: source.replace("{class}", n) for n in names}
        return {n: uri if storage.exists(uri) else None for n, uri in files.items()}
    if storage.is_remote(source) or not Path(source).is_dir():
        return None
    found: dict[str, str | None] = {}
    for n in names:
        candidates = [Path(source, n + s) for s in VECTOR_SUFFIXES]
        found[n] = next((str(p) for p in candidates if p.exists()), None)
    if not any(found.values()):
        raise VectorLabelError(f"{source}: folder has no <class>.<ext> file for any of the classes"
                               f" {', '.join(names)} (ext: {', '.join(VECTOR_SUFFIXES)})")
    return found


def read_vector(uri: str) -> Any:
    """A vector file as a GeoDataFrame in EPSG:4326."""
    import geopandas as gpd

    suffix = Path(urlsplit(uri).path if storage.is_remote(uri) else uri).suffix.lower()
    try:
        with storage.local_file(uri, suffix) as path:
            if suffix in (".parquet", ".geoparquet"):
                frame = gpd.read_parquet(path)
            else:
                frame = gpd.read_file(path)
    except storage.StorageError:
        raise
    except Exception as err:  # pyogrio/pyarrow raise many types for unreadable files
        detail = " ".join(str(err).split())[:200]
        raise VectorLabelError(f"{uri}: not a readable vector file ({detail})") from None
    if frame.crs is None:
        w, s, e, n = frame.total_bounds if len(frame) else (0, 0, 0, 0)
        if not (-180 <= w <= e <= 180 and -90 <= s <= n <= 90):
            raise VectorLabelError(f"{uri}: no CRS, and coordinates are not lon/lat")
        frame = frame.set_crs(grid.WGS84)
    return frame.to_crs(grid.WGS84)


def _row_tags(record: dict[str, Any]) -> dict[str, str]:
    """Non-empty properties as OSM-like string tags (NaN, None and "" are absent)."""
    tags = {}
    for k, v in record.items():
        if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
            continue
        tags[str(k)] = str(v)
    return tags


def _osm_ref(tags: dict[str, str], row: int) -> tuple[str, int]:
    """(osm_type, osm_id) from ``@id``/``id`` like "way/123", or a numeric
    ``osm_id``/``@id`` with ``osm_type``/``@type`` ("unknown" without one);
    else ("feature", the row number in the file)."""
    for key in ("@id", "id"):
        m = _OSM_REF.match(tags.get(key, ""))
        if m:
            return m.group(1), int(m.group(2))
    for id_key, type_key in (("osm_id", "osm_type"), ("@id", "@type")):
        try:
            return tags.get(type_key, "unknown"), int(float(tags[id_key]))
        except (KeyError, ValueError):
            continue
    return "feature", row


def _add_rows(col: ClassCollector, frame: Any, use_filter: bool) -> None:
    records = frame.drop(columns=frame.geometry.name).to_dict("records")
    for row, (record, geom) in enumerate(zip(records, frame.geometry.values, strict=True)):
        tags = _row_tags(record)
        used = col.match(tags) if use_filter else col.used(tags)
        if used is None:
            continue
        if geom is None or geom.is_empty:
            col.skip("skipped_geometry")
            continue
        osm_type, osm_id = _osm_ref(tags, row)
        col.add(osm_type, osm_id, used, geom)


def harvest_vector(source: str, specs: list[ClassSpec], class_column: str,
                   aoi: BaseGeometry) -> HarvestResult:
    aoi = check_aoi(aoi)
    harvester = Harvester(specs)
    names = [s.name for s in specs]
    per_class = class_files(source, names)
    if per_class is not None:
        for name, uri in per_class.items():
            if uri is None:
                harvester.warn(f"{source}: no file for class {name!r}")
            else:
                _add_rows(harvester.collectors[name], read_vector(uri), use_filter=False)
        return harvester.finish(aoi)

    frame = read_vector(source)
    for name, col in harvester.collectors.items():
        if class_column in frame.columns:
            _add_rows(col, frame[frame[class_column].astype(str) == name], use_filter=False)
        elif set(col.spec.tags.include) & set(frame.columns):
            _add_rows(col, frame, use_filter=True)
        elif len(specs) == 1:
            _add_rows(col, frame, use_filter=False)
        else:
            raise VectorLabelError(
                f"{source}: no column {class_column!r} (labels.class_column) and no tag column"
                f" ({', '.join(col.spec.tags.include)}) to find class {name!r}")
    return harvester.finish(aoi)


@stage_task(name="harvest-vector")
def harvest_vector_task(source: str, fingerprint: str, classes: list[ClassSpec],
                        class_column: str, aoi_wkb: str, run_uri: str) -> dict[str, Any]:
    """``fingerprint`` (size/mtime) is only part of the cache key."""
    result = harvest_vector(source, classes, class_column, aoi_from_wkb(aoi_wkb))
    return write_outputs(result, RunLayout(run_uri), source)

