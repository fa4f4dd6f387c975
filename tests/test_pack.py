"""Packing: round trip, spatial split without leakage, negative ratio, atomic
shards (local and S3), bad tiles skipped and counted, extra (mined) samples,
distance targets (sdt PNGs) carried as harvested."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mapgap import grid, storage
from mapgap.conf import validate_config
from mapgap.layout import RunLayout
from mapgap.tasks import pack
from mapgap.tasks.shards import (
    AtomicShardWriter,
    CorruptSampleError,
    decode_distance,
    decode_sample,
    png_bytes,
    register_gopen_schemes,
    sample_dict,
)

# A 6 x 6 block of zoom-18 tiles near Kampala; blocks at zoom 16 are 4 x 4 tiles.
ORIGIN = grid.Tile(158_000, 130_900, 18)
CLASSES = [
    {"name": "building", "tags": {"include": {"building": "*"}}},
    {"name": "road", "tags": {"include": {"highway": "*"}}, "geometry": "line", "width_m": 6},
]


def block_tiles(n: int = 6) -> list[grid.Tile]:
    return [grid.Tile(ORIGIN.x + dx, ORIGIN.y + dy, 18) for dy in range(n) for dx in range(n)]


def make_config(root: str, tmp_path: Path, n: int = 6, **sections: Any) -> Any:
    """A real PipelineConfig over an n x n tile block."""
    tiles = block_tiles(n)
    w, _, _, n_ = grid.tile_bounds(tiles[0])
    _, s, e, _ = grid.tile_bounds(tiles[-1])
    labels = tmp_path / "labels.geojson"
    if not labels.exists():
        labels.write_text('{"type": "FeatureCollection", "features": []}')
    data = {
        "name": "t", "storage": {"root": root}, "aoi": [w, s, e, n_], "zoom": 18,
        "classes": CLASSES, "labels": {"source": "labels.geojson"},
        "imagery": {"source": "http://127.0.0.1:1/{z}/{x}/{y}.png"},
        "pack": {"split_zoom_offset": 2, "val_fraction": 0.25, "negative_ratio": 0.5,
                 "maxcount": 5},
    }
    for name, values in sections.items():  # sections are merged, lists replaced
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return validate_config(data, "test", tmp_path)


def synthetic_tile(seed: int, buildings: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Green-brown noise with bright roofs (class 1) and a grey road band (class 2)."""
    rng = np.random.default_rng(seed)
    image = (rng.normal(0, 12, (size, size, 3)) + (70, 95, 55)).clip(0, 255)
    mask = np.zeros((size, size), np.uint8)
    if buildings:
        row = rng.integers(0, size - 24)
        image[row:row + 16] = (120, 120, 118)
        mask[row:row + 16] = 2
    for _ in range(buildings):
        h, w = rng.integers(14, 40, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        image[y:y + h, x:x + w] = rng.choice([(200, 90, 60), (210, 210, 200), (160, 160, 170)])
        mask[y:y + h, x:x + w] = 1
        mask[y, x:x + w] = 255  # a sliver of ignore band on the top edge
    return image.astype(np.uint8), mask


def write_tile(layout: RunLayout, tile: grid.Tile, image: np.ndarray, mask: np.ndarray) -> None:
    for uri, arr in ((layout.image(tile), image), (layout.mask(tile), mask)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        storage.write_bytes(uri, buf.getvalue())


def synthetic_sdt(mask: np.ndarray) -> np.ndarray:
    """A distance-target stand-in: > 128 exactly on buildings (and their ignore
    sliver), 1..127 elsewhere, varying with the position so that a mirrored or
    shifted copy never equals it."""
    rows, cols = np.indices(mask.shape)
    inside = (mask == 1) | (mask == 255)
    return np.where(inside, 129 + cols % 127, 1 + rows % 127).astype(np.uint8)


def make_run(cfg: Any, negatives_every: int = 2,
             sdt: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write images + masks (and with ``sdt`` the harvest's sdt PNGs) for the
    config's tiles; every ``negatives_every``-th tile has no features. Returns what
    was written per key."""
    layout = RunLayout(cfg.run_uri)
    written = {}
    for i, tile in enumerate(grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom)):
        image, mask = synthetic_tile(i, 0 if i % negatives_every == 0 else 3)
        write_tile(layout, tile, image, mask)
        if sdt:
            storage.write_bytes(layout.signed_distance(tile), png_bytes(synthetic_sdt(mask)))
        written[grid.tile_key(tile)] = (image, mask)
    return written


def run_pack(cfg: Any) -> dict[str, Any]:
    """The pack steps as the flow runs them, without Prefect."""
    spec = pack.PackSpec.from_config(cfg)
    tiles = grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom)
    scans = [pack.scan_tiles(spec, b) for b in grid.iter_batches(tiles, 7)]
    pixels = {k: v for s in scans for k, v in s["pixels"].items()}
    plan = pack.plan_split(spec, pixels)
    packed = {split: [pack.pack_chunk(spec, split, i, keys, plan["block_zoom"])
                      for i, keys in enumerate(pack.chunks(spec, p["keys"]))]
              for split, p in plan["splits"].items()}
    return pack.write_manifest(spec, plan, [s["skipped"] for s in scans], packed)


def read_shards(uris: list[str]) -> list[dict[str, Any]]:
    """Every sample of some shards, read back with WebDataset."""
    import webdataset as wds

    register_gopen_schemes()
    return list(wds.WebDataset(uris, shardshuffle=False, nodesplitter=None, empty_check=False))


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def test_round_trip_split_and_ratio(root: str, tmp_path: Path) -> None:
    cfg = make_config(root, tmp_path)
    written = make_run(cfg)
    manifest = run_pack(cfg)
    layout = RunLayout(cfg.run_uri)
    assert storage.read_json(layout.manifest) == manifest

    seen: dict[str, str] = {}
    for split in pack.SPLITS:
        uris = pack.shard_uris(layout.manifest, split)
        assert uris and all(u.rsplit("/", 1)[-1].startswith(f"{split}-") for u in uris)
        samples = read_shards(uris)
        info = manifest["splits"][split]
        assert len(samples) == info["samples"] == sum(
            s["count"] for s in manifest["shards"] if s["split"] == split)
        assert all(s["count"] <= cfg.pack.maxcount for s in manifest["shards"])
        for sample in samples:
            image, mask, meta = decode_sample(sample)
            want_image, want_mask = written[sample["__key__"]]
            np.testing.assert_array_equal(image, want_image)
            np.testing.assert_array_equal(mask, want_mask)
            assert meta["split"] == split and meta["key"] == sample["__key__"]
            assert meta["pixels"]["building"] == int((want_mask == 1).sum())
            assert meta["pixels"]["ignore"] == int((want_mask == 255).sum())
            assert meta["classes"] == ["building", "road"]
            assert "sdt.png" not in sample and decode_distance(sample) is None
            seen[sample["__key__"]] = split
        # negatives kept at the configured ratio (as far as there are negatives)
        want_neg = min(info["negatives_available"], round(0.5 * info["positives"]))
        assert info["negatives"] == want_neg > 0
        assert info["class_tiles"]["building"] == info["positives"]

    # no spatial leakage: every zoom-16 block is entirely in one split
    blocks: dict[grid.Tile, set[str]] = {}
    for key, split in seen.items():
        blocks.setdefault(grid.parent(grid.parse_tile_key(key), 16), set()).add(split)
    assert manifest["block_zoom"] == 16
    assert all(len(s) == 1 for s in blocks.values())
    assert {s for v in blocks.values() for s in v} == {"train", "val"}
    assert not manifest["skipped"]["counts"]
    assert manifest["distance"] is False


def test_distance_targets_are_packed_as_harvested(tmp_path: Path) -> None:
    """labels.signed_distance: every sample carries its tile's sdt PNG, byte for
    byte; a tile whose sdt is missing, zero-valued or mis-sized is skipped."""
    cfg = make_config(str(tmp_path / "out"), tmp_path, n=4, labels={"signed_distance": True})
    make_run(cfg, sdt=True)
    layout = RunLayout(cfg.run_uri)
    tiles = block_tiles(4)  # odd indices are positives: all of them are packed
    Path(layout.signed_distance(tiles[1])).unlink()
    storage.write_bytes(layout.signed_distance(tiles[3]), png_bytes(np.zeros((256, 256),
                                                                              np.uint8)))
    storage.write_bytes(layout.signed_distance(tiles[5]), png_bytes(np.ones((64, 64), np.uint8)))
    manifest = run_pack(cfg)
    assert manifest["distance"] is True
    assert manifest["skipped"]["counts"] == {"missing_sdt": 1, "corrupt": 1, "size_mismatch": 1}
    examples = " ".join(manifest["skipped"]["examples"])
    assert "masks-sdt" in examples and "1..255" in examples and "64x64" in examples
    samples = read_shards(pack.shard_uris(layout.manifest, "train")
                          + pack.shard_uris(layout.manifest, "val"))
    assert len(samples) == manifest["splits"]["train"]["samples"] + \
        manifest["splits"]["val"]["samples"] > 0
    assert not {s["__key__"] for s in samples} & {grid.tile_key(tiles[i]) for i in (1, 3, 5)}
    for s in samples:
        harvested = storage.read_bytes(layout.signed_distance(grid.parse_tile_key(s["__key__"])))
        assert s["sdt.png"] == harvested  # copied, not re-encoded
        np.testing.assert_array_equal(decode_distance(s), synthetic_sdt(decode_sample(s)[1]))


def test_separate_instances_also_asks_for_distance_targets(tmp_path: Path) -> None:
    classes = [dict(CLASSES[0], separate_instances=True), CLASSES[1]]
    cfg = make_config(str(tmp_path / "out"), tmp_path, n=2, classes=classes)
    assert pack.PackSpec.from_config(cfg).distance
    assert not pack.PackSpec.from_config(make_config(str(tmp_path / "o"), tmp_path, n=2)).distance


def test_repack_is_deterministic_and_removes_stale_shards(tmp_path: Path) -> None:
    cfg = make_config(str(tmp_path / "out"), tmp_path)
    make_run(cfg)
    first = run_pack(cfg)
    again = run_pack(cfg)
    assert first == again  # same bytes: same sha256 per shard
    bigger = make_config(str(tmp_path / "out"), tmp_path, pack={"maxcount": 50})
    manifest = run_pack(bigger)
    on_disk = sorted(p.name for p in Path(RunLayout(cfg.run_uri).shards).glob("*.tar"))
    assert on_disk == sorted(s["name"] for s in manifest["shards"])
    assert len(on_disk) == 2


def test_webp_lossless(tmp_path: Path) -> None:
    cfg = make_config(str(tmp_path / "out"), tmp_path, n=4,
                      pack={"image_format": "webp", "webp_quality": 100, "val_fraction": 0})
    written = make_run(cfg)
    manifest = run_pack(cfg)
    assert manifest["splits"]["val"]["samples"] == 0
    samples = read_shards(pack.shard_uris(RunLayout(cfg.run_uri).manifest, "train"))
    assert samples and all("image.webp" in s for s in samples)
    for s in samples:
        np.testing.assert_array_equal(decode_sample(s)[0], written[s["__key__"]][0])


def test_bad_tiles_are_skipped_and_counted(tmp_path: Path) -> None:
    cfg = make_config(str(tmp_path / "out"), tmp_path, n=4)
    make_run(cfg)
    layout = RunLayout(cfg.run_uri)
    tiles = block_tiles(4)
    Path(layout.image(tiles[1])).unlink()  # imagery missing
    Path(layout.mask(tiles[2])).unlink()  # mask missing
    positive_mask = synthetic_tile(1, 3)[1]
    write_tile(layout, tiles[4], np.zeros((128, 128, 3), np.uint8), positive_mask)
    Path(layout.mask(tiles[5])).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad_values = np.full((256, 256), 7, np.uint8)
    write_tile(layout, tiles[6], np.zeros((256, 256, 3), np.uint8), bad_values)
    manifest = run_pack(cfg)
    counts = manifest["skipped"]["counts"]
    assert counts == {"missing_image": 1, "missing_mask": 1, "size_mismatch": 1, "corrupt": 2}
    examples = " ".join(manifest["skipped"]["examples"])
    assert "128x128" in examples and "mask value 7" in examples
    packed = {s["__key__"] for split in pack.SPLITS
              for s in read_shards(pack.shard_uris(layout.manifest, split))}
    assert not packed & {grid.tile_key(tiles[i]) for i in (1, 2, 4, 5, 6)}


def test_nothing_to_pack_is_a_clear_error(tmp_path: Path) -> None:
    cfg = make_config(str(tmp_path / "out"), tmp_path, n=2)
    spec = pack.PackSpec.from_config(cfg)
    with pytest.raises(pack.PackError, match="no tile has both imagery and a valid mask"):
        pack.plan_split(spec, pack.scan_tiles(spec, block_tiles(2))["pixels"])
    layout = RunLayout(cfg.run_uri)
    for tile in block_tiles(2):  # imagery + masks, but no building anywhere
        write_tile(layout, tile, *synthetic_tile(0, 0))
    with pytest.raises(pack.PackError, match="no positive tile for class"):
        pack.plan_split(spec, pack.scan_tiles(spec, block_tiles(2))["pixels"])


def test_interrupted_shard_is_never_visible(root: str) -> None:
    """A crash while writing the 3rd shard: the 2 finished shards exist, nothing else
    (no partial .tar, locally no temp file either)."""
    directory = storage.join(root, "shards")
    sample = sample_dict("z1_0_0", b"x" * 5000, "png", b"m" * 100, {"k": 1})
    with pytest.raises(RuntimeError, match="boom"), \
            AtomicShardWriter(directory, "train", maxcount=2, maxsize=10**9) as out:
        for i in range(5):
            out.write({**sample, "__key__": f"z1_0_{i}"})
        raise RuntimeError("boom")
    names = sorted(u.rsplit("/", 1)[-1] for u in storage.glob(storage.join(directory, "*")))
    assert names == ["train-000000.tar", "train-000001.tar"]
    for name in names:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(directory, name)))) \
                as tar:
            assert len(tar.getnames()) == 2 * 3  # 2 samples x (image, mask, meta)


def test_maxsize_rolls_over(tmp_path: Path) -> None:
    sample = sample_dict("z1_0_0", b"x" * 3000, "png", b"m" * 100, {})
    with AtomicShardWriter(str(tmp_path), "val", maxcount=100, maxsize=5000) as out:
        for i in range(4):
            out.write({**sample, "__key__": f"z1_0_{i}"})
    assert [s.count for s in out.shards] == [2, 2]
    assert all(s.bytes == (tmp_path / s.name).stat().st_size for s in out.shards)


def test_extra_samples_for_mining(tmp_path: Path) -> None:
    cfg = make_config(str(tmp_path / "out"), tmp_path, n=2)
    written = make_run(cfg)
    spec = pack.PackSpec.from_config(cfg)
    tiles = block_tiles(2)
    partial = np.zeros((256, 256), np.uint8)
    partial[:10] = 255
    own_image = np.full((256, 256, 3), 9, np.uint8)
    own_sdt = synthetic_sdt(partial)
    extras = [pack.ExtraSample(tiles[0]), pack.ExtraSample(tiles[1], mask=partial, sdt=own_sdt),
              pack.ExtraSample(tiles[2], image=own_image, meta={"round": 1})]
    uris = pack.pack_extra_samples(spec, extras, "mined-r01")
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["mined-r01-000000.tar"]
    raw = {s["__key__"]: s for s in read_shards(uris)}
    samples = {k: decode_sample(s) for k, s in raw.items()}
    np.testing.assert_array_equal(decode_distance(raw[grid.tile_key(tiles[1])]), own_sdt)
    assert "sdt.png" not in raw[grid.tile_key(tiles[0])]  # no sdt given: none packed
    image, mask, meta = samples[grid.tile_key(tiles[0])]
    np.testing.assert_array_equal(image, written[grid.tile_key(tiles[0])][0])
    assert not mask.any() and meta["origin"] == "mined-r01" and not meta["positive"]
    np.testing.assert_array_equal(samples[grid.tile_key(tiles[1])][1], partial)
    image, _, meta = samples[grid.tile_key(tiles[2])]
    np.testing.assert_array_equal(image, own_image)
    assert meta["round"] == 1
    # A rerun with fewer samples leaves no stale shard of the same prefix behind.
    small = dict(spec.__dict__, maxcount=1)
    assert len(pack.pack_extra_samples(pack.PackSpec(**small), extras, "mined-r01")) == 3
    assert len(pack.pack_extra_samples(pack.PackSpec(**small), extras[:1], "mined-r01")) == 1
    assert len(list(Path(RunLayout(cfg.run_uri).shards).glob("mined-r01-*.tar"))) == 1
    with pytest.raises(pack.PackError, match="shard prefix"):
        pack.pack_extra_samples(spec, extras, "train")
    with pytest.raises(pack.PackError, match="mask value 9"):
        pack.pack_extra_samples(spec, [pack.ExtraSample(tiles[0], mask=partial * 0 + 9)], "x")
    with pytest.raises(pack.PackError, match=r"extra sample z18_\d+_\d+: sdt values"):
        pack.pack_extra_samples(spec, [pack.ExtraSample(tiles[0], sdt=partial * 0)], "x")
    with pytest.raises(pack.PackError, match=r"sdt shape is \(8, 8\)"):
        pack.pack_extra_samples(spec, [pack.ExtraSample(tiles[0], sdt=own_sdt[:8, :8])], "x")


def test_corrupt_sample_decoding_names_the_sample() -> None:
    good = sample_dict("z1_2_3", b"not an image", "png", b"", {"classes": []})
    with pytest.raises(CorruptSampleError, match="z1_2_3: cannot decode"):
        decode_sample(good)
    with pytest.raises(CorruptSampleError, match="missing mask.png"):
        decode_sample({"__key__": "k", "image.png": b"", "meta.json": b"{}"})
    img = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img, format="PNG")
    msk = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(msk, format="PNG")
    mismatch = sample_dict("k", img.getvalue(), "png", msk.getvalue(), {})
    with pytest.raises(CorruptSampleError, match="image is 8x8 px but mask is 4x4 px"):
        decode_sample(mismatch)
    assert json.loads(mismatch["meta.json"]) == {}
    sdt = np.full((4, 4), 200, np.uint8)
    with_sdt = sample_dict("z1_2_3", img.getvalue(), "png", msk.getvalue(), {}, png_bytes(sdt))
    np.testing.assert_array_equal(decode_distance(with_sdt), sdt)
    with pytest.raises(CorruptSampleError, match="z1_2_3: cannot decode sdt.png"):
        decode_distance({**with_sdt, "sdt.png": b"\x89PNG broken"})
    with pytest.raises(CorruptSampleError, match="sdt.png is 8x8 px but mask is 4x4 px"):
        decode_distance({**with_sdt, "sdt.png": png_bytes(np.full((8, 8), 200, np.uint8))})


def write_labels(cfg: Any, boxes_px: dict[str, tuple[int, int, int, int]]) -> None:
    """A GeoJSON of building boxes (pixel boxes on given tiles) as labels.source."""
    features = []
    for key, (c0, r0, c1, r1) in boxes_px.items():
        tile = grid.parse_tile_key(key)
        (w, n), (e, s) = (grid.pixel_to_lonlat(tile, 256, c0, r0),
                          grid.pixel_to_lonlat(tile, 256, c1, r1))
        ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
        features.append({"type": "Feature", "properties": {"class": "building"},
                         "geometry": {"type": "Polygon", "coordinates": [ring]}})
    Path(cfg.labels.source).write_text(json.dumps({"type": "FeatureCollection",
                                                   "features": features}))


@pytest.mark.slow
def test_pack_flow_after_harvest_and_reuse_of_finished_work(tmp_path: Path) -> None:
    """Real harvest (vector labels -> GeoParquet -> masks), then the pack flow; a
    rerun with another training setting reuses every pack task."""
    from mapgap.flows.harvest import harvest_flow
    from mapgap.flows.pack import pack_flow
    from mapgap.orchestration import configured

    cfg = make_config(str(tmp_path / "out"), tmp_path, n=4, pack={"maxcount": 4})
    layout = RunLayout(cfg.run_uri)
    tiles = block_tiles(4)
    for i, tile in enumerate(tiles[:1] + tiles[2:]):  # tiles[1] has no imagery
        storage.write_bytes(layout.image(tile), png_bytes(synthetic_tile(i, 0)[0]))
    positives = {grid.tile_key(t): (64, 32, 160, 96) for t in tiles[::2]}
    write_labels(cfg, positives)
    with pytest.raises(pack.PackError, match="no masks"):
        configured(pack_flow, cfg)(cfg)
    configured(harvest_flow, cfg)(cfg)

    result = configured(pack_flow, cfg)(cfg)
    manifest = storage.read_json(layout.manifest)
    assert result["train_samples"] + result["val_samples"] == 8 + 4  # 8 positives, 0.5 ratio
    samples = read_shards(pack.shard_uris(layout.manifest, "train")
                          + pack.shard_uris(layout.manifest, "val"))
    for s in samples:
        _, mask, meta = decode_sample(s)
        if s["__key__"] in positives:
            assert (mask[32:96, 64:160] == 1).all() and mask.sum() == 64 * 96
            assert meta["positive"] and meta["features"] == {"building": 1, "road": 0}
        else:
            assert not mask.any()
    assert manifest["skipped"]["counts"] == result["skipped"] == {"missing_image": 1}

    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(layout.shards).glob("*.tar")}
    retrain = make_config(str(tmp_path / "out"), tmp_path, n=4, pack={"maxcount": 4},
                          train={"lr": 0.123})
    assert configured(pack_flow, retrain)(retrain) == result
    assert {p.name: p.stat().st_mtime_ns for p in Path(layout.shards).glob("*.tar")} == mtimes
    # A shard deleted by hand is rewritten on the next run, not silently listed.
    gone = Path(layout.shards, manifest["shards"][0]["name"])
    gone.unlink()
    assert configured(pack_flow, cfg)(cfg) == result
    assert gone.exists() and storage.read_json(layout.manifest) == manifest
