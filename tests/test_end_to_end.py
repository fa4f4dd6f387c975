"""The whole pipeline (harvest -> fetch -> pack -> train -> mine -> predict -> dedup)
on a small demo town, with ``storage.root`` on a moto S3 server on 127.0.0.1 and
the imagery from a local tile server: every stage's files land on S3, the
credentials appear in no log or output, a rerun reuses every task,
``--refresh dedup`` recomputes dedup alone, and ``--refresh fetch`` downloads the
tiles again and re-predicts where a tile changed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mapgap import grid, storage
from mapgap.layout import RunLayout
from mapgap.tasks.predict import stored_tiles

SECRET = "mapgap-e2e-secret-7f3a9c"  # a distinctive secret key to look for in outputs
TINY = {
    "pack": {"split_zoom_offset": 1},
    "train": {"architecture": "scratch", "epochs": 2, "steps_per_epoch": 8, "batch_size": 4,
              "crop_size": 128, "width": 8, "depth": 3, "norm": "group", "num_workers": 0,
              "preview_samples": 2},
    "mining": {"rounds": 1, "min_gain": 0.0, "finetune_epochs": 1, "max_negatives": 8},
    "inference": {"loader_workers": 0, "batch_size": 4, "tiles_per_task": 8},
    "runner": {"kind": "thread", "workers": 2},
}


def read_all(read: Any, **kwargs: Any) -> list[Any]:
    """Every item of a Prefect API listing (the server caps a page at 200)."""
    out: list[Any] = []
    while page := read(limit=200, offset=len(out), **kwargs):
        out += page
    return out


def task_states(tag: str) -> dict[str, set[str]]:
    """Task name (without its run suffix) -> the states its runs ended in."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterSubFlowRuns,
        TaskRunFilterTags,
    )

    with get_client(sync_client=True) as client:  # tasks, not the stage subflows
        runs = read_all(client.read_task_runs, task_run_filter=TaskRunFilter(
            tags=TaskRunFilterTags(all_=[tag]), subflow_runs=TaskRunFilterSubFlowRuns(
                exists_=False)))
    out: dict[str, set[str]] = {}
    for r in runs:
        out.setdefault(r.name.rsplit("-", 1)[0], set()).add(r.state.name)
    return out


def run_pipeline(cfg: Any, tag: str, **kwargs: Any) -> dict[str, Any]:
    from prefect import tags

    from mapgap.flows.pipeline import pipeline_flow
    from mapgap.orchestration import configured

    with tags(tag):
        return configured(pipeline_flow, cfg)(cfg, **kwargs)


def change_one_tile(tiles_dir: Path) -> str:
    """Paint a bright roof on one served tile; returns its tile key."""
    import cv2

    path = sorted(tiles_dir.glob("*/*/*.png"))[5]
    img = cv2.imread(str(path))
    img[100:140, 100:150] = (60, 90, 200)
    cv2.imwrite(str(path), img)
    z, x = path.parent.parent.name, path.parent.name
    return f"z{z}_{x}_{path.stem}"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Any:
    import boto3
    import s3fs

    from mapgap.conf.schema import deep_merge, load_config
    from mapgap.demo import DEMO_YAML, building_truth, demo_overrides
    from mapgap.demo_scene import generate_scene
    from mapgap.flows.pipeline import pipeline_flow  # noqa: F401 - sets up Prefect's logging
    from mapgap.tasks.evaluate import evaluate_run
    from mapgap.tileserver import TileServer

    tmp = tmp_path_factory.mktemp("e2e")
    scene = generate_scene(tmp / "scene", seed=3, size_m=600.0)
    saved = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET  # moto takes any; we look for this one
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mapgap-e2e")
    # Every INFO line of the run, whoever logged it, also sent to the Prefect API as
    # in a CLI run (after importing prefect: its logging setup resets the root logger).
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        with TileServer(scene.tiles_dir, "{z}/{x}/{y}.png") as server:
            overrides = deep_merge(demo_overrides(scene, server.url_template, tmp), TINY)
            overrides["storage"] = {"root": "s3://mapgap-e2e/demo"}
            cfg = load_config(DEMO_YAML, overrides)
            first = run_pipeline(cfg, "e2e-first")
            again = run_pipeline(cfg, "e2e-again")
            refreshed = run_pipeline(cfg, "e2e-refresh", refresh=["dedup"])
            probs = stored_tiles(RunLayout(cfg.run_uri).probabilities, cfg.zoom)
            changed = change_one_tile(scene.tiles_dir)  # the imagery provider updated it
            refetched = run_pipeline(cfg, "e2e-refetch", refresh=["fetch"],
                                     stages=["fetch", "predict", "dedup"])
        result = evaluate_run(cfg.run_uri, building_truth(scene), scene.withheld)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        os.environ["AWS_SECRET_ACCESS_KEY"] = saved
        s3fs.S3FileSystem.clear_instance_cache()
    return SimpleNamespace(cfg=cfg, scene=scene, first=first, again=again,
                           refreshed=refreshed, refetched=refetched, changed=changed, probs=probs,
                           result=result, records=records)


