"""Reruns after failures: a faulty tile batch, then a rerun that reuses every
finished task (`Cached`) and ends byte-identical to an uninterrupted run; and a
`kill -9` mid-run, then a rerun: no half-written file, identical outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mapgap.grid import tile_key
from mapgap.layout import RunLayout
from mapgap.tasks.predict import FAULTY_TILE_ENV
from tests.helpers_inference import SIZE, make_config, write_mosaic
from tests.test_scale_out import random_checkpoint

COLS, ROWS = 4, 2


def scene(root: Path) -> tuple:
    root.mkdir(parents=True, exist_ok=True)
    ckpt = random_checkpoint(root / "model.pt")
    overrides = {"inference": {"model": ckpt, "tiles_per_task": 2, "loader_workers": 0,
                               "min_area_m2": 0}}
    cfg = make_config(root, cols=COLS, rows=ROWS, **overrides)
    mosaic = np.random.default_rng(3).integers(0, 255, (ROWS * SIZE, COLS * SIZE, 3), np.uint8)
    mosaic[50:400, 100:900] = 240
    tiles = write_mosaic(RunLayout(cfg.run_uri), mosaic)
    return cfg, tiles, overrides


def outputs(cfg) -> dict[str, bytes]:
    root = Path(cfg.run_uri)
    files = sorted(root.glob("predict/probs/**/*.png")) + [root / "predictions.geojson"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def task_states(flow_state) -> dict[str, int]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    states: dict[str, int] = {}
    for r in runs:
        key = f"{r.name.rsplit('-', 1)[0]}:{r.state.name}"
        states[key] = states.get(key, 0) + 1
    return states


def run_flow(cfg):
    from mapgap.flows.predict import predict_flow
    from mapgap.orchestration import configured

    return configured(predict_flow, cfg)(cfg, return_state=True)


def test_faulty_batch_then_rerun_reuses_finished_tasks(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    clean_cfg, _, _ = scene(tmp_path / "clean")
    assert run_flow(clean_cfg).is_completed()

    cfg, tiles, _ = scene(tmp_path / "faulty")
    monkeypatch.setenv(FAULTY_TILE_ENV, tile_key(tiles[-1]))
    failed = run_flow(cfg)
    assert failed.is_failed()
    assert task_states(failed)["predict-tiles:Completed"] == 3
    monkeypatch.delenv(FAULTY_TILE_ENV)

    rerun = run_flow(cfg)
    assert rerun.is_completed()
    states = task_states(rerun)
    assert states["predict-tiles:Cached"] == 3 and states["predict-tiles:Completed"] == 1
    assert outputs(cfg) == outputs(clean_cfg)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun(tmp_path: Path) -> None:
    clean_cfg, _, _ = scene(tmp_path / "clean")
    assert run_flow(clean_cfg).is_completed()

    cfg, _, overrides = scene(tmp_path / "killed")
    config = tmp_path / "killed" / "run.yaml"
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    config.write_text(yaml.safe_dump(data))
    mapgap = [sys.executable, "-m", "mapgap.cli", "predict", str(config)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(mapgap, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    probs = Path(cfg.run_uri) / "predict" / "probs"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(probs.glob("**/*.png"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < len(list(probs.glob("**/*.png"))) < COLS * ROWS

    subprocess.run(mapgap, env=env, check=True, capture_output=True, timeout=300)
    leftovers = [p for p in Path(cfg.run_uri).rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    assert outputs(cfg) == outputs(clean_cfg)
