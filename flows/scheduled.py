"""The entrypoint for deployments: a config path in, the pipeline (or some of
its stages) out. Deployment parameters must be plain JSON, so the config is
loaded here rather than passed as a model."""

from __future__ import annotations

from typing import Any

from prefect import flow

from mapgap.conf.schema import load_config
from mapgap.flows.pipeline import pipeline_flow
from mapgap.orchestration import configured


@flow(name="mapgap-scheduled")
def scheduled_flow(
    config: str, refresh: list[str] | None = None, stages: list[str] | None = None
) -> dict[str, Any]:
    """Run ``stages`` (default: all) of the pipeline for ``config``."""
    cfg = load_config(config)
    return configured(pipeline_flow, cfg)(cfg, refresh=refresh, stages=stages)
