"""Harvest speed: buildings + roads + parking from liechtenstein.osm.pbf, the
whole real thing (osmium pass with areas, class logic, metric buffers, AOI clip,
GeoParquet + summary written), against a bare pyosmium pass over the same file
with node locations (every object handed to Python, as any pyosmium script
does), timed alternately in the same process. The machine is shared, so each
round times the two back to back and the result is the median of the rounds'
ratios (robust to a round disturbed by other work).

Last line: ``harvest_vs_bare_pass=<harvest time / bare pass time>`` (goal <= 1.5).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import osmium
from shapely.geometry import box

from mapgap.conf.labels import class_presets
from mapgap.layout import RunLayout
from mapgap.tasks.labels import write_outputs
from mapgap.tasks.osm import file_bbox, harvest_osm

PBF = Path(__file__).resolve().parents[2] / "shared" / "data" / "osm" / "liechtenstein.osm.pbf"
ROUNDS = 7


def bare_pass(path: Path) -> int:
    n = 0
    for _ in osmium.FileProcessor(str(path)).with_locations():
        n += 1
    return n


def cxx_pass(path: Path) -> None:
    """For reference only: locations without a single object reaching Python."""
    osmium.apply(str(path), osmium.NodeLocationsForWays(osmium.index.create_map("flex_mem")))


def harvest(path: Path, out: str) -> dict:
    classes = list(class_presets().values())
    aoi = file_bbox(path, str(path)) or box(-180, -85, 180, 85)
    return write_outputs(harvest_osm(str(path), classes, aoi), RunLayout(out), str(path))


def timed(fn, *args) -> float:  # noqa: ANN001 - tiny helper
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    if not PBF.exists():
        sys.exit(f"missing sample data: {PBF}")
    with tempfile.TemporaryDirectory(prefix="mapgap-bench-") as tmp:
        summary = harvest(PBF, tmp)  # warm-up: imports, file cache
        bare_pass(PBF)
        bare, real, cxx = [], [], []
        for _ in range(ROUNDS):
            bare.append(timed(bare_pass, PBF))
            real.append(timed(harvest, PBF, tmp))
            cxx.append(timed(cxx_pass, PBF))
    counts = {c: v["features"] for c, v in summary["classes"].items()}
    ratios = [h / b for h, b in zip(real, bare, strict=True)]
    print(f"features: {counts}")
    print(f"bare pyosmium pass with locations: median {statistics.median(bare):.3f} s"
          f" (min {min(bare):.3f})")
    print(f"harvest + GeoParquet:              median {statistics.median(real):.3f} s"
          f" (min {min(real):.3f})")
    print(f"per-round ratios: {' '.join(f'{r:.2f}' for r in sorted(ratios))}")
    print(f"reference, C++-only locations pass: median {statistics.median(cxx):.3f} s")
    print(f"harvest_vs_bare_pass={statistics.median(ratios):.3f}")

if __name__ == "__main__":
    main()
