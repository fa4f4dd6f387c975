"""Hard-negative mining: find where the trained model fires on things that are not
there, teach it that they are background, repeat.

Negatives only ever come from the pool where OSM is complete, minus its held-back
part and the val tiles (:mod:`mapgap.tasks.mining_pool` says why and how).

One round (:func:`run_round`): predict the mined part with the last model,
collect its mistakes (:mod:`mapgap.tasks.mistakes`), keep the
``mining.max_negatives`` most confident as tile-sized samples (the tile, or a
window centred on the mistake) with their true mask, pack them as extra train
shards, fine-tune from the last checkpoint on the original train shards + every
negative so far, measure false positives on the held-back part. Files of round k
live in ``RunLayout.mining_round(k)``: ``picks.json``, ``shards/mined-rNN-lJ-*.tar``
(layer J = a tile's J-th sample: shard keys are tile keys and must not repeat in
a shard), ``model.pt`` and ``result.json``; round 0 is the trained model.

MLflow: one parent run per mining run (tag ``mapgap.stage = mining``) with every
round's numbers as ``mining/<name>`` at step k; each round's fine-tune is a child
run (tag ``mlflow.parentRunId``) holding its training curves, the same numbers and
the artifact ``mining/picks.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from torch import nn

from mapgap import grid, storage, tracking
from mapgap.conf.mining import FAIL_ROUND_ENV
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.models.inference import MODEL_FILE, read_checkpoint
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger, track
from mapgap.tasks import train as training
from mapgap.tasks.complete_areas import burn, trusted_pixels
from mapgap.tasks.geometry import project
from mapgap.tasks.labels import read_labels
from mapgap.tasks.mining_pool import MiningError, complete_area
from mapgap.tasks.mistakes import (
    Mistake,
    centred_offset,
    false_positives,
    find_mistakes,
    negative_mask,
)
from mapgap.tasks.neighbourhood import TileCache, row_major, with_margin
from mapgap.tasks.pack import (
    ExtraSample,
    PackSpec,
    SkipTile,
    manifest_digest,
    pack_extra_samples,
    read_mask,
    shard_uris,
)
from mapgap.tasks.predict import (
    PredictSettings,
    blocked_order,
    forward,
    read_image,
    resolve_device,
    window_loader,
)
from mapgap.tasks.shards import IGNORE, trained_classes

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "mapgap.stage"
ROUND_TAG = "mapgap.mining_round"
KEY_TAG = "mapgap.mining_key"
PICKS_FILE = "picks.json"
RESULT_FILE = "result.json"


class InjectedFailure(RuntimeError):
    """Raised on purpose at the start of round ``$MAPGAP_FAIL_MINING_ROUND``."""


# --- what the train stage left ---------------------------------------------------------

def trained_base(cfg: Any) -> dict[str, Any]:
    """The train stage's finished training for this config and these shards (the
    same fingerprint ``train_flow`` uses): shards, checkpoint, val metrics, model."""
    layout = RunLayout(cfg.run_uri)
    if not storage.exists(layout.manifest):
        raise MiningError(f"{layout.manifest}: no shard manifest (run `mapgap pack` first)")
    digest = manifest_digest(storage.read_json(layout.manifest))
    train_shards = shard_uris(layout.manifest, "train")
    val_shards = shard_uris(layout.manifest, "val")
    key = training.fingerprint(cfg, trained_classes(cfg), train_shards, val_shards, digest,
                               None, cfg.train.epochs)
    result_uri = storage.join(layout.train, key, RESULT_FILE)
    if not storage.exists(result_uri):
        raise MiningError(f"{result_uri}: no finished training for this config and these "
                          "shards (run `mapgap train` first)")
    r = storage.read_json(result_uri)
    return {
        "train_shards": train_shards, "val_shards": val_shards, "data_digest": digest,
        "checkpoint": r["checkpoint_uri"],
        "checkpoint_fingerprint": storage.fingerprint([r["checkpoint_uri"]]),
        "val_metrics": r["val_metrics"], "run_id": r["run_id"],
        "registered_model": r["registered_model"], "version": r["version"],
        "model_uri": r["model_uri"],
    }


def val_precision(metrics: dict[str, float], classes: Sequence[str]) -> float:
    """Mean val precision over the trained classes."""
    values = [metrics[f"val/precision_{c}"] for c in classes if f"val/precision_{c}" in metrics]
    return float(np.mean(values)) if values else float("nan")


# --- predicting and scanning pool tiles -------------------------------------------------

def iter_probabilities(layout: RunLayout, tiles: list[Tile], model: nn.Module,
                       s: PredictSettings) -> Iterator[tuple[Tile, np.ndarray]]:
    """(tile, float32 [C, S, S] probabilities) with the seam-free context windows of
    batch inference, kept in memory (mining must not overwrite ``predict/``)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    model = model.to(device).eval()
    ordered = row_major(tiles)
    m, size = s.window_margin, s.tile_size
    with torch.inference_mode():
        for idx, x in window_loader(layout, ordered, s, device):
            x = x.to(device).float().div_(255)
            probs = forward(model, x, s.tta)[:, :, m:m + size, m:m + size].float().cpu().numpy()
            for i, p in zip(idx.tolist(), probs, strict=True):
                yield ordered[i], p


