"""Label alignment on real data: the Kampala OpenAerialMap tiles and their 206
hand-drawn buildings (aligned to the imagery to a few pixels).

The labels are moved by a known offset and the estimate must give the
correction back: globally within one pixel, per block (a block holds only 9 to
79 buildings) within two, at zoom 21 (~0.075 m/px) and zoom 20.

What stands in for "a first model's probabilities" (the lead's full training
is too slow for these tests), two ways:

* fast tests: probabilities rendered from the *unshifted* real buildings,
  degraded the way a weak first model errs: 30% of the buildings missed, every
  other one eroded or dilated by up to 0.4 m, 10% as many false blobs (2-4 m)
  at random places, a 0.3 m blur and per-pixel noise (sd 0.1). They exercise
  the estimator on the real geometry of a real place, not on the imagery;
* the slow test: a real model of the imagery, a per-pixel MLP on colour and
  local texture trained (torch, seconds on 1 thread) on the unshifted labels
  and run on every tile: the peak must come from the real roofs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from pyproj import Geod

from mapgap import grid, storage
from mapgap.grid import Tile, tile_key
from mapgap.layout import RunLayout
from mapgap.tasks.alignment import (
    AlignmentError,
    AlignSettings,
    BlockOffset,
    Offsets,
    estimate_offsets,
    offsets_uri,
    read_offsets,
    shift_geometries,
    shift_labels,
    write_offsets,
)
from mapgap.tasks.geometry import project
from mapgap.tasks.labels import write_geoparquet
from mapgap.tasks.predict import encode_probability
from mapgap.tasks.rasterize import burn
from tests.conftest import shared_path

SIZE = 256
_TILE_FILE = re.compile(r"OAM-(\d+)-(\d+)-(\d+)\.png$")


def kampala_tiles(zoom: int) -> list[Tile]:
    """The zoom's imagery tiles of the Kampala sample (the area the labels are for)."""
    found = [_TILE_FILE.search(p.name) for p in shared_path("kampala").iterdir()]
    return sorted((Tile(int(m[1]), int(m[2]), int(m[3])) for m in found
                   if m and int(m[3]) == zoom), key=lambda t: (t.y, t.x))


def kampala_labels() -> object:
    import geopandas as gpd

    frame = gpd.read_file(shared_path("kampala/labels.geojson"))[["geometry"]]
    return frame.assign(**{"class": "building"}).to_crs(grid.WGS84)


def moved(frame: object, east_m: float, north_m: float) -> object:
    """The labels moved on the ground, independently of the code under test:
    a mercator translation scaled by 1/cos(lat) at the data's latitude."""
    lat = math.radians(frame.total_bounds[[1, 3]].mean())
    merc = frame.to_crs(grid.WEB_MERCATOR)
    merc = merc.set_geometry(merc.translate(east_m / math.cos(lat), north_m / math.cos(lat)))
    return merc.to_crs(grid.WGS84)


def degraded_probabilities(frame: object, tiles: list[Tile], seed: int) -> dict[Tile, bytes]:
    """Probability PNGs of a weak first model, rendered from the aligned labels
    (see the module docstring)."""
    rng = np.random.default_rng(seed)
    geoms = project(frame.geometry.values.to_numpy(), grid.WGS84, grid.WEB_MERCATOR)
    found = geoms[rng.random(len(geoms)) >= 0.3]
    found = shapely.buffer(found, rng.uniform(-0.4, 0.4, len(found)), join_style="mitre")
    b = np.array([grid.tile_xy_bounds(t) for t in tiles])
    n_false = round(0.1 * len(geoms))
    centres = shapely.points(rng.uniform(b[:, 0].min(), b[:, 2].max(), n_false),
                             rng.uniform(b[:, 1].min(), b[:, 3].max(), n_false))
    blobs = shapely.buffer(centres, rng.uniform(2.0, 4.0, n_false))
    drawn = np.concatenate([found[~shapely.is_empty(found)], blobs])
    out = {}
    for t in tiles:
        transform = grid.tile_transform(t, SIZE)
        mask = burn(drawn, np.ones(len(drawn), np.uint8), transform, (SIZE, SIZE))
        prob = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.3 / transform.a)
        prob = np.clip(prob + rng.normal(0, 0.1, prob.shape), 0, 1)
        out[t] = encode_probability(np.rint(prob * 255).astype(np.uint8)[None])
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[int, dict[Tile, bytes]]:
    """Degraded probabilities per zoom, rendered once for the module."""
    return {}


