"""Mine flow: hard-negative mining rounds on top of the train stage's model.

Pool -> round 0 (the trained model's false positives on the held-back pool) ->
rounds 1..``mining.rounds``, each one cached task whose inputs include the
previous round's checkpoint URI and content fingerprint: a rerun after a failure
in round 3 finds rounds 1-2 cached and resumes at round 3. Rounds stop early when
the held-back false-positive rate improves by less than ``mining.min_gain``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mapgap import storage, tracking
from mapgap.artifacts import publish_table
from mapgap.conf.schema import PipelineConfig
from mapgap.layout import RunLayout
from mapgap.progress import get_logger
from mapgap.tasks.mining import (
    baseline_task,
    choose_final,
    promote_final,
    round_task,
    start_parent_run,
    stop_reason,
    trained_base,
)
from mapgap.tasks.mining_pool import pool_task
from mapgap.tasks.predict import stored_imagery_digest

TABLE_COLUMNS = ("round", "fp_pixels_per_tile", "fp_rate", "fp_objects", "mistakes_found",
                 "negatives_added", "val_iou", "val_object_f1", "val_precision", "wall_time_s",
                 "cached", "model_uri")


def pool_inputs_digest(cfg: PipelineConfig) -> str:
    """Content of what decides the pool: new masks, imagery or areas -> new pool."""
    layout = RunLayout(cfg.run_uri)
    uris = [layout.mask_stats]
    if isinstance(cfg.labels.complete_areas, str):
        uris.append(cfg.labels.complete_areas)
    return storage.fingerprint(uris) + stored_imagery_digest(layout, cfg.zoom)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    out = {c: r.get(c) for c in TABLE_COLUMNS}
    for c in ("fp_pixels_per_tile", "val_iou", "val_object_f1", "val_precision"):
        out[c] = None if out[c] is None else round(out[c], 4)
    out["fp_rate"] = round(r["fp_rate"], 6)
    return out


@flow(name="mine")
def mine_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Returns the numbers of every round (0 = the trained model), why it stopped,
    the final model URI and its aliases, and the parent MLflow run id."""
    log = get_logger()
    m = cfg.mining
    base = trained_base(cfg)
    pool = pool_task(cfg, base["val_shards"], pool_inputs_digest(cfg))
    parent = start_parent_run(cfg, base, pool)
    c = tracking.client(tracking.tracking_uri(cfg))
    try:
        state = baseline_task(cfg, pool, base, parent, return_state=True)
        history = [{**state.result(), "cached": state.name == "Cached"}]
        stop = f"ran all {m.rounds} rounds"
        for k in range(1, m.rounds + 1):
            previous = {key: v for key, v in history[-1].items() if key != "cached"}
            state = round_task(cfg, k, pool, base, previous, parent, return_state=True)
            r = {**state.result(), "cached": state.name == "Cached"}
            history.append(r)
            reason = stop_reason(previous, r, m.min_gain)
            if reason:
                stop = reason
                break
        final = choose_final(history, m.max_iou_drop)
        aliases = promote_final(cfg, final, base, parent)
        rows = [_row(r) for r in history]
        publish_table("mining-rounds", rows, description=f"Hard-negative mining: {stop}")
        c.set_terminated(parent, "FINISHED")
    except BaseException:
        c.set_terminated(parent, "FAILED")
        raise
    first, last = history[0], history[-1]
    log.info("mining: %s; FP px per held-back tile %.1f -> %.1f, val IoU %.3f -> %.3f; "
             "final model %s (round %d, %s)", stop, first["fp_pixels_per_tile"],
             last["fp_pixels_per_tile"], first["val_iou"], last["val_iou"], final["model_uri"],
             final["round"], ", ".join(aliases) or "no alias")
    return {"rounds": rows, "stopped": stop, "pool": pool, "parent_run_id": parent,
            "final_round": final["round"], "final_model_uri": final["model_uri"],
            "final_checkpoint": final["checkpoint"], "aliases": aliases,
            "round_runs": {r["round"]: r["run_id"] for r in history}}