class LabelIndex:
    """A batch's OSM labels per class in EPSG:3857 with an STRtree each, to burn the
    pixels each tile's labels touch."""

    def __init__(self, layout: RunLayout, classes: Sequence[str], tiles: Sequence[Tile]):
        bounds = np.array([grid.tile_bounds(t) for t in tiles])
        bbox = (bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max())
        self.index: dict[str, tuple[np.ndarray, shapely.STRtree]] = {}
        for c in classes:
            uri = layout.labels(c)
            if not storage.exists(uri):
                raise MiningError(f"{uri}: no harvested labels for class {c!r} "
                                  "(run `mapgap harvest` first)")
            lonlat = read_labels(uri, bbox=bbox).geometry.values.to_numpy()
            geoms = project(lonlat, grid.WGS84, grid.WEB_MERCATOR)
            self.index[c] = (geoms, shapely.STRtree(geoms))

    def touched(self, class_name: str, tile: Tile, size: int) -> np.ndarray:
        geoms, tree = self.index[class_name]
        hits = tree.query(shapely.box(*grid.tile_xy_bounds(tile)), predicate="intersects")
        return burn(geoms[hits], tile, size, all_touched=True)


def _predicted(cfg: Any, model: nn.Module, tiles: list[Tile]
               ) -> Iterator[tuple[Tile, np.ndarray, LabelIndex]]:
    """(tile, probabilities, its batch's labels), batch by batch."""
    layout = RunLayout(cfg.run_uri)
    settings = PredictSettings.from_config(cfg)
    n = cfg.inference.tiles_per_task
    for batch in grid.iter_batches(blocked_order(tiles, n), n):
        labels = LabelIndex(layout, list(model.classes), batch)
        for tile, probs in iter_probabilities(layout, batch, model, settings):
            yield tile, probs, labels


def scan_tiles(cfg: Any, model: nn.Module, keys: Sequence[str],
               area: shapely.Geometry | None, what: str) -> tuple[list[Mistake], dict[str, Any]]:
    """Predict ``keys`` and return (mistakes, false-positive pixel counts per class)."""
    spec = PackSpec.from_config(cfg)
    size, m = cfg.tile_size, cfg.mining
    classes = list(model.classes)
    values = {c: spec.classes.index(c) + 1 for c in classes}
    mistakes: list[Mistake] = []
    counts = {c: Counter() for c in classes}
    tiles = [grid.parse_tile_key(k) for k in keys]
    for tile, probs, labels in track(_predicted(cfg, model, tiles), len(tiles), what):
        try:
            mask, _ = read_mask(spec, tile)
        except SkipTile as skip:
            raise MiningError(str(skip)) from None
        trusted = trusted_pixels(area, tile, size)
        valid = mask != IGNORE if trusted is None else (mask != IGNORE) & trusted
        for i, c in enumerate(classes):
            truth = mask == values[c]
            touched = labels.touched(c, tile, size) | truth
            mistakes += find_mistakes(tile, probs[i], touched, trusted, c, m.threshold,
                                      m.min_area_m2)
            counts[c].update(false_positives(probs[i], touched, truth, valid, m.threshold))
    return mistakes, {c: dict(v) for c, v in counts.items()}


