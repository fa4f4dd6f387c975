"""A small synthetic town run through the real predict -> vectorize -> dedup ->
review code, for the Chromium rendering test and the README screenshot."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import shapely

from mapgap.layout import RunLayout
from mapgap.tasks.dedup import dedup_class
from mapgap.tasks.predict import PredictSettings, predict_tiles
from mapgap.tasks.review import write_review
from mapgap.tasks.vectorize import (
    VectorSettings,
    finish,
    merge_and_write,
    vectorize_tiles,
    write_pieces,
)
from tests.helpers_inference import (
    ORIGIN,
    SIZE,
    BrightnessNet,
    make_config,
    tile_lonlat,
    write_labels,
    write_mosaic,
)

COLS, ROWS = 3, 2
ROOFS = [(236, 226, 212), (244, 204, 176), (222, 224, 228), (240, 236, 220)]


def _town(rng: np.random.Generator) -> tuple[np.ndarray, list[shapely.Polygon]]:
    """RGB mosaic (grass, two roads, light roofs) and the roofs in mosaic pixels."""
    h, w = ROWS * SIZE, COLS * SIZE
    patches = cv2.resize(rng.normal(0, 1, (h // 16, w // 16)).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_CUBIC)[..., None]
    grain = rng.normal(0, 1, (h, w, 1))
    img = np.clip(np.array([92, 108, 66]) + patches * [18, 16, 8] + grain * [9, 9, 7], 0, 255)
    img[h // 2 - 9:h // 2 + 9, :] = (118, 114, 108)
    img[:, 2 * SIZE - 40:2 * SIZE - 22] = (118, 114, 108)
    roofs = []
    for cy in range(50, h, 96):
        for cx in range(60, w, 92):
            if abs(cy - h // 2) < 40 or abs(cx - (2 * SIZE - 31)) < 45:
                continue
            bw, bh = rng.uniform(34, 58), rng.uniform(26, 40)
            roof = shapely.affinity.rotate(shapely.box(-bw / 2, -bh / 2, bw / 2, bh / 2),
                                           rng.uniform(-25, 25), origin=(0, 0))
            roof = shapely.affinity.translate(roof, cx + rng.uniform(-8, 8),
                                              cy + rng.uniform(-8, 8))
            pts = np.round(np.asarray(roof.exterior.coords)).astype(np.int32)
            cv2.fillPoly(img, [pts], ROOFS[len(roofs) % len(ROOFS)])
            roofs.append(roof)
    return img.astype(np.uint8), roofs


def _to_lonlat(poly: shapely.Polygon) -> shapely.Polygon:
    return shapely.Polygon([tile_lonlat(ORIGIN.x + x / SIZE, ORIGIN.y + y / SIZE)
                            for x, y in poly.exterior.coords])


def build_review_scene(tmp_path: Path) -> Path:
    """Every 4th roof is missing from OSM, one OSM building was demolished."""
    rng = np.random.default_rng(7)
    cfg = make_config(tmp_path, cols=COLS, rows=ROWS)
    layout = RunLayout(cfg.run_uri)
    mosaic, roofs = _town(rng)
    tiles = write_mosaic(layout, mosaic)
    osm = [_to_lonlat(r) for i, r in enumerate(roofs) if i % 4 != 1]
    osm.append(_to_lonlat(shapely.box(2 * SIZE + 120, 200, 2 * SIZE + 160, 232)))  # demolished
    write_labels(layout, osm)
    predict_tiles(layout, tiles, BrightnessNet(), PredictSettings(tile_size=SIZE, batch_size=6))
    mpp = 2 * math.pi * 6378137 / (2**cfg.zoom * SIZE)
    s = VectorSettings(classes=("building",), zoom=cfg.zoom, tile_size=SIZE, open_px=3,
                       close_px=3, simplify_m=1.5 * mpp, min_area_m2=20,
                       orthogonalize=("building",))
    interior, border = vectorize_tiles(layout, tiles, s)
    pieces = write_pieces(layout.vector_pieces("scene"),
                          {"building": finish(interior["building"], "building", s)}, border)
    merge_and_write(layout, [pieces], s)
    summary = dedup_class(layout, "building", cfg.dedup, cfg.zoom)
    out = write_review(layout, [summary], {"building": {"building": "yes"}},
                       {"run": "synthetic town"}, "tiles/{z}/{x}/{y}.png", cfg.zoom)
    return Path(out["review.html"])
