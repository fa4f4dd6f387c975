"""Pack flow: pair the fetched image tiles with the harvest stage's masks and
pack them into WebDataset shards with a manifest.

Every step is a batch of tiles in a cached task, keyed by what determines its
output (the pack spec and a digest of the fetch report and mask stats), so a
rerun after a crash only redoes unfinished batches, new imagery or masks repack,
and changing a training setting never does.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import flow

from mapgap import grid, storage
from mapgap.conf.schema import PipelineConfig
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.pack import (
    PackError,
    PackSpec,
    chunks,
    distance_targets,
    pack_task,
    plan_split,
    scan_task,
    write_manifest,
)
from mapgap.tasks.predict import stored_imagery_digest, stored_tiles


def inputs_digest(layout: RunLayout, zoom: int, distance: bool = False) -> str:
    """Digest of the stored imagery and the mask stats (and, with ``distance``, of
    the sdt PNGs' versions, which a re-harvest can change without changing the
    masks): new inputs -> repack; a rerun that fetched nothing new keeps the shards."""
    h = hashlib.sha256(stored_imagery_digest(layout, zoom).encode())
    for uri in (layout.mask_stats, layout.masks_drawn_from):  # masks, and the labels drawn
        if storage.exists(uri):
            h.update(storage.read_bytes(uri))
    if distance:
        sdt_dir = layout.signed_distance(grid.Tile(0, 0, zoom)).rsplit("/", 3)[0]
        for tile, version in sorted(stored_tiles(sdt_dir, zoom).items()):
            h.update(f"{grid.tile_key(tile)}={version};".encode())
    return h.hexdigest()[:16]


@flow(name="pack")
def pack_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Shards + ``shards/manifest.json``; returns counts and URIs."""
    log = get_logger()
    layout = RunLayout(cfg.run_uri)
    if not storage.exists(layout.mask_stats):
        raise PackError(f"{layout.mask_stats}: no masks (run `mapgap harvest` first)")
    features = {k: v.get("features", {}) for k, v in storage.read_json(layout.mask_stats).items()}
    tiles = grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom)
    spec = PackSpec.from_config(cfg, inputs_digest(layout, cfg.zoom, distance_targets(cfg)))
    scans = [scan_task.submit(spec, batch)
             for batch in grid.iter_batches(tiles, spec.tiles_per_task)]
    scanned = [f.result() for f in scans]
    pixels = {k: v for r in scanned for k, v in r["pixels"].items()}
    plan = plan_split(spec, pixels)
    args = {split: [(spec, split, i, keys, plan["block_zoom"],
                     {k: features[k] for k in keys if k in features})
                    for i, keys in enumerate(chunks(spec, p["keys"]))]
            for split, p in plan["splits"].items()}
    packed = {split: [f.result() for f in [pack_task.submit(*a) for a in todo]]
              for split, todo in args.items()}
    for split, results in packed.items():  # a cached result whose shards were deleted
        for i, r in enumerate(results):
            if not all(storage.exists(storage.join(layout.shards, s["name"]))
                       for s in r["shards"]):
                packed[split][i] = pack_task.with_options(refresh_cache=True)(*args[split][i])
    manifest = write_manifest(spec, plan, [r["skipped"] for r in scanned], packed)
    splits = manifest["splits"]
    log.info("pack: %s; skipped %s", "; ".join(
        f"{s} {v['samples']} samples ({v['positives']} positive) in {len(v['shards'])} shards"
        for s, v in splits.items()), manifest["skipped"]["counts"] or "none")
    return {
        "manifest": layout.manifest,
        "block_zoom": manifest["block_zoom"],
        **{f"{s}_samples": v["samples"] for s, v in splits.items()},
        **{f"{s}_shards": len(v["shards"]) for s, v in splits.items()},
        "skipped": manifest["skipped"]["counts"],
    }