def make_run(root: Path, zoom: int, labels: object, rendered: dict[int, dict[Tile, bytes]]
             ) -> RunLayout:
    """A run dir with the (moved) labels and the probabilities of the aligned ones."""
    if zoom not in rendered:
        rendered[zoom] = degraded_probabilities(kampala_labels(), kampala_tiles(zoom), seed=7)
    layout = RunLayout(str(root))
    write_geoparquet(labels, layout.labels("building"))
    for t, data in rendered[zoom].items():
        storage.write_bytes(layout.probability(t), data)
    return layout


def mpp(zoom: int) -> float:
    return grid.metres_per_pixel(kampala_tiles(zoom)[0], SIZE)


@pytest.mark.parametrize(("zoom", "block_offset", "east", "north"),
                         [(21, 2, 1.5, -1.0), (20, 1, -2.0, 0.7)])
def test_recovers_known_shift(tmp_path: Path, rendered: dict, zoom: int, block_offset: int,
                              east: float, north: float) -> None:
    layout = make_run(tmp_path, zoom, moved(kampala_labels(), east, north), rendered)
    settings = AlignSettings(max_shift_m=3.0, block_zoom_offset=block_offset)
    offsets = estimate_offsets(layout, "building", band=0, zoom=zoom, tile_size=SIZE,
                               settings=settings)
    px = mpp(zoom)
    assert len(offsets.blocks) == 7 and offsets.block_zoom == zoom - block_offset
    trusted = [b for b in offsets.blocks if b.trusted]
    assert len(trusted) >= 5, offsets.blocks
    for b in trusted:  # the correction is the opposite of the shift
        assert abs(b.east_m + east) < 2 * px and abs(b.north_m + north) < 2 * px, b
        assert b.gain > 0 and b.support >= settings.min_support
    assert abs(offsets.global_east_m + east) < px and abs(offsets.global_north_m + north) < px
    # the labels moved back sit where they were drawn, within a pixel
    back = shift_labels(storage_labels(layout), offsets)
    original = kampala_labels()
    err = shapely.distance(shapely.centroid(to_merc(back)), shapely.centroid(to_merc(original)))
    assert np.median(err) < px


def storage_labels(layout: RunLayout) -> object:
    from mapgap.tasks.labels import read_labels

    return read_labels(layout.labels("building"))


def to_merc(frame: object) -> np.ndarray:
    return project(frame.geometry.values.to_numpy(), grid.WGS84, grid.WEB_MERCATOR)


def test_zero_shift_is_zero_and_estimate_is_deterministic(tmp_path: Path, rendered: dict
                                                         ) -> None:
    layout = make_run(tmp_path, 20, kampala_labels(), rendered)
    settings = AlignSettings(max_shift_m=2.0, block_zoom_offset=1)
    first = estimate_offsets(layout, "building", band=0, zoom=20, tile_size=SIZE,
                             settings=settings)
    assert first.trusted_blocks >= 5
    for b in first.blocks:
        if b.trusted:
            assert abs(b.dx_px) < 2 and abs(b.dy_px) < 2, b
    # the median rounds to no shift at all
    assert abs(first.global_east_m) < 0.5 * mpp(20) and abs(first.global_north_m) < 0.5 * mpp(20)
    again = estimate_offsets(layout, "building", band=0, zoom=20, tile_size=SIZE,
                             settings=settings)
    assert again == first
    uri = write_offsets(offsets_uri(layout, "building"), first)
    data = Path(uri).read_bytes()
    write_offsets(uri, again)
    assert Path(uri).read_bytes() == data
    assert read_offsets(uri) == first


