"""Small scenes shared by the inference, dedup and review tests: a config on a
temp run dir, imagery tiles cut from a mosaic, OSM labels, a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from mapgap import storage
from mapgap.conf.schema import PipelineConfig, deep_merge, validate_config
from mapgap.grid import Tile
from mapgap.layout import RunLayout

SIZE = 256
Z = 18
ORIGIN = Tile(131072, 131072, Z)  # just south-east of (0, 0): 1 mercator unit ~ 1 m


def tile_lonlat(x: float, y: float, z: int = Z) -> tuple[float, float]:
    """Lon/lat of a (fractional) tile corner."""
    import math

    return x / 2**z * 360 - 180, math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / 2**z))))


def make_config(tmp_path: Path, cols: int = 2, rows: int = 2, **overrides: Any) -> PipelineConfig:
    """A building-class config whose AOI is exactly ``cols`` x ``rows`` tiles at ORIGIN."""
    labels = tmp_path / "labels.geojson"
    labels.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    w, n = tile_lonlat(ORIGIN.x, ORIGIN.y)
    e, s = tile_lonlat(ORIGIN.x + cols, ORIGIN.y + rows)
    data = {
        "name": "t", "storage": {"root": str(tmp_path / "out")}, "aoi": [w, s, e, n], "zoom": Z,
        "tile_size": SIZE,
        "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
        "labels": {"source": str(labels)}, "imagery": {"source": str(tmp_path / "{z}/{x}/{y}.png")},
        "inference": {"loader_workers": 0, "batch_size": 2},
        "runner": {"kind": "thread", "workers": 1},
    }
    return validate_config(deep_merge(data, overrides), "test.yaml", tmp_path)


def write_mosaic(layout: RunLayout, mosaic: np.ndarray, origin: Tile = ORIGIN,
                 missing: set[tuple[int, int]] = frozenset()) -> list[Tile]:
    """Cut an RGB mosaic into PNG tiles at ``origin``; (col, row) in ``missing`` are skipped."""
    tiles = []
    for r in range(mosaic.shape[0] // SIZE):
        for c in range(mosaic.shape[1] // SIZE):
            if (c, r) in missing:
                continue
            t = Tile(origin.x + c, origin.y + r, origin.z)
            img = mosaic[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE]
            ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            storage.write_bytes(layout.image(t), buf.tobytes())
            tiles.append(t)
    return tiles


def constant_checkpoint(path: Path, logit: float = 8.0) -> str:
    """A real mapgap checkpoint whose model answers sigmoid(logit) everywhere."""
    from mapgap.models.segmentation import SegmentationModel, save_checkpoint

    model = SegmentationModel(["building"], width=4, depth=2)
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.fill_(logit)
    return save_checkpoint(model, str(path))


def write_labels(layout: RunLayout, geoms: list[Any], class_name: str = "building") -> str:
    """OSM labels as the harvest stage writes them (GeoParquet, JSON tags)."""
    import geopandas as gpd

    from mapgap.tasks.labels import write_geoparquet

    frame = gpd.GeoDataFrame({
        "class": [class_name] * len(geoms), "osm_id": np.arange(1, len(geoms) + 1),
        "osm_type": ["way"] * len(geoms), "tags": [json.dumps({"building": "yes"})] * len(geoms),
        "width_m": [None] * len(geoms)}, geometry=list(geoms), crs="EPSG:4326")
    return write_geoparquet(frame, layout.labels(class_name))["uri"]


class BrightnessNet(nn.Module):
    """A stand-in segmentation model: 'buildings' are bright. A 9x9 mean filter
    (zero padded, like any conv net) then a steep sigmoid, so without context a
    pixel at a tile border sees zeros and goes dark."""

    def __init__(self) -> None:
        super().__init__()
        self.classes = ["building"]
        self.box = nn.Conv2d(1, 1, 9, padding=4, bias=False)
        nn.init.constant_(self.box.weight, 1 / 81)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.box(x.mean(dim=1, keepdim=True)) - 0.7) * 20)
