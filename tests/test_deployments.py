"""deployments/prefect.yaml works end to end: a real Prefect server on
127.0.0.1, a process work pool, `prefect deploy --all`, a triggered run that a
worker executes to `Completed`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, shared_path

PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect(*args: str, env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} not healthy after {timeout_s} s")


@pytest.mark.slow
def test_deploy_trigger_and_worker_completes(tmp_path: Path) -> None:
    kampala = shared_path("kampala")
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"nightly-labels-and-predict", "weekly-retrain-and-mine"} <= names
    assert all(s["timezone"] for d in spec["deployments"] for s in d.get("schedules", []))

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "deployed",
        "storage": {"root": str(tmp_path / "out")},
        "aoi": [32.5936891, 0.3501871, 32.5947488, 0.3511602],
        "zoom": 21,
        "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
        "labels": {"source": str(kampala / "labels.geojson")},
        "imagery": {"source": str(kampala) + "/OAM-{x}-{y}-{z}.png"},
    }))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_LOGGING_LEVEL": "INFO"}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_healthy(api, server)
        prefect("work-pool", "create", "mapgap-process", "--type", "process", env=env)
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml",
                env=env)
        out = prefect("deployment", "run", "mapgap-scheduled/on-demand",
                      "--param", f"config={config}", "--param", 'stages=["harvest"]', env=env)
        assert "Created flow run" in out
        prefect("worker", "start", "--pool", "mapgap-process", "--run-once", env=env,
                timeout=300)
        runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            api + "/flow_runs/filter", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"})).read())
        top = [r for r in runs if r["parameters"].get("config") == str(config)]
        assert [r["state_type"] for r in top] == ["COMPLETED"]
        assert (tmp_path / "out" / "runs" / "deployed" / "labels" / "building.parquet").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
