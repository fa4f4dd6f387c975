"""Rasterize scaling: masks for N tiles, then for 4N tiles (the same centre, twice
the width and height) of real Liechtenstein labels (buildings, roads, parking),
the whole real thing per batch: bbox read of the GeoParquet row groups, STRtree,
burn, PNG write, stats. Timed in the same process; cost linear in tiles +
features means a ratio near 4 (a little less: the outer ring is less dense).

Last line: ``rasterize_scaling_4x=<time(4N) / time(N)>`` (goal <= 4.5).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import mercantile
from shapely.geometry import box

from mapgap import grid
from mapgap.conf.labels import class_presets
from mapgap.layout import RunLayout
from mapgap.tasks.labels import write_outputs
from mapgap.tasks.osm import harvest_osm
from mapgap.tasks.rasterize import RasterSpec, order_tiles, rasterize_tiles

PBF = Path(__file__).resolve().parents[2] / "shared" / "data" / "osm" / "liechtenstein.osm.pbf"
CENTRE = (9.5209, 47.1410)  # Vaduz
ZOOM = 18
SIDE = 16  # N = SIDE^2 tiles, 4N = (2 SIDE)^2
TILES_PER_TASK = 256
ROUNDS = 3


def square(side: int) -> list[grid.Tile]:
    c = mercantile.tile(*CENTRE, ZOOM)
    x0, y0 = c.x - side // 2, c.y - side // 2
    return [grid.Tile(x, y, ZOOM) for x in range(x0, x0 + side) for y in range(y0, y0 + side)]


def run(layout: RunLayout, tiles: list[grid.Tile], labels: dict[str, str],
        spec: RasterSpec) -> tuple[float, int]:
    """Batches as the flow cuts them; returns seconds and features drawn."""
    t0 = time.perf_counter()
    touched = 0
    for batch in grid.iter_batches(order_tiles(tiles), TILES_PER_TASK):
        stats = rasterize_tiles(layout, batch, labels, spec)
        touched += sum(sum(s["features"].values()) for s in stats.values())
    return time.perf_counter() - t0, touched


def main() -> None:
    if not PBF.exists():
        sys.exit(f"missing sample data: {PBF}")
    classes = list(class_presets().values())
    small, large = square(SIDE), square(2 * SIDE)
    with tempfile.TemporaryDirectory(prefix="mapgap-bench-") as tmp:
        layout = RunLayout(tmp)
        bounds = [grid.tile_bounds(t) for t in large]
        aoi = box(min(b[0] for b in bounds), min(b[1] for b in bounds),
                  max(b[2] for b in bounds), max(b[3] for b in bounds))
        summary = write_outputs(harvest_osm(str(PBF), classes, aoi), layout, str(PBF))
        labels = {c: v["uri"] for c, v in summary["classes"].items()}
        spec = RasterSpec(classes=tuple(c.name for c in classes),
                          priorities=tuple(c.priority for c in classes), edge_ignore_px=1)
        run(layout, small[:16], labels, spec)  # warm-up
        best = {}
        for _ in range(ROUNDS):
            for name, tiles in (("N", small), ("4N", large)):
                seconds, touched = run(layout, tiles, labels, spec)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, touched)
    for name, tiles in (("N", small), ("4N", large)):
        seconds, touched = best[name]
        print(f"{name:>2}: {len(tiles):5d} tiles, {touched:6d} feature-tile hits, {seconds:.3f} s"
              f" ({1000 * seconds / len(tiles):.2f} ms/tile)")
    print(f"rasterize_scaling_4x={best['4N'][0] / best['N'][0]:.3f}")


if __name__ == "__main__":
    main()
