"""A CLI run stopped by SIGTERM/SIGINT (what `prefect worker`, systemd, Kubernetes
and Ctrl-C send) ends within seconds, non-zero, with no child left and its flow
runs Crashed; a run killed with `kill -9` is cleaned up by the next run on its
run dir (its flow runs Crashed, its MLflow runs KILLED, its temporaries gone).

The run under test is a real `mapgap predict` whose DataLoader worker (forked
from the fork server) blocks on one tile that is a FIFO nobody writes: a run
stuck mid-stage, every time, without timing races."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from mapgap.layout import RunLayout
from tests.helpers_inference import SIZE, make_config, write_mosaic
from tests.test_scale_out import random_checkpoint

COLS, ROWS = 4, 2


def stuck_scene(root: Path) -> tuple[object, Path, Path]:
    """A predict config (one loader worker) whose last tile is a FIFO: (cfg, config, fifo)."""
    root.mkdir(parents=True, exist_ok=True)
    overrides = {"inference": {"model": random_checkpoint(root / "model.pt"),
                               "tiles_per_task": 4, "loader_workers": 1, "min_area_m2": 0}}
    cfg = make_config(root, cols=COLS, rows=ROWS, **overrides)
    mosaic = np.random.default_rng(3).integers(0, 255, (ROWS * SIZE, COLS * SIZE, 3), np.uint8)
    layout = RunLayout(cfg.run_uri)
    tiles = write_mosaic(layout, mosaic)
    fifo = Path(layout.image(tiles[-1]))
    fifo.unlink()
    os.mkfifo(fifo)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    return cfg, config, fifo


def cli_env(level: str = "INFO") -> dict[str, str]:
    """The CLI's environment: no API URL, so it starts its own temporary server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_LOGGING_LEVEL"] = level
    return env


def start_mapgap(*args: str, log: Path) -> subprocess.Popen:
    """`mapgap <args>` in a session of its own (signals to its group hit only it)."""
    env = cli_env()
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "mapgap.cli", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_stuck(proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> list:
    """Wait for the loader worker (a child of the fork server); the run's descendants."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        tree = psutil.Process(proc.pid).children(recursive=True)
        forkservers = [p for p in tree if "forkserver" in " ".join(_cmdline(p))]
        if any(p.children() for p in forkservers):
            return tree
        time.sleep(0.2)
    pytest.fail(f"the run never reached its loader worker (exit {proc.poll()}):\n"
                + log.read_text()[-3000:])


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


STATES_SCRIPT = """
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print(json.dumps({i: client.read_flow_run(i).state.name for i in sys.argv[1:]}))
"""


def flow_run_states(log: Path) -> dict[str, str]:
    """Flow run id -> state name of the flow runs a `mapgap` log links to, read as
    the CLI would (its environment, so its Prefect database, through a temporary
    server): not through this process's API, which other tests may have moved."""
    ids = sorted(set(re.findall(r"/runs/flow-run/([0-9a-f-]{36})", log.read_text())))
    assert ids, log.read_text()[-3000:]
    out = subprocess.run([sys.executable, "-c", STATES_SCRIPT, *ids], env=cli_env("WARNING"),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the process group", "SIGINT to the process"])
def test_signal_stops_the_run_cleanly(tmp_path: Path, how: str) -> None:
    _, config, _ = stuck_scene(tmp_path)
    log = tmp_path / "mapgap.log"
    proc = start_mapgap("predict", str(config), log=log)
    try:
        tree = wait_until_stuck(proc, log)
        sent = time.monotonic()
        if how.startswith("SIGTERM"):
            os.killpg(proc.pid, signal.SIGTERM)  # as systemd or a terminal's job control
        else:
            os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=2)
    for p in alive:
        p.kill()
    text = log.read_text()
    assert took < 15, text[-2000:]
    assert code == 128 + (signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
    assert not alive, [" ".join(_cmdline(p)) for p in alive]
    assert text.rstrip().splitlines()[-1].startswith("error: stopped by SIG"), text[-2000:]
    assert "ConnectError" not in text
    states = flow_run_states(log)
    assert set(states.values()) <= {"Crashed", "Cancelled"}, states


def write_tile(path: Path) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", np.full((SIZE, SIZE, 3), 128, np.uint8))
    path.write_bytes(buf.tobytes())


@pytest.mark.slow
def test_the_run_after_a_kill_9_cleans_up_after_it(tmp_path: Path) -> None:
    from mapgap import tracking

    cfg, config, fifo = stuck_scene(tmp_path)
    log = tmp_path / "killed.log"
    proc = start_mapgap("predict", str(config), log=log)
    try:
        tree = wait_until_stuck(proc, log)
        # An MLflow run the process had open when it died (as a training has).
        mlflow = tracking.client(tracking.tracking_uri(cfg))
        left_open = mlflow.create_run(tracking.ensure_experiment(cfg)).info.run_id
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        p.kill()
    assert not alive, [" ".join(_cmdline(p)) for p in alive]  # not even its API server
    killed_runs = flow_run_states(log)
    assert "Running" in killed_runs.values()
    # What a kill -9 mid-write leaves: atomic_open's temporaries; and look-alikes of others.
    run_dir = Path(cfg.run_uri)
    stale = [run_dir / ".fetch_report.json.tmp-0a1b2c3d",
             run_dir / "predict" / "probs" / ".7.png.tmp-deadbeef"]
    others = [run_dir / "notes.json.tmp-0a1b2c3d", run_dir / ".cache.tmp-xyz",
              tmp_path / ".outside-the-run-dir.tmp-0a1b2c3d"]
    for path in stale + others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    fifo.unlink()
    write_tile(fifo)

    rerun = subprocess.run([sys.executable, "-m", "mapgap.cli", "predict", str(config)],
                           env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 flow run(s) marked Crashed, 1 MLflow run(s) KILLED" in rerun.stderr
    states = flow_run_states(log)
    assert all(state == "Crashed" for state in states.values()), states
    run = mlflow.get_run(left_open)
    assert run.info.status == "KILLED" and run.data.tags[tracking.CRASHED_TAG] == "true"
    assert [p for p in stale if p.exists()] == []
    assert [p for p in others if not p.exists()] == []