def test_block_without_labels_falls_back_to_the_global_offset(tmp_path: Path,
                                                              rendered: dict) -> None:
    east, north = 1.2, 0.8
    labels = moved(kampala_labels(), east, north)
    empty = Tile(309614, 261633, 19)  # 9 buildings: drop every one reaching into it
    reach = shapely.box(*grid.tile_bounds(empty)).buffer(1e-4)
    labels = labels[~labels.intersects(reach)]
    layout = make_run(tmp_path, 20, labels, rendered)
    offsets = estimate_offsets(layout, "building", band=0, zoom=20, tile_size=SIZE,
                               settings=AlignSettings(block_zoom_offset=1))
    block = {b.block: b for b in offsets.blocks}[grid.tile_key(empty)]
    assert block.support == 0 and not block.trusted
    assert offsets.applied(block.block) == (offsets.global_east_m, offsets.global_north_m)
    assert abs(offsets.global_east_m + east) < mpp(20)
    assert abs(offsets.global_north_m + north) < mpp(20)
    on_file = read_offsets(write_offsets(offsets_uri(layout, "building"), offsets))
    assert on_file.applied(block.block) == offsets.applied(block.block)


def _offsets(blocks: dict[str, tuple[float, float]], global_: tuple[float, float]) -> Offsets:
    return Offsets("building", 21, SIZE, 19, 3.0, tuple(
        BlockOffset(k, 0.0, 0.0, e, n, 0.5, 0.4, 0.1, 1000, True)
        for k, (e, n) in blocks.items()), *global_)


