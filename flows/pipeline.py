"""The master flow: every stage as a subflow, in DAG order.

Stages hand over through the run dir (see mapgap.layout), and every stage task
is cached on its inputs + code version, so rerunning after a failure redoes only
what did not finish. ``refresh`` names stages whose cached results are ignored;
downstream tasks whose inputs changed then recompute on their own.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from mapgap import storage
from mapgap.artifacts import markdown_table, publish_link, publish_markdown, publish_table
from mapgap.conf.schema import PipelineConfig
from mapgap.layout import RunLayout
from mapgap.orchestration import configured
from mapgap.progress import get_logger

STAGE_ORDER = ("harvest", "fetch", "align", "pack", "train", "mine", "predict", "dedup")


def stage_flow(stage: str) -> Any:
    module = importlib.import_module(f"mapgap.flows.{stage}")
    return getattr(module, f"{stage}_flow")


@flow(name="mapgap-pipeline", log_prints=True)
def pipeline_flow(
    cfg: PipelineConfig, refresh: list[str] | None = None, stages: list[str] | None = None
) -> dict[str, Any]:
    """Harvest -> fetch -> align -> pack -> train -> mine -> predict -> dedup (align
    only with ``labels.align``, mine only with ``mining.rounds``).

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
        if (stages and stage not in stages) or (stage == "mine" and cfg.mining.rounds == 0) \
                or (stage == "align" and cfg.labels.align is None):
            continue
        log.info("stage %s%s", stage, " (refresh)" if stage in refresh else "")
        with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: stage in refresh}):
            summary[stage] = configured(stage_flow(stage), cfg)(cfg)
    publish_run_artifacts(cfg, summary)
    return summary


REVIEW_FILES = ("candidates.geojson", "candidates.osm", "unsupported_osm.geojson",
                "quality_grid.geojson", "report.json", "review.html")


def flat_scalars(result: Any, prefix: str = "") -> dict[str, Any]:
    """A stage's summary as dotted keys -> numbers and strings (lists are counted)."""
    out: dict[str, Any] = {}
    for key, value in (result or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, name + "."))
        elif isinstance(value, list):
            out[name + " (count)"] = len(value)
        elif isinstance(value, bool | int | float | str):
            out[name] = value
    return out


def mlflow_lines(cfg: PipelineConfig, summary: dict[str, Any]) -> list[str]:
    """Where the run's models and metrics are in MLflow, and how to open them."""
    from mapgap import tracking

    uri = tracking.tracking_uri(cfg)
    runs = {"train": (summary.get("train") or {}).get("run_id"),
            "mining (parent)": (summary.get("mine") or {}).get("parent_run_id")}
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    lines = [f"Tracking store: `{uri}`" + ("" if uri.startswith("http") else
                                           " (open it with `mapgap ui`)"), ""]
    exp = tracking.client(uri).get_experiment_by_name(tracking.experiment_name(cfg))
    for what, run_id in runs.items():
        if run_id and exp is not None:
            lines.append(f"- {what}: [{run_id}]({base}/#/experiments/{exp.experiment_id}"
                         f"/runs/{run_id})")
    model = (summary.get("predict") or {}).get("model")
    if model:
        lines.append(f"- predictions made with `{model}`")
    return lines


def publish_run_artifacts(cfg: PipelineConfig, summary: dict[str, Any]) -> None:
    """What a person checks in the Prefect UI: counts per stage, the MLflow runs,
    where the outputs are, the fetch failures, a link to the review map."""
    layout = RunLayout(cfg.run_uri)
    lines = [f"# mapgap run `{cfg.name}`", "", f"Run dir: `{cfg.run_uri}`", ""]
    for stage, result in summary.items():
        rows = [{"key": k, "value": v} for k, v in flat_scalars(result).items()]
        lines += [f"## {stage}", "", markdown_table(rows) if rows else "_no summary_", ""]
    lines += ["## MLflow", "", *mlflow_lines(cfg, summary), ""]
    outputs = [layout.output(f) for f in REVIEW_FILES if storage.exists(layout.output(f))]
    lines += ["## Outputs", "", *([f"- `{uri}`" for uri in outputs] or ["_none yet_"]), ""]
    publish_markdown(f"{cfg.name}-summary", "\n".join(lines), "Counts per stage and outputs")
    if storage.exists(layout.fetch_report):
        report = storage.read_json(layout.fetch_report)
        failed = report.get("failures", []) + report.get("missing", [])
        publish_table(f"{cfg.name}-fetch-failures", failed, "Tiles that could not be fetched")
    review = layout.output("review.html")
    if storage.exists(review):
        link = review if storage.is_remote(review) else Path(review).as_uri()
        publish_link(f"{cfg.name}-review", link, "review.html", "Map for mappers to review")
