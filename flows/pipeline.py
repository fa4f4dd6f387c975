"""The master flow: every stage as a subflow, in DAG order.

Stages hand over through the run dir (see mapgap.layout), and every stage task
is cached on its inputs + code version, so rerunning after a failure redoes only
what did not finish. ``refresh`` names stages whose cached results are ignored;
downstream tasks whose inputs changed then recompute on their own.
"""

from __future__ import annotations

import importlib
from typing import Any

from mapgap.conf.schema import PipelineConfig
from prefect import flow
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from mapgap.orchestration import configured
from mapgap.progress import get_logger

STAGE_ORDER = ("harvest", "fetch", "pack", "train", "mine", "predict", "dedup")


def stage_flow(stage: str) -> Any:
    module = importlib.import_module(f"mapgap.flows.{stage}")
    return getattr(module, f"{stage}_flow")


@flow(name="mapgap-pipeline", log_prints=True)
def pipeline_flow(
    cfg: PipelineConfig, refresh: list[str] | None = None, stages: list[str] | None = None
) -> dict[str, Any]:
    """Harvest -> fetch -> pack -> train -> mine -> predict -> dedup.

    ``stages`` limits the run to some stages (e.g. a nightly label refresh +
    predict), which then read the other stages' latest outputs from the run dir.
    """
    refresh = refresh or []
    unknown = sorted((set(refresh) | set(stages or [])) - set(STAGE_ORDER))
    if unknown:
        known = ", ".join(STAGE_ORDER)
        raise ValueError(f"unknown stage(s): {', '.join(unknown)}; stages: {known}")
    log = get_logger()
    summary: dict[str, Any] = {}
    for stage in STAGE_ORDER:
        if (stages and stage not in stages) or (stage == "mine" and cfg.mining.rounds == 0):
            continue
        log.info("stage %s%s", stage, " (refresh)" if stage in refresh else "")
        with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: stage in refresh}):
            summary[stage] = configured(stage_flow(stage), cfg)(cfg)
    return summary
