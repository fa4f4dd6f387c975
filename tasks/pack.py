"""Pair image tiles with label masks and pack them into WebDataset shards.

Three steps, each a plain function with a thin Prefect task wrapper:

1. :func:`scan_tiles` (batched): which tiles have imagery and a valid mask (and,
   when the harvest wrote distance targets, an sdt PNG), and their pixel count
   per class.
2. :func:`plan_split` (in the flow, pure): train/val by spatial blocks - tiles
   are grouped by their parent at ``zoom - split_zoom_offset`` and whole blocks
   go to one split, so neighbouring tiles never straddle it; negatives
   (tiles without any trained-class pixel) are kept at ``negative_ratio`` per
   positive; the sample order is a seeded hash, so shards mix distant tiles.
3. :func:`pack_chunk` (batched): write ``{split}-{NNNNNN}.tar`` shards. Chunk
   ``i`` of a split numbers its shards from ``i * SHARD_STRIDE``, so parallel
   tasks never collide; the manifest lists the shards that exist. With
   distance targets every sample carries its tile's harvested sdt PNG, copied.

:func:`write_manifest` records counts per split and class and the shard list,
and removes stale ``train-``/``val-`` shards of earlier packs.
:func:`pack_extra_samples` packs extra train samples (e.g. mined hard
negatives) under their own prefix.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mapgap import grid, storage
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger, track
from mapgap.tasks.shards import (
    IGNORE,
    AtomicShardWriter,
    encode_image,
    png_bytes,
    sample_dict,
    trained_classes,
)

SPLITS = ("train", "val")
SHARD_STRIDE = 1000  # shard numbers reserved per pack chunk
_STALE = re.compile(r"^(train|val)-\d{6}\.tar$")
_PREFIX = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_MAX_EXAMPLES = 5


class PackError(ValueError):
    """Nothing (valid) to pack, or a bad pack request; one line naming the cause."""


@dataclass(frozen=True)
class PackSpec:
    """Everything that determines the shards, and nothing else: the Prefect cache
    key of the pack tasks (a training setting must not invalidate the shards)."""

    run_uri: str
    zoom: int
    tile_size: int
    classes: tuple[str, ...]  # mask value i+1 = classes[i]
    trained: tuple[str, ...]  # a tile is positive when one of these has pixels
    image_format: str = "png"
    webp_quality: int = 90
    maxcount: int = 1000
    maxsize: int = 1_000_000_000
    val_fraction: float = 0.2
    split_zoom_offset: int = 3
    negative_ratio: float = 0.3
    seed: int = 0
    tiles_per_task: int = 2048
    imagery_source: str = ""
    label_source: str = ""
    # The harvest wrote an sdt PNG per tile: every sample must carry it.
    distance: bool = False
    # Hash of upstream reports: re-fetched imagery or re-rasterized masks repack.
    inputs_digest: str = ""

    @classmethod
    def from_config(cls, cfg: Any, inputs_digest: str = "") -> PackSpec:
        p = cfg.pack
        return cls(
            run_uri=cfg.run_uri, zoom=cfg.zoom, tile_size=cfg.tile_size,
            classes=tuple(c.name for c in cfg.classes), trained=tuple(trained_classes(cfg)),
            image_format=p.image_format, webp_quality=p.webp_quality,
            maxcount=p.maxcount, maxsize=p.maxsize, val_fraction=p.val_fraction,
            split_zoom_offset=p.split_zoom_offset, negative_ratio=p.negative_ratio,
            seed=p.seed, tiles_per_task=p.tiles_per_task,
            imagery_source=cfg.imagery.source, label_source=cfg.labels.source,
            distance=distance_targets(cfg), inputs_digest=inputs_digest,
        )

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_uri)

    @property
    def trained_values(self) -> list[int]:
        """Mask values of the trained classes."""
        return [self.classes.index(c) + 1 for c in self.trained]


def distance_targets(cfg: Any) -> bool:
    """Whether harvest wrote an sdt PNG per tile (the same rule as rasterize's)."""
    return bool(cfg.labels.signed_distance or any(c.separate_instances for c in cfg.classes))


# --- reading and validating one tile ---------------------------------------------------

@dataclass
class Skips:
    """Skipped tiles by reason, with a few example messages for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": self.examples}


class SkipTile(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _open_image(uri: str, data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise SkipTile("corrupt", f"{uri}: cannot decode ({err})") from None
    return img


def _read(uri: str, missing_reason: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError:
        raise SkipTile(missing_reason, f"{uri}: no such file") from None


def invalid_mask_value(spec: PackSpec, mask: np.ndarray) -> str | None:
    bad = np.setdiff1d(np.unique(mask), [*range(len(spec.classes) + 1), IGNORE])
    if bad.size:
        return (f"mask value {int(bad[0])} is neither 0, a class index "
                f"1..{len(spec.classes)} nor {IGNORE}")
    return None


def read_mask(spec: PackSpec, tile: Tile) -> tuple[np.ndarray, bytes]:
    """The tile's mask as uint8 [H,W] + PNG bytes; SkipTile when unusable."""
    uri = spec.layout.mask(tile)
    data = _read(uri, "missing_mask")
    img = _open_image(uri, data)
    if img.mode not in ("L", "P"):
        raise SkipTile("corrupt", f"{uri}: mask mode {img.mode}, expected 8-bit single band")
    mask = np.asarray(img)
    if mask.shape != (spec.tile_size, spec.tile_size):
        raise SkipTile("size_mismatch", f"{uri}: mask is {mask.shape[1]}x{mask.shape[0]} px, "
                                        f"tile_size is {spec.tile_size}")
    bad = invalid_mask_value(spec, mask)
    if bad is not None:
        raise SkipTile("corrupt", f"{uri}: {bad}")
    if img.format != "PNG" or img.mode != "L":
        data = png_bytes(mask)
    return mask, data


def invalid_distance_value(sdt: np.ndarray) -> str | None:
    """Why an sdt array holds no valid distance encoding (or None): 0 is reserved
    for 'no target' in training batches."""
    if sdt.dtype != np.uint8 or not sdt.all():
        return "sdt values must be uint8 1..255 (0 marks 'no distance target')"
    return None


def read_distance(spec: PackSpec, tile: Tile) -> bytes:
    """The tile's harvested sdt PNG bytes, checked but never re-encoded; SkipTile
    when missing or unusable."""
    uri = spec.layout.signed_distance(tile)
    data = _read(uri, "missing_sdt")
    img = _open_image(uri, data)
    if img.format != "PNG" or img.mode != "L":
        raise SkipTile("corrupt", f"{uri}: {img.format} {img.mode}, expected an 8-bit "
                                  "single-band PNG")
    sdt = np.asarray(img)
    if sdt.shape != (spec.tile_size, spec.tile_size):
        raise SkipTile("size_mismatch", f"{uri}: sdt is {sdt.shape[1]}x{sdt.shape[0]} px, "
                                        f"tile_size is {spec.tile_size}")
    bad = invalid_distance_value(sdt)
    if bad is not None:
        raise SkipTile("corrupt", f"{uri}: {bad}")
    return data


def read_image(spec: PackSpec, tile: Tile) -> bytes:
    """The tile's image encoded in ``spec.image_format``; SkipTile when unusable.
    PNG bytes are copied untouched when RGB, or RGBA as fetch keeps them (its
    nodata already black): readers decode them to RGB."""
    uri = spec.layout.image(tile)
    data = _read(uri, "missing_image")
    img = _open_image(uri, data)
    if img.size != (spec.tile_size, spec.tile_size):
        raise SkipTile("size_mismatch", f"{uri}: image is {img.size[0]}x{img.size[1]} px, "
                                        f"tile_size is {spec.tile_size}")
    if spec.image_format == "png" and img.format == "PNG" and img.mode in ("RGB", "RGBA"):
        return data
    return encode_image(np.asarray(img.convert("RGB")), spec.image_format, spec.webp_quality)


def pixel_counts(spec: PackSpec, mask: np.ndarray) -> dict[str, int]:
    counts = np.bincount(mask.ravel(), minlength=256)
    out = {"background": int(counts[0])}
    out.update({name: int(counts[i + 1]) for i, name in enumerate(spec.classes)})
    out["ignore"] = int(counts[IGNORE])
    return out


def is_positive(spec: PackSpec, pixels: dict[str, int]) -> bool:
    return any(pixels[c] > 0 for c in spec.trained)


# --- 1. scan -----------------------------------------------------------------------------

def scan_tiles(spec: PackSpec, tiles: list[Tile]) -> dict[str, Any]:
    """Pixel counts per class of every packable tile; skipped tiles by reason.

    Only masks are decoded here; images are only checked for existence (they
    are fully validated when packed).
    """
    pixels: dict[str, dict[str, int]] = {}
    skips = Skips()
    for tile in tiles:
        try:
            if not storage.exists(spec.layout.image(tile)):
                raise SkipTile("missing_image", f"{spec.layout.image(tile)}: no such file")
            if spec.distance and not storage.exists(spec.layout.signed_distance(tile)):
                raise SkipTile("missing_sdt", f"{spec.layout.signed_distance(tile)}: no such "
                                              "file (labels.signed_distance / separate_instances "
                                              "is set: rerun harvest)")
            mask, _ = read_mask(spec, tile)
            counts = pixel_counts(spec, mask)
            if counts["ignore"] == mask.size:
                raise SkipTile("all_ignore", f"{spec.layout.mask(tile)}: every pixel is "
                                             "'ignore' (outside labels.complete_areas)")
        except SkipTile as skip:
            skips.add(skip.reason, str(skip))
            continue
        pixels[grid.tile_key(tile)] = counts
    return {"pixels": pixels, "skipped": skips.to_dict()}


# --- 2. plan -----------------------------------------------------------------------------

def _rank(seed: int, text: str) -> str:
    """A stable pseudo-random order that does not depend on Python's hash seed."""
    return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()


def block_zoom_for(tiles: list[Tile], zoom: int, offset: int, want_two: bool) -> int:
    """Parent zoom of the split blocks; finer than configured when the area fits
    in one block (a split needs two blocks)."""
    bz = max(zoom - offset, 0)
    while want_two and bz < zoom and len({grid.parent(t, bz) for t in tiles}) < 2:
        bz += 1
    return bz


def plan_split(spec: PackSpec, pixels: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Assign scanned tiles to train/val by spatial block and choose negatives.

    Val blocks are taken in a seeded pseudo-random order until they hold
    ``val_fraction`` of the tiles (at least one block, never all of them).
    Returns the ordered sample keys per split plus statistics.
    """
    if not pixels:
        raise PackError(f"{spec.layout.shards}: no tile has both imagery and a valid mask")
    tiles = sorted(grid.parse_tile_key(k) for k in pixels)
    bz = block_zoom_for(tiles, spec.zoom, spec.split_zoom_offset, spec.val_fraction > 0)
    if bz > max(spec.zoom - spec.split_zoom_offset, 0):
        get_logger().warning(
            "pack: the %d tiles fit in one block at zoom %d (pack.split_zoom_offset %d): "
            "split blocks are zoom-%d tiles instead, so fewer neighbours share a split",
            len(tiles), max(spec.zoom - spec.split_zoom_offset, 0), spec.split_zoom_offset, bz)
    blocks: dict[str, list[str]] = {}
    for t in tiles:
        blocks.setdefault(grid.tile_key(grid.parent(t, bz)), []).append(grid.tile_key(t))
    order = sorted(blocks, key=lambda b: _rank(spec.seed, b))
    val_blocks: set[str] = set()
    n_val, target = 0, spec.val_fraction * len(tiles)
    for b in order[:-1]:  # the last block always stays in train
        if n_val >= target or spec.val_fraction == 0:
            break
        val_blocks.add(b)
        n_val += len(blocks[b])
    plan: dict[str, Any] = {"block_zoom": bz, "splits": {}}
    for split in SPLITS:
        chosen = [b for b in order if (b in val_blocks) == (split == "val")]
        keys = [k for b in chosen for k in blocks[b]]
        pos = [k for k in keys if is_positive(spec, pixels[k])]
        neg = sorted((k for k in keys if not is_positive(spec, pixels[k])),
                     key=lambda k: _rank(spec.seed, k))
        kept = neg[: min(len(neg), round(spec.negative_ratio * len(pos)))]
        plan["splits"][split] = {
            "keys": sorted(pos + kept, key=lambda k: _rank(spec.seed + 1, k)),
            "blocks": sorted(chosen),
            "positives": len(pos),
            "negatives_available": len(neg),
            "negatives_kept": len(kept),
        }
    if not plan["splits"]["train"]["keys"]:
        raise PackError(f"{spec.layout.shards}: no positive tile for class(es) "
                        f"{', '.join(spec.trained)} in {len(tiles)} scanned tiles")
    return plan


def chunks(spec: PackSpec, keys: list[str]) -> list[list[str]]:
    """Per-task slices of a split; sized so one chunk's shards fit in SHARD_STRIDE."""
    size = max(1, min(spec.tiles_per_task, spec.maxcount * (SHARD_STRIDE // 2)))
    return [keys[i:i + size] for i in range(0, len(keys), size)]


# --- 3. pack -----------------------------------------------------------------------------

def tile_meta(spec: PackSpec, tile: Tile, pixels: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "key": grid.tile_key(tile),
        "tile": {"z": tile.z, "x": tile.x, "y": tile.y},
        "bounds": list(grid.tile_bounds(tile)),
        "size": spec.tile_size,
        "classes": list(spec.classes),
        "pixels": pixels,
        "positive": is_positive(spec, pixels),
        "source": spec.imagery_source,
        "label_source": spec.label_source,
        **extra,
    }


class _Tally:
    """Counts per class of what went into a set of shards."""

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.samples = self.positives = 0
        self.class_tiles = dict.fromkeys(classes, 0)
        self.class_pixels = dict.fromkeys(classes, 0)

    def add(self, meta: dict[str, Any]) -> None:
        self.samples += 1
        self.positives += meta["positive"]
        for c in self.class_tiles:
            self.class_tiles[c] += meta["pixels"][c] > 0
            self.class_pixels[c] += meta["pixels"][c]

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "positives": self.positives,
                "negatives": self.samples - self.positives,
                "class_tiles": self.class_tiles, "class_pixels": self.class_pixels}


def pack_chunk(spec: PackSpec, split: str, index: int, keys: list[str], block_zoom: int,
               features: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """Write one chunk of a split as atomic shards; unreadable tiles are skipped
    and counted. ``features``: feature counts per class by tile key (mask stats)."""
    tally, skips = _Tally(spec.classes), Skips()
    with AtomicShardWriter(spec.layout.shards, split, spec.maxcount, spec.maxsize,
                           start_shard=index * SHARD_STRIDE, max_shards=SHARD_STRIDE) as out:
        for key in track(keys, len(keys), f"pack {split}[{index}]"):
            tile = grid.parse_tile_key(key)
            try:
                mask, mask_png = read_mask(spec, tile)
                image = read_image(spec, tile)
                sdt = read_distance(spec, tile) if spec.distance else None
            except SkipTile as skip:
                skips.add(skip.reason, str(skip))
                continue
            block = grid.tile_key(grid.parent(tile, block_zoom))
            meta = tile_meta(spec, tile, pixel_counts(spec, mask), split=split, block=block,
                             features=(features or {}).get(key))
            out.write(sample_dict(key, image, spec.image_format, mask_png, meta, sdt))
            tally.add(meta)
    shards = [dict(s.to_dict(), split=split) for s in out.shards]
    return {**tally.to_dict(), "shards": shards, "skipped": skips.to_dict()}


# --- manifest ----------------------------------------------------------------------------

def _merge_skips(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total, examples = Counter(), []
    for p in parts:
        total.update(p["counts"])
        examples.extend(p["examples"])
    return {"counts": dict(total), "examples": examples[:_MAX_EXAMPLES]}


def write_manifest(spec: PackSpec, plan: dict[str, Any], scan_skips: list[dict[str, Any]],
                   packed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Combine chunk results into ``shards/manifest.json`` (written atomically) and
    delete ``train-``/``val-`` shards that it does not list."""
    splits: dict[str, Any] = {}
    shards: list[dict[str, Any]] = []
    for split in SPLITS:
        results = packed.get(split, [])
        tally = _Tally(spec.classes)
        for r in results:
            tally.samples += r["samples"]
            tally.positives += r["positives"]
            for c in spec.classes:
                tally.class_tiles[c] += r["class_tiles"][c]
                tally.class_pixels[c] += r["class_pixels"][c]
            shards.extend(r["shards"])
        p = plan["splits"][split]
        splits[split] = {**tally.to_dict(), "blocks": len(p["blocks"]),
                         "negatives_available": p["negatives_available"],
                         "shards": [s["name"] for s in shards if s["split"] == split]}
    manifest = {
        "version": 1,
        "classes": list(spec.classes),
        "trained_classes": list(spec.trained),
        "zoom": spec.zoom,
        "tile_size": spec.tile_size,
        "image_format": spec.image_format,
        # Every sample carries <key>.sdt.png (the per-instance distance target).
        "distance": spec.distance,
        "block_zoom": plan["block_zoom"],
        "negative_ratio": spec.negative_ratio,
        "splits": splits,
        "shards": shards,
        "skipped": _merge_skips(scan_skips + [r["skipped"] for rs in packed.values()
                                              for r in rs]),
    }
    storage.write_json(spec.layout.manifest, manifest)
    listed = {s["name"] for s in shards}
    for uri in storage.glob(storage.join(spec.layout.shards, "*.tar")):
        name = uri.rsplit("/", 1)[-1]
        if _STALE.match(name) and name not in listed:
            storage.remove(uri)
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Changes whenever any shard's content changes (shard sha256s are in it)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def shard_uris(manifest_uri: str, split: str) -> list[str]:
    """URIs of one split's shards as listed by a manifest (next to its shards)."""
    manifest = storage.read_json(manifest_uri)
    base = manifest_uri.rsplit("/", 1)[0]
    return [storage.join(base, s["name"]) for s in manifest["shards"] if s["split"] == split]


# --- extra samples (mining) ------------------------------------------------------------

@dataclass
class ExtraSample:
    """A sample to add to training, e.g. a mined hard negative.

    ``mask`` None = all background (the model was wrong everywhere it fired);
    otherwise a uint8 label map like the run's masks (0, i+1, 255 ignore).
    ``image`` None = the run's fetched tile. ``sdt``: a distance target like the
    harvested sdt PNGs (uint8 1..255), packed when given; None = the sample has
    none (training sees distance 0 there: no distance loss).
    """

    tile: Tile
    mask: np.ndarray | None = None
    image: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    sdt: np.ndarray | None = None


def extra_distance(spec: PackSpec, key: str, sdt: np.ndarray) -> bytes:
    """An extra sample's own distance target as PNG bytes; PackError when unusable."""
    if sdt.shape != (spec.tile_size, spec.tile_size):
        raise PackError(f"extra sample {key}: sdt shape is {sdt.shape}, expected "
                        f"({spec.tile_size}, {spec.tile_size})")
    bad = invalid_distance_value(sdt)
    if bad is not None:
        raise PackError(f"extra sample {key}: {bad}")
    return png_bytes(sdt)


def pack_extra_samples(spec: PackSpec, samples: Iterable[ExtraSample], prefix: str) -> list[str]:
    """Pack extra training samples as ``<prefix>-NNNNNN.tar`` next to the run's
    shards (e.g. prefix ``mined-r01``); returns their URIs for the data module.

    Older shards with the same prefix that this call did not rewrite are removed,
    so rerunning a round never mixes two versions.
    """
    if not _PREFIX.match(prefix) or prefix in SPLITS:
        raise PackError(f"shard prefix {prefix!r}: use lowercase letters, digits, '-' or '_', "
                        f"not {' or '.join(SPLITS)}")
    shards_dir = spec.layout.shards
    with AtomicShardWriter(shards_dir, prefix, spec.maxcount, spec.maxsize) as out:
        for s in samples:
            key = grid.tile_key(s.tile)
            if s.image is not None:
                image = encode_image(np.ascontiguousarray(s.image, dtype=np.uint8),
                                     spec.image_format, spec.webp_quality)
            else:
                try:
                    image = read_image(spec, s.tile)
                except SkipTile as skip:
                    raise PackError(str(skip)) from None
            mask = (np.zeros((spec.tile_size, spec.tile_size), np.uint8) if s.mask is None
                    else np.asarray(s.mask, dtype=np.uint8))
            if mask.shape != (spec.tile_size, spec.tile_size):
                raise PackError(f"extra sample {key}: mask is {mask.shape[1]}x{mask.shape[0]} "
                                f"px, tile_size is {spec.tile_size}")
            bad = invalid_mask_value(spec, mask)
            if bad is not None:
                raise PackError(f"extra sample {key}: {bad}")
            sdt = None if s.sdt is None else extra_distance(spec, key, np.asarray(s.sdt))
            meta = tile_meta(spec, s.tile, pixel_counts(spec, mask), split="train",
                             origin=prefix) | s.meta
            out.write(sample_dict(key, image, spec.image_format, png_bytes(mask), meta, sdt))
    written = {sh.name for sh in out.shards}
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    for uri in storage.glob(storage.join(shards_dir, f"{prefix}-*.tar")):
        name = uri.rsplit("/", 1)[-1]
        if pattern.match(name) and name not in written:
            storage.remove(uri)
    get_logger().info("packed %d extra samples as %s", sum(sh.count for sh in out.shards),
                      ", ".join(sorted(written)) or "nothing")
    return [storage.join(shards_dir, sh.name) for sh in out.shards]


# --- Prefect tasks -----------------------------------------------------------------------

@stage_task(name="pack-scan")
def scan_task(spec: PackSpec, tiles: list[Tile]) -> dict[str, Any]:
    return scan_tiles(spec, tiles)


@stage_task(name="pack-shards")
def pack_task(spec: PackSpec, split: str, index: int, keys: list[str], block_zoom: int,
              features: dict[str, dict[str, int]]) -> dict[str, Any]:
    return pack_chunk(spec, split, index, keys, block_zoom, features)
