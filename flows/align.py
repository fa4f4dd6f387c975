"""Align flow: the labels moved onto the imagery, before pack and training, and
OSM moved the same way before dedup (``labels.align``; off by default).

OSM outlines are often drawn on other imagery, a few metres off. A reference
model (``labels.align.model``) predicts the tiles that have labels; per block
of tiles the shift of the labels that best matches its probabilities is
measured (:mod:`mapgap.tasks.alignment`), logged and applied to each class's
labels; the masks are then drawn again from the shifted labels. Harvest, pack
and dedup use the shifted labels from then on, as long as they were made from
the labels harvested now (:mod:`mapgap.tasks.aligned_labels`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mapgap import grid, storage
from mapgap.conf.schema import PipelineConfig
from mapgap.flows.harvest import rasterize_masks
from mapgap.flows.predict import follow
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.aligned_labels import aligned_dir, aligned_summary_uri
from mapgap.tasks.alignment import (
    AlignmentError,
    AlignSettings,
    estimate_offsets_task,
    shift_labels_task,
)
from mapgap.tasks.predict import (
    PredictSettings,
    band_names,
    blocked_order,
    imagery_digest,
    load_model,
    predict_batch,
    resolve_model,
    tiles_to_predict,
)


def aligned_classes(cfg: PipelineConfig, predicted: list[str]) -> list[str]:
    """The classes to align: ``labels.align.classes``, else every area class the
    reference model predicts."""
    align = cfg.labels.align
    assert align is not None
    if align.classes:
        missing = [c for c in align.classes if c not in predicted]
        if missing:
            raise AlignmentError(f"labels.align.classes: the reference model {align.model} "
                                 f"does not predict {missing[0]!r} (it predicts "
                                 f"{', '.join(predicted)})")
        return list(align.classes)
    names = [c.name for c in cfg.classes if c.geometry == "polygon" and c.name in predicted]
    if not names:
        raise AlignmentError(f"labels.align.model: {align.model} predicts none of this "
                             f"run's area classes (it predicts {', '.join(predicted)})")
    return names


def labelled_tiles(layout: RunLayout, versions: dict[grid.Tile, str], classes: list[str]
                   ) -> dict[grid.Tile, str]:
    """The imagery tiles with a feature of ``classes``: alignment needs no others."""
    stats = storage.read_json(layout.mask_stats)
    keep = {k for k, v in stats.items() if any(v.get("features", {}).get(c) for c in classes)}
    return {t: v for t, v in versions.items() if grid.tile_key(t) in keep}


@flow(name="align")
def align_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Reference probabilities -> offsets per class and block -> shifted labels ->
    masks drawn again. Returns the global offset and trusted blocks per class."""
    align = cfg.labels.align
    if align is None:
        return {"skipped": "labels.align is not set"}
    log = get_logger()
    layout = RunLayout(cfg.run_uri)
    if not storage.exists(layout.labels_summary) or not storage.exists(layout.mask_stats):
        raise AlignmentError(f"{layout.labels_summary}: no labels (run `mapgap harvest` first)")
    harvested = storage.read_json(layout.labels_summary)
    ref = resolve_model(cfg, align.model, "labels.align.model")
    model = load_model(ref)
    bands = band_names(model)
    classes = aligned_classes(cfg, list(model.classes))
    versions, _ = tiles_to_predict(cfg, layout)
    tiles = labelled_tiles(layout, versions, classes)
    if not tiles:
        raise AlignmentError(f"{layout.mask_stats}: no tile with imagery has a feature of "
                             f"{', '.join(classes)}: nothing to align")
    settings = PredictSettings.from_config(cfg)
    n = cfg.inference.tiles_per_task
    batches = list(grid.iter_batches(blocked_order(list(tiles), n), n))
    digests = [imagery_digest(b, tiles) for b in batches]
    out = aligned_dir(layout)
    log.info("align: %s predicts %d labelled tiles in %d batches", ref.spec, len(tiles),
             len(batches))
    follow([predict_batch.submit(cfg.run_uri, [grid.tile_key(t) for t in b], ref, settings,
                                 d, out) for b, d in zip(batches, digests, strict=True)],
           len(tiles), log)
    estimate = AlignSettings(align.max_shift_m, align.block_zoom_offset, align.min_support,
                             align.min_prominence)
    probs = f"{ref.key}|{settings}|{'|'.join(digests)}"
    shifted = {}
    for name in classes:
        sha = harvested["classes"][name]["sha256"]
        offsets = estimate_offsets_task(cfg.run_uri, name, bands.index(name), cfg.zoom,
                                        cfg.tile_size, estimate, f"{sha}|{probs}")
        shifted[name] = shift_labels_task(cfg.run_uri, name, offsets, sha)
        log.info("align %s: labels moved by east %+.2f m north %+.2f m (median of %d of %d "
                 "blocks; each trusted block by its own)", name,
                 shifted[name]["global_east_m"], shifted[name]["global_north_m"],
                 shifted[name]["trusted_blocks"], shifted[name]["blocks"])
    storage.write_json(aligned_summary_uri(layout), shifted)
    masks = rasterize_masks(cfg, harvested)
    return {"model": ref.spec, "model_version": ref.key, "tiles": len(tiles),
            "classes": {n: {k: v[k] for k in ("global_east_m", "global_north_m",
                                              "trusted_blocks", "blocks", "offsets", "uri")}
                        for n, v in shifted.items()},
            "masks": masks["tiles"]}