def evaluate_holdout(cfg: Any, model: nn.Module, pool: dict[str, Any],
                     area: shapely.Geometry | None) -> dict[str, Any]:
    """False positives of ``model`` on the held-back pool tiles."""
    keys = storage.read_json(pool["uri"])["holdout"]
    mistakes, counts = scan_tiles(cfg, model, keys, area, "mining eval")
    fp = sum(v.get("fp_pixels", 0) for v in counts.values())
    background = sum(v.get("background_pixels", 0) for v in counts.values())
    return {"holdout_tiles": len(keys), "fp_pixels": fp,
            "fp_pixels_per_tile": fp / max(len(keys), 1),
            "fp_rate": fp / background if background else 0.0,
            "fp_objects": len(mistakes), "per_class": counts}


# --- picking and packing negatives ------------------------------------------------------

def pick_negatives(mistakes: Sequence[Mistake], cap: int, size: int,
                   centred: bool) -> list[dict[str, Any]]:
    """The ``cap`` most confident mistakes that each give a distinct sample: whole
    tiles give one sample per tile; centred windows skip a mistake whose centre is
    within a quarter tile of one already picked on the same tile (its window would
    show the same place). ``layer`` j = the tile's j-th sample (see :func:`pack_picks`)."""
    ranked = sorted(mistakes, key=lambda m: (-m.score, -m.area_m2, m.tile, m.class_name, m.bbox))
    centres: dict[str, list[tuple[float, float]]] = {}
    picks: list[dict[str, Any]] = []
    for m in ranked:
        if len(picks) >= cap:
            break
        c0, r0, c1, r1 = m.bbox
        centre = ((c0 + c1) / 2, (r0 + r1) / 2)
        taken = centres.setdefault(m.tile, [])
        if taken and (not centred or any(math.dist(centre, t) < size / 4 for t in taken)):
            continue
        picks.append({"tile": m.tile, "score": m.score, "layer": len(taken),
                      "mistake": m.to_dict()})
        taken.append(centre)
    return picks


class NegativeSampler:
    """Tile-sized training samples for picks: image + true mask, "ignore" wherever
    OSM is not trusted - outside the complete areas, and on every tile that is not
    mined (held-back and val tiles lend context pixels, never labels)."""

    def __init__(self, cfg: Any, mined: Sequence[str], area: shapely.Geometry | None):
        self.layout = RunLayout(cfg.run_uri)
        self.spec = PackSpec.from_config(cfg)
        self.size = cfg.tile_size
        self.centred = cfg.mining.negative_sample == "centred"
        self.mined = set(mined)
        self.area = area
        self.images = TileCache(lambda t: read_image(self.layout, self.size, t), 16)
        self.masks = TileCache(self._mask, 16)

    def _mask(self, tile: Tile) -> np.ndarray:
        if grid.tile_key(tile) not in self.mined:
            return np.full((self.size, self.size), IGNORE, np.uint8)
        mask, _ = read_mask(self.spec, tile)
        return negative_mask(mask, trusted_pixels(self.area, tile, self.size))

    def sample(self, pick: dict[str, Any], k: int) -> ExtraSample:
        tile = grid.parse_tile_key(pick["tile"])
        meta = {"mining_round": k, "score": pick["score"], "mistake": pick["mistake"]}
        if not self.centred:
            return ExtraSample(tile, self._mask(tile), self.images.get(tile), meta)
        half = self.size // 2
        dx, dy = centred_offset(Mistake.from_dict(pick["mistake"]), self.size)
        window = (slice(half + dy, half + dy + self.size), slice(half + dx, half + dx + self.size))
        image = with_margin(tile, self.images, half)[window]
        mask = with_margin(tile, self.masks, half)[window]
        return ExtraSample(tile, mask, image, {**meta, "window_offset_px": [dx, dy]})


def pack_picks(cfg: Any, k: int, picks: Sequence[dict[str, Any]], mined: Sequence[str],
               area: shapely.Geometry | None) -> list[str]:
    """Shards of round k's negatives in its round dir, one shard set per layer:
    samples are keyed by tile, and a key must not repeat inside a shard."""
    round_dir = RunLayout(cfg.run_uri).mining_round(k)
    spec = replace(PackSpec.from_config(cfg), run_uri=round_dir)  # shards in the round dir
    sampler = NegativeSampler(cfg, mined, area)
    shards: list[str] = []
    for layer in sorted({p["layer"] for p in picks}):
        chosen = (sampler.sample(p, k) for p in picks if p["layer"] == layer)
        shards += pack_extra_samples(spec, chosen, f"mined-r{k:02d}-l{layer}")
    for uri in storage.glob(storage.join(spec.layout.shards, f"mined-r{k:02d}-l*.tar")):
        if uri not in shards:  # a layer of an earlier attempt
            storage.remove(uri)
    return shards


