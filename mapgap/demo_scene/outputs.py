"""Writers for the scene's files; each lands atomically so readers never see half a file.

Nothing written here carries a timestamp, so the same seed reproduces the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import mercantile
import numpy as np
import rasterio
from PIL import Image
from shapely.geometry import Polygon

from mapgap.demo_scene.render import Grid

TILE = 256
OSM_OUTLINE = (255, 225, 0)  # preview colour of buildings present in the PBF
WITHHELD_OUTLINE = (255, 0, 200)  # preview colour of buildings withheld from it


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary name beside `target` (same suffixes) that replaces it on success."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                suffix="".join(target.suffixes))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb, "RGB").save(path, format="PNG", compress_level=1)


def write_png(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        _png(tmp, rgb)


def write_geotiff(path: Path, rgb: np.ndarray, grid: Grid) -> None:
    profile = {
        "driver": "GTiff", "width": grid.width, "height": grid.height, "count": 3,
        "dtype": "uint8", "crs": "EPSG:3857", "transform": grid.transform(), "tiled": True,
        "blockxsize": TILE, "blockysize": TILE, "compress": "deflate", "photometric": "RGB",
        "interleave": "pixel",
    }
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(np.moveaxis(rgb, -1, 0))


def write_tiles(tiles_dir: Path, rgb: np.ndarray, tiles: Sequence[mercantile.Tile]) -> None:
    """Cut {z}/{x}/{y}.png from the raster, whose top-left is the first tile's corner.

    The whole tree is built under a temporary name and swapped in, so no stale tile of an
    earlier run (other zoom or extent) survives.
    """
    x0, y0 = min(t.x for t in tiles), min(t.y for t in tiles)
    staging = Path(tempfile.mkdtemp(dir=tiles_dir.parent, prefix=f".{tiles_dir.name}."))
    try:
        for t in tiles:
            folder = staging / str(t.z) / str(t.x)
            folder.mkdir(parents=True, exist_ok=True)
            r, c = (t.y - y0) * TILE, (t.x - x0) * TILE
            _png(folder / f"{t.y}.png", np.ascontiguousarray(rgb[r: r + TILE, c: c + TILE]))
        for d in (staging, *staging.rglob("*")):
            if d.is_dir():
                d.chmod(0o755)
        old = tiles_dir.with_name(f".{tiles_dir.name}.old.{os.getpid()}")
        if tiles_dir.exists():
            os.replace(tiles_dir, old)
        os.replace(staging, tiles_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_geojson(path: Path, features: list[dict[str, Any]]) -> None:
    text = json.dumps({"type": "FeatureCollection", "features": features},
                      separators=(",", ":"), sort_keys=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def write_preview(path: Path, rgb: np.ndarray, grid: Grid, mapped: Sequence[Polygon],
                  withheld: Sequence[Polygon], size: int = 1024) -> None:
    """The scene at about `size` px with OSM and withheld building outlines drawn on it."""
    scale = min(1.0, size / max(grid.width, grid.height))
    img = cv2.resize(rgb, (round(grid.width * scale), round(grid.height * scale)),
                     interpolation=cv2.INTER_AREA)
    fixed = 16  # cv2 sub-pixel coordinates with shift=4
    for polys, colour in ((mapped, OSM_OUTLINE), (withheld, WITHHELD_OUTLINE)):
        rings = []
        for poly in polys:
            for ring in (poly.exterior, *poly.interiors):
                xy = np.asarray(ring.coords)
                px = np.column_stack([(xy[:, 0] - grid.west), (grid.north - xy[:, 1])])
                rings.append(np.rint(px / grid.res * scale * fixed).astype(np.int32))
        cv2.polylines(img, rings, True, colour, 1, cv2.LINE_AA, shift=4)
    write_png(path, img)
