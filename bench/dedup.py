"""Dedup scaling: 25k vs 100k predictions against as many OSM polygons.

Runs the real per-class dedup (read predictions.geojson and the OSM GeoParquet,
STRtree matching both ways, quality grid, write the GeoJSON parts) on a
synthetic town: houses on a jittered lattice, 80% both mapped and predicted
(shifted a little), 10% only predicted (missing from OSM), 10% only in OSM.
Prints ``dedup_scaling_4x=<time(100k) / time(25k)>`` last (goal <= 4.5:
linear-ish, where a pairwise comparison would be 16).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely

from mapgap import storage
from mapgap.conf.inference import DedupConfig
from mapgap.layout import RunLayout
from mapgap.tasks.dedup import dedup_class, tile_indices
from mapgap.tasks.geometry import write_geojson
from mapgap.tasks.predict import encode_probability

Z = 18
LON0, LAT0 = 32.50, 0.30  # Kampala-ish
SPACING_DEG = 25 / 111_320  # a house every ~25 m


def town(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n predictions, n OSM polygons) in lon/lat."""
    side = math.ceil(math.sqrt(n / 0.9))
    k = np.arange(side * side)
    cx = LON0 + (k % side) * SPACING_DEG + rng.uniform(-2, 2, k.size) * 1e-5
    cy = LAT0 + (k // side) * SPACING_DEG + rng.uniform(-2, 2, k.size) * 1e-5
    w, h = rng.uniform(6, 14, k.size) * 9e-6, rng.uniform(6, 12, k.size) * 9e-6
    houses = shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    shift = rng.normal(0, 1.5e-5, (k.size, 2))
    predicted = shapely.transform(houses, lambda xy: xy + np.repeat(shift, 5, axis=0))
    kind = rng.permutation(k.size) % 10  # 0: only predicted, 1: only OSM, else both
    preds = predicted[kind != 1][:n]
    osm = houses[kind != 0][:n]
    return preds, osm


def write_run(root: Path, n: int) -> RunLayout:
    from tests.helpers_inference import write_labels

    layout = RunLayout(str(root / f"run-{n}"))
    preds, osm = town(n, np.random.default_rng(n))
    write_geojson(layout.predictions, preds,
                  [{"class": "building", "score": 0.9, "area_m2": 80.0, "tiles": []}] * n)
    write_labels(layout, list(osm))
    xs, ys = tile_indices(shapely.centroid(np.concatenate([preds, osm])), Z)
    blank = encode_probability(np.zeros((1, 4, 4), np.uint8))
    for x, y in set(zip(xs.tolist(), ys.tolist(), strict=True)):
        storage.write_bytes(storage.join(layout.probabilities, str(Z), str(x), f"{y}.png"), blank)
    return layout


def main() -> None:
    times = {}
    with tempfile.TemporaryDirectory(prefix="mapgap-bench-") as tmp:
        for n in (25_000, 100_000):
            layout = write_run(Path(tmp), n)
            t0 = time.perf_counter()
            summary = dedup_class(layout, "building", DedupConfig(), Z)
            times[n] = time.perf_counter() - t0
            print(f"{n:>7} predictions vs {summary['osm']:>7} OSM: {times[n]:6.2f} s, "
                  f"{summary['candidates']} candidates, {summary['unsupported']} unsupported")
    print(f"dedup_scaling_4x={times[100_000] / times[25_000]:.2f}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.helpers_inference
    main()