def mine_negatives(cfg: Any, k: int, pool: dict[str, Any], previous: dict[str, Any],
                   area: shapely.Geometry | None) -> dict[str, Any]:
    """Round ``k``'s picks (``picks.json``) and their shards, from the previous model.

    A rerun with the same model and pool reuses them: the picks are written last,
    after the shards, and record what they were computed from.
    """
    round_dir = RunLayout(cfg.run_uri).mining_round(k)
    picks_uri = storage.join(round_dir, PICKS_FILE)
    made_from = {"checkpoint_fingerprint": previous["checkpoint_fingerprint"],
                 "pool": pool["digest"], "mining": cfg.mining.model_dump(mode="json")}
    if storage.exists(picks_uri):
        done = storage.read_json(picks_uri)
        if done.get("made_from") == made_from and all(storage.exists(s) for s in done["shards"]):
            get_logger().info("round %d: reusing %s", k, picks_uri)
            return done
    model = read_checkpoint(previous["checkpoint"])
    keys = storage.read_json(pool["uri"])["mine"]
    mistakes, _ = scan_tiles(cfg, model, keys, area, f"mining round {k}")
    picks = pick_negatives(mistakes, cfg.mining.max_negatives, cfg.tile_size,
                           cfg.mining.negative_sample == "centred")
    shards = pack_picks(cfg, k, picks, keys, area) if picks else []
    out = {"round": k, "made_from": made_from, "tiles_scanned": len(keys),
           "mistakes_found": len(mistakes), "negatives": picks, "shards": shards}
    storage.write_json(picks_uri, out)
    return out


# --- MLflow -----------------------------------------------------------------------------

