"""Entry point: a seeded synthetic town (PBF, imagery, tiles, truth) for the offline demo."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mercantile
import numpy as np

from mapgap.demo_scene.layout import Building, plan_town
from mapgap.demo_scene.osm_writer import write_pbf
from mapgap.demo_scene.outputs import (
    TILE,
    write_geojson,
    write_geotiff,
    write_preview,
    write_tiles,
)
from mapgap.demo_scene.render import Grid, render_scene
from mapgap.demo_scene.truth import building_feature, complete_area_features, truth_features

CENTRE = (32.60, 0.35)  # lon, lat: Kampala's outskirts, where a mercator unit is ~1 m
WITHHELD_SHARE = (0.10, 0.15)
UNMAPPED_PATCHES = 3  # neighbourhoods where the withheld buildings are


@dataclass(frozen=True)
class SceneFiles:
    root: Path
    pbf: Path  # root / "town.osm.pbf"
    geotiff: Path  # root / "imagery.tif" (EPSG:3857, RGB uint8, tiled, deflate)
    tiles_dir: Path  # root / "tiles" -> tiles/{z}/{x}/{y}.png, 256 px RGB
    withheld: Path  # root / "withheld.geojson": buildings NOT in the PBF, EPSG:4326
    truth: Path  # root / "truth.geojson": every rendered feature, property "class"
    complete_areas: Path  # root / "complete_areas.geojson": tiles without withheld buildings
    preview: Path  # root / "preview.png": scene at ~1024 px with building outlines
    bbox: tuple[float, float, float, float]  # lon/lat west, south, east, north
    zoom: int


def scene_tiles(zoom: int, size_m: float) -> list[mercantile.Tile]:
    """A square of whole tiles about `size_m` across, centred on CENTRE."""
    centre = mercantile.tile(*CENTRE, zoom)
    side = mercantile.xy_bounds(centre)
    n = max(1, round(size_m / (side.right - side.left)))
    x0, y0 = centre.x - n // 2, centre.y - n // 2
    return [mercantile.Tile(x, y, zoom) for y in range(y0, y0 + n) for x in range(x0, x0 + n)]


def pick_withheld(buildings: Sequence[Building], rng: np.random.Generator) -> frozenset[int]:
    """10-15% of the buildings, the ones nearest a few random points: real gaps in OSM
    come in patches (a new estate, a task nobody took), not scattered one by one."""
    if not buildings:
        return frozenset()
    count = max(1, round(len(buildings) * rng.uniform(*WITHHELD_SHARE)))
    centres = np.array([b.footprint.centroid.coords[0] for b in buildings])
    seeds = centres[rng.choice(len(buildings), min(UNMAPPED_PATCHES, len(buildings)),
                               replace=False)]
    nearest = np.linalg.norm(centres[:, None] - seeds[None], axis=2).min(axis=1)
    return frozenset(buildings[i].id for i in np.argsort(nearest, kind="stable")[:count])


def generate_scene(out_dir: Path, seed: int = 0, zoom: int = 18, *,
                   size_m: float = 1000.0) -> SceneFiles:
    """Plan, render and write the scene; the same seed gives byte-identical files.

    `size_m` (keyword only) shrinks the scene, e.g. for fast tests.
    """
    tiles = scene_tiles(zoom, size_m)
    first, last = tiles[0], tiles[-1]
    ul, lr = mercantile.xy_bounds(first), mercantile.xy_bounds(last)
    n = last.x - first.x + 1
    grid = Grid(ul.left, ul.top, (lr.right - ul.left) / (n * TILE), n * TILE, n * TILE)
    nw, se = mercantile.bounds(first), mercantile.bounds(last)
    bbox = (nw.west, se.south, se.east, nw.north)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    files = SceneFiles(root, root / "town.osm.pbf", root / "imagery.tif", root / "tiles",
                       root / "withheld.geojson", root / "truth.geojson",
                       root / "complete_areas.geojson", root / "preview.png", bbox, zoom)

    plan_rng, render_rng, pick_rng = (np.random.default_rng(s)
                                      for s in np.random.SeedSequence(seed).spawn(3))
    town = plan_town((ul.left, lr.bottom, lr.right, ul.top), plan_rng)
    withheld = pick_withheld(town.buildings, pick_rng)

    rgb = render_scene(town, grid, render_rng)
    write_geotiff(files.geotiff, rgb, grid)
    write_tiles(files.tiles_dir, rgb, tiles)
    osm_ids = write_pbf(files.pbf, town, withheld, bbox)
    write_geojson(files.withheld, [building_feature(b, None) for b in town.buildings
                                   if b.id in withheld])
    write_geojson(files.truth, truth_features(town, osm_ids))
    write_geojson(files.complete_areas, complete_area_features(
        tiles, [b for b in town.buildings if b.id in withheld]))
    write_preview(files.preview, rgb, grid,
                  [b.footprint for b in town.buildings if b.id not in withheld],
                  [b.footprint for b in town.buildings if b.id in withheld])
    return files