def test_shift_moves_every_vertex_by_its_block_offset_in_metres() -> None:
    frame = kampala_labels()
    per_block = {"z19_309606_261636": (1.5, -1.0), "z19_309614_261632": (-0.4, 2.5)}
    offsets = _offsets(per_block, (0.3, 0.2))
    shifted = shift_labels(frame, offsets)
    assert shifted.crs.equals(grid.WGS84) and len(shifted) == len(frame)
    assert (shifted["class"] == "building").all()
    geod = Geod(ellps="WGS84")
    seen = set()
    for geom, new in zip(frame.geometry, shifted.geometry, strict=True):
        w, s, e, n = geom.bounds
        corners = {grid.parent(Tile(*grid.mercantile.tile(lon, lat, 21)), 19)
                   for lon, lat in ((w, s), (e, n))}
        a, b = shapely.get_coordinates(geom), shapely.get_coordinates(new)
        assert a.shape == b.shape
        az, _, dist = geod.inv(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
        moved_e, moved_n = dist * np.sin(np.radians(az)), dist * np.cos(np.radians(az))
        if len(corners) == 1:  # wholly inside one block: that block's offset
            east, north = per_block.get(grid.tile_key(corners.pop()), (0.3, 0.2))
        else:  # across a border: rigidly by one of its blocks' offsets
            east, north = min({*per_block.values(), (0.3, 0.2)},
                              key=lambda o: abs(o[0] - moved_e[0]) + abs(o[1] - moved_n[0]))
        seen.add((east, north))
        np.testing.assert_allclose(moved_e, east, atol=2e-3)
        np.testing.assert_allclose(moved_n, north, atol=2e-3)
    assert len(seen) == 3  # both measured blocks and the fallback were exercised
    # the same function moves bare geometry arrays (OSM before dedup); empties stay
    geoms = np.array([*frame.geometry.values[:3], shapely.Polygon()], dtype=object)
    out = shift_geometries(geoms, offsets)
    assert out[3].is_empty and all(shapely.equals(out[:3], shifted.geometry.values[:3]))


def test_bad_offsets_file_is_a_one_line_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.json")
    with pytest.raises(AlignmentError, match="none.json: no such file"):
        read_offsets(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"class": "building"}')
    with pytest.raises(AlignmentError, match=r"bad\.json: not a mapgap offsets file") as err:
        read_offsets(str(bad))
    assert "\n" not in str(err.value)


def test_no_probabilities_is_a_one_line_error(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    write_geoparquet(kampala_labels(), layout.labels("building"))
    with pytest.raises(AlignmentError, match="no zoom-21 probability tiles"):
        estimate_offsets(layout, "building", band=0, zoom=21, tile_size=SIZE,
                         settings=AlignSettings())


def imagery_model_probabilities(labels: object, tiles: list[Tile]) -> dict[Tile, bytes]:
    """Probability PNGs of a real (small) model of the imagery: an MLP per pixel on
    colour and local texture at half resolution, trained on ``labels``."""
    import torch

    from mapgap.tasks.predict import decode_image

    def features(tile: Tile) -> np.ndarray:
        data = (shared_path("kampala") / f"OAM-{tile.x}-{tile.y}-{tile.z}.png").read_bytes()
        rgb = cv2.resize(decode_image(data, tile_key(tile), SIZE), (SIZE // 2, SIZE // 2),
                         interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        f = [rgb, cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV) / np.float32([360, 1, 1])]
        for sigma in (1.5, 5.0):  # ~0.2 and 0.75 m
            mean = cv2.GaussianBlur(rgb, (0, 0), sigma)
            var = cv2.GaussianBlur(rgb * rgb, (0, 0), sigma) - mean * mean
            f += [mean, np.sqrt(np.maximum(var, 0))]
        return np.concatenate(f, axis=2).reshape(-1, 18)

    geoms = project(labels.geometry.values.to_numpy(), grid.WGS84, grid.WEB_MERCATOR)
    rng = np.random.default_rng(0)
    feats, xs, ys = {}, [], []
    for t in tiles:
        feats[t] = features(t)
        mask = burn(geoms, np.ones(len(geoms), np.uint8), grid.tile_transform(t, SIZE // 2),
                    (SIZE // 2, SIZE // 2))
        pick = rng.choice(len(feats[t]), 1000, replace=False)
        xs.append(feats[t][pick])
        ys.append(mask.ravel()[pick])
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).float()
    mean, sd = x.mean(0), x.std(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(18, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        i = torch.randint(0, len(x), (2048,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net((x[i] - mean) / sd)[:, 0], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {}
    with torch.no_grad():
        for t in tiles:
            p = torch.sigmoid(net((torch.from_numpy(feats[t]) - mean) / sd))[:, 0].numpy()
            p = cv2.resize(p.reshape(SIZE // 2, SIZE // 2), (SIZE, SIZE),
                           interpolation=cv2.INTER_LINEAR)
            out[t] = encode_probability(np.rint(p * 255).astype(np.uint8)[None])
    return out


@pytest.mark.slow
def test_recovers_known_shift_with_a_model_of_the_imagery(tmp_path: Path) -> None:
    east, north = 1.5, -1.0
    tiles = kampala_tiles(21)
    probs = {21: imagery_model_probabilities(kampala_labels(), tiles)}
    layout = make_run(tmp_path, 21, moved(kampala_labels(), east, north), probs)
    offsets = estimate_offsets(layout, "building", band=0, zoom=21, tile_size=SIZE,
                               settings=AlignSettings(max_shift_m=3.0))
    px = mpp(21)
    assert offsets.trusted_blocks >= 5, offsets.blocks
    for b in offsets.blocks:
        if b.trusted:
            assert abs(b.east_m + east) < 2 * px and abs(b.north_m + north) < 2 * px, b
    assert abs(offsets.global_east_m + east) < px and abs(offsets.global_north_m + north) < px