def mining_key(cfg: Any, base: dict[str, Any], pool: dict[str, Any]) -> str:
    """What identifies one mining run (its parent MLflow run)."""
    key = {"mining": cfg.mining.model_dump(mode="json"),
           "train": cfg.train.model_dump(mode="json", exclude={"tracking_uri", "experiment"}),
           "run": cfg.run_uri, "base": base["checkpoint_fingerprint"], "pool": pool["digest"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def start_parent_run(cfg: Any, base: dict[str, Any], pool: dict[str, Any]) -> str:
    """The parent MLflow run of this mining run: reused (and marked running again)
    when a failed mining run is resumed."""
    from mlflow.entities import Param

    uri = tracking.tracking_uri(cfg)
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(cfg)
    key = mining_key(cfg, base, pool)
    found = c.search_runs([exp], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    name = tracking.model_name(trained_classes(cfg))
    run = c.create_run(exp, run_name=f"mine-{name}", tags={
        STAGE_TAG: "mining", KEY_TAG: key, "mapgap.base_model": base["model_uri"]})
    params = {**tracking.flat_params(cfg.mining, "mining."), "pool.rule": pool["rule"],
              "pool.mine_tiles": str(pool["mine"]), "pool.holdout_tiles": str(pool["holdout"]),
              "base.model_uri": base["model_uri"], "base.run_id": base["run_id"]}
    # Like Lightning's logger: MLflow rejects long values (e.g. a long tile list).
    c.log_batch(run.info.run_id, params=[Param(k, v[:250]) for k, v in params.items()])
    return run.info.run_id


ROUND_METRICS = ("fp_pixels_per_tile", "fp_rate", "fp_objects", "fp_pixels", "mistakes_found",
                 "negatives_added", "negatives_total", "val_iou", "val_object_f1", "val_precision",
                 "wall_time_s")


def log_round(cfg: Any, result: dict[str, Any], run_ids: Sequence[str]) -> None:
    """A round's numbers as ``mining/<name>`` at step k in each of ``run_ids``."""
    from mlflow.entities import Metric

    c = tracking.client(tracking.tracking_uri(cfg))
    now = int(time.time() * 1000)
    metrics = [Metric(f"mining/{k}", float(result[k]), now, result["round"])
               for k in ROUND_METRICS if result.get(k) is not None]
    for run_id in run_ids:
        c.log_batch(run_id, metrics=metrics)


def log_picks(cfg: Any, run_id: str, picks_uri: str) -> None:
    c = tracking.client(tracking.tracking_uri(cfg))
    with tempfile.TemporaryDirectory(prefix="mapgap-mining-") as tmp:
        local = Path(tmp, PICKS_FILE)
        local.write_bytes(storage.read_bytes(picks_uri))
        c.log_artifact(run_id, str(local), "mining")


# --- rounds -----------------------------------------------------------------------------

def _round_result(cfg: Any, k: int, checkpoint: str, evaluation: dict[str, Any], val_metrics: dict,
                  classes: Sequence[str], **extra: Any) -> dict[str, Any]:
    return {"round": k, "checkpoint": checkpoint,
            "checkpoint_fingerprint": storage.fingerprint([checkpoint]),
            "val_iou": val_metrics[training.PIXEL_METRIC],
            "val_object_f1": val_metrics.get(training.OBJECT_METRIC),
            "val_score": val_metrics.get(training.selection_metric(cfg), val_metrics[
                training.PIXEL_METRIC]),
            "val_precision": val_precision(val_metrics, classes),
            **{key: v for key, v in evaluation.items() if key != "per_class"},
            "fp_per_class": evaluation["per_class"], **extra}


def run_baseline(cfg: Any, pool: dict[str, Any], base: dict[str, Any],
                 parent_run_id: str) -> dict[str, Any]:
    """Round 0: the trained model's false positives on the held-back pool."""
    t0 = time.monotonic()
    area = complete_area(cfg)
    evaluation = evaluate_holdout(cfg, read_checkpoint(base["checkpoint"]), pool, area)
    result = _round_result(cfg, 0, base["checkpoint"], evaluation, base["val_metrics"],
                           trained_classes(cfg), negative_shards=[], negatives_added=0,
                           negatives_total=0, mistakes_found=None, run_id=base["run_id"],
                           registered_model=base["registered_model"], version=base["version"],
                           model_uri=base["model_uri"],
                           wall_time_s=round(time.monotonic() - t0, 2))
    storage.write_json(storage.join(RunLayout(cfg.run_uri).mining_round(0), RESULT_FILE), result)
    log_round(cfg, result, [parent_run_id])
    get_logger().info("mining baseline: %.1f FP px per held-back tile (rate %.5f), val IoU %.3f",
                      result["fp_pixels_per_tile"], result["fp_rate"], result["val_iou"])
    return result


def fail_if_requested(k: int) -> None:
    if os.environ.get(FAIL_ROUND_ENV, "").strip() == str(k):
        raise InjectedFailure(f"{FAIL_ROUND_ENV}={k}: round {k} fails on purpose")


def run_round(cfg: Any, k: int, pool: dict[str, Any], base: dict[str, Any],
              previous: dict[str, Any], parent_run_id: str) -> dict[str, Any]:
    """Mining round ``k`` from the previous round's model (see the module docstring)."""
    fail_if_requested(k)
    t0 = time.monotonic()
    log = get_logger()
    classes = trained_classes(cfg)
    round_dir = RunLayout(cfg.run_uri).mining_round(k)
    area = complete_area(cfg)
    picks = mine_negatives(cfg, k, pool, previous, area)
    negatives = previous["negative_shards"] + picks["shards"]
    added = len(picks["negatives"])
    counts = {"mistakes_found": picks["mistakes_found"], "negatives_added": added,
              "negatives_total": previous["negatives_total"] + added,
              "negative_shards": negatives, "picks": storage.join(round_dir, PICKS_FILE)}
    if not added:  # nothing to learn from: the previous model stands
        log.info("round %d: no mistakes in the mined pool; stopping", k)
        result = {**previous, "round": k, **counts, "fine_tuned": False,
                  "wall_time_s": round(time.monotonic() - t0, 2)}
        storage.write_json(storage.join(round_dir, RESULT_FILE), result)
        log_round(cfg, result, [parent_run_id])
        return result
    digest = hashlib.sha256(f"{base['data_digest']}:{storage.fingerprint(negatives)}"
                            .encode()).hexdigest()[:16]
    tuned = cfg.train.model_copy(update={"lr": cfg.train.lr * cfg.mining.finetune_lr_factor})
    trained = training.train_model(
        cfg.model_copy(update={"train": tuned}), base["train_shards"] + negatives,
        base["val_shards"], data_digest=digest, init_from=previous["checkpoint"],
        epochs=cfg.mining.finetune_epochs, promote=False,
        run_name=f"mine-{tracking.model_name(classes)}-round-{k:02d}",
        tags={PARENT_TAG: parent_run_id, STAGE_TAG: "mining", ROUND_TAG: str(k)})
    c = tracking.client(tracking.tracking_uri(cfg))
    c.set_tag(trained["run_id"], PARENT_TAG, parent_run_id)  # also when training was reused
    checkpoint = storage.write_bytes(storage.join(round_dir, MODEL_FILE),
                                     storage.read_bytes(trained["checkpoint_uri"]))
    evaluation = evaluate_holdout(cfg, read_checkpoint(checkpoint), pool, area)
    result = _round_result(cfg, k, checkpoint, evaluation, trained["val_metrics"], classes,
                           **counts, fine_tuned=True, run_id=trained["run_id"],
                           registered_model=trained["registered_model"],
                           version=trained["version"], model_uri=trained["model_uri"],
                           wall_time_s=round(time.monotonic() - t0, 2))
    log_round(cfg, result, [parent_run_id, trained["run_id"]])
    log_picks(cfg, trained["run_id"], counts["picks"])
    storage.write_json(storage.join(round_dir, RESULT_FILE), result)
    log.info("round %d: %d mistakes, %d negatives added; %.1f FP px per held-back tile "
             "(rate %.5f), val IoU %.3f", k, result["mistakes_found"], added,
             result["fp_pixels_per_tile"], result["fp_rate"], result["val_iou"])
    return result


# --- the end of a mining run ------------------------------------------------------------

def relative_gain(before: float, after: float) -> float:
    """Relative FP-rate improvement (0 when there was nothing left to improve)."""
    return (before - after) / before if before > 0 else 0.0


def stop_reason(previous: dict[str, Any], result: dict[str, Any], min_gain: float
                ) -> str | None:
    """Why mining stops after ``result``'s round, or None to go on."""
    k = result["round"]
    if not result["negatives_added"]:
        return f"round {k} found no mistake to learn from"
    gain = relative_gain(previous["fp_rate"], result["fp_rate"])
    if gain < min_gain:
        return f"round {k} improved the FP rate by {gain:.1%} < mining.min_gain {min_gain:.1%}"
    return None


def choose_final(history: Sequence[dict[str, Any]], max_drop: float) -> dict[str, Any]:
    """The round with the lowest held-back FP rate that is at most ``max_drop`` below
    the trained model on val pixel IoU and on val object F1 (round 0 always
    qualifies): mining must never make the model worse for mappers."""
    base = history[0]

    def kept(r: dict[str, Any], key: str) -> bool:
        return base.get(key) is None or (r.get(key) or 0.0) >= base[key] - max_drop

    ok = [r for r in history if kept(r, "val_iou") and kept(r, "val_object_f1")]
    return min(ok, key=lambda r: (r["fp_rate"], r["round"]))


def promote_final(cfg: Any, final: dict[str, Any], base: dict[str, Any],
                  parent_run_id: str) -> list[str]:
    """The final model of a mining run replaces its base model: it becomes the
    candidate, and the champion when the base model is the champion (mining chose it
    over the base) or when its val IoU beats the current champion's. Rounds are
    registered without aliases: only this choice is promoted. Returns its aliases."""
    c = tracking.client(tracking.tracking_uri(cfg))
    name, version = final["registered_model"], final["version"]
    if final["round"]:
        tracking.promote(c, name, version, final["val_score"], replaces=base["version"])
    c.set_model_version_tag(name, version, ROUND_TAG, str(final["round"]))
    c.set_tag(parent_run_id, "mapgap.final_model", final["model_uri"])
    return sorted(c.get_model_version(name, version).aliases)


# --- Prefect tasks ----------------------------------------------------------------------

@stage_task(name="mining-baseline")
def baseline_task(cfg: Any, pool: dict[str, Any], base: dict[str, Any],
                  parent_run_id: str) -> dict[str, Any]:
    return run_baseline(cfg, pool, base, parent_run_id)


@stage_task(name="mining-round")
def round_task(cfg: Any, k: int, pool: dict[str, Any], base: dict[str, Any],
               previous: dict[str, Any], parent_run_id: str) -> dict[str, Any]:
    """One cached round: ``previous`` carries the last checkpoint's URI and content
    fingerprint, so a rerun resumes at the first round that did not finish."""
    return run_round(cfg, k, pool, base, previous, parent_run_id)