@pytest.mark.slow
def test_every_stage_writes_to_s3(e2e: Any) -> None:
    layout = RunLayout(e2e.cfg.run_uri)
    assert e2e.cfg.run_uri == "s3://mapgap-e2e/demo/runs/demo"
    for stage in ("harvest", "fetch", "pack", "train", "mine", "predict", "dedup"):
        assert e2e.first[stage], stage
    expected = [layout.labels("building"), layout.mask_stats, layout.fetch_report,
                layout.manifest, layout.mining_pool, layout.predict_meta, layout.predictions,
                *(layout.output(f) for f in ("candidates.geojson", "candidates.osm",
                                             "unsupported_osm.geojson", "quality_grid.geojson",
                                             "report.json", "review.html"))]
    assert [u for u in expected if not storage.exists(u)] == []
    for pattern in ("tiles/18/*/*.png", "masks/18/*/*.png", "shards/train-*.tar",
                    "shards/val-*.tar", "train/*/model.pt", "mining/round-01/model.pt",
                    "predict/probs/18/*/*.png", "mlartifacts/**/MLmodel",
                    "prefect-results/*"):
        assert storage.glob(storage.join(e2e.cfg.run_uri, pattern)), pattern
    report = json.loads(storage.read_text(layout.output("report.json")))
    assert report["mlflow_run_id"] and report["model"].startswith("models:/building")
    # A real model on a real (tiny) town: the evaluation runs on the S3 outputs.
    assert e2e.result["predictions_vs_truth"]["predictions"] > 0


@pytest.mark.slow
def test_credentials_never_appear_in_logs_or_outputs(e2e: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = read_all(client.read_flow_runs, flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=["e2e-first"])))
        logs = read_all(client.read_logs, log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
    assert len(runs) >= 8  # the pipeline and its 7 stage subflows
    assert logs and e2e.records
    assert not [m for m in [log.message for log in logs] + e2e.records if SECRET in m]
    layout = RunLayout(e2e.cfg.run_uri)
    files = storage.glob(storage.join(e2e.cfg.run_uri, "**/*.json")) + [
        layout.output("review.html"), layout.output("candidates.osm")]
    assert len(files) > 10
    assert not [u for u in files if SECRET.encode() in storage.read_bytes(u)]
    assert SECRET not in json.dumps([e2e.first, e2e.again, e2e.refreshed], default=str)


@pytest.mark.slow
def test_rerun_reuses_every_task_and_refresh_recomputes_one_stage(e2e: Any) -> None:
    first, again, refreshed = (task_states(t) for t in ("e2e-first", "e2e-again",
                                                        "e2e-refresh"))
    assert all(states == {"Completed"} for states in first.values()), first
    assert {"train", "predict-tiles", "dedup-class", "mining-round"} <= set(first)
    # Unchanged inputs: every task of the second run is Cached (some stages even
    # skip submitting what is already on S3, such as stored tiles).
    assert again and all(states == {"Cached"} for states in again.values()), again
    assert {"train", "predict-tiles", "dedup-class"} <= set(again)
    # --refresh dedup: dedup's tasks run again, everything upstream stays cached,
    # and the outputs are the same.
    dedup_tasks = {"dedup-class", "review-outputs"}
    assert {n for n, s in refreshed.items() if s == {"Completed"}} == dedup_tasks, refreshed
    assert all(s == {"Cached"} for n, s in refreshed.items() if n not in dedup_tasks)
    assert refreshed.keys() == again.keys()
    assert e2e.refreshed["dedup"] == e2e.first["dedup"]



@pytest.mark.slow
def test_refresh_fetch_downloads_again_and_repredicts_what_changed(e2e: Any) -> None:
    """The nightly job (fetch + predict + dedup) after the provider updated a tile."""
    states = task_states("e2e-refetch")
    assert states["fetch-tiles"] == {"Completed"}
    assert e2e.refetched["fetch"]["fetched"] == 16
    # S3 versions are content hashes: the changed tile's batch (and any batch next
    # to it) is predicted again, and everything after it runs on the new probabilities.
    assert "Completed" in states["predict-tiles"]
    assert states["merge-polygons"] == states["dedup-class"] == {"Completed"}
    assert "train" not in states and "mining-round" not in states
    now = stored_tiles(RunLayout(e2e.cfg.run_uri).probabilities, e2e.cfg.zoom)
    tile = grid.parse_tile_key(e2e.changed)
    assert now.keys() == e2e.probs.keys() and now[tile] != e2e.probs[tile]
