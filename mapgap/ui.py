"""``mapgap ui``: the Prefect UI and the MLflow UI side by side on 127.0.0.1.

Runs launched from the CLI use a project-local PREFECT_HOME, so the Prefect
server started here reads the same database and shows every past run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEMO_TRACKING_GLOB = "demo-out/runs/*/mlflow.db"


def default_tracking_uri() -> str:
    found = sorted(Path.cwd().glob(DEMO_TRACKING_GLOB))
    if not found:
        raise SystemExit(
            "error: no MLflow store found (run `make demo` first or pass a CONFIG to `mapgap ui`)"
        )
    return f"sqlite:///{found[0].resolve()}"


def _wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: {proc.args[0]} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: {url} did not answer within {timeout_s:.0f} s")


def _tool(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def serve_uis(prefect_port: int, mlflow_port: int, tracking_uri: str | None) -> None:
    tracking_uri = tracking_uri or default_tracking_uri()
    env = dict(os.environ)
    procs = [
        subprocess.Popen([_tool("prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(prefect_port)], env=env),
        subprocess.Popen([_tool("mlflow"), "ui", "--backend-store-uri", tracking_uri,
                          "--host", "127.0.0.1", "--port", str(mlflow_port)], env=env),
    ]
    urls = (f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}")
    try:
        _wait_until_up(urls[0] + "/api/health", procs[0])
        _wait_until_up(urls[1], procs[1])
        print(f"Prefect UI: {urls[0]}")
        print(f"MLflow UI:  {urls[1]}  (store: {tracking_uri})")
        print("To send new runs to this server: export PREFECT_API_URL=" + urls[0] + "/api")
        print("Ctrl-C stops both.")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
