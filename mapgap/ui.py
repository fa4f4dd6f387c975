"""``mapgap ui``: the Prefect UI and the MLflow UI side by side on 127.0.0.1.

Runs launched from the CLI use a project-local PREFECT_HOME, so the Prefect
server started here reads the same database and shows every past run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


def _start(args: list[str], defaults: dict[str, str] | None = None,
           **env: str) -> subprocess.Popen:
    """A server in its own process group, so that stopping it stops its workers too.

    ``defaults``: the user's environment wins over them; ``env`` wins over it.
    """
    return subprocess.Popen(args, env={**(defaults or {}), **os.environ, **env},
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process group; SIGKILL what is still up after 20 s."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut this short
        signal.signal(sig, signal.SIG_IGN)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # also workers their leader left behind
        p.wait()


def prefect_ui_env(port: int) -> dict[str, str]:
    """Where the Prefect UI (its /ui-settings) tells the browser the API is.

    ``--port`` alone leaves it at the default 4200 (or at a PREFECT_API_URL from
    the environment), and the page cannot reach its own server. The user's
    PREFECT_UI_API_URL wins (e.g. behind a proxy).
    """
    api = f"http://127.0.0.1:{port}/api"
    return {"PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", api),
            "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_API_URL": api}


def serve_uis(prefect_port: int, mlflow_port: int, tracking_uri: str | None) -> None:
    """Run both UIs until Ctrl-C or SIGTERM (or until one of them exits)."""
    tracking_uri = tracking_uri or default_tracking_uri()
    # `kill` and process managers send SIGTERM: stop the servers as on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    urls = (f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}")
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start([_tool("prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(prefect_port)], **prefect_ui_env(prefect_port)))
        # One viewer needs one worker, and no job runner (MLflow's GenAI jobs): both
        # default to 4-11 processes that a small machine would feel.
        procs.append(_start([_tool("mlflow"), "ui", "--backend-store-uri", tracking_uri,
                             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                            {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
        _wait_until_up(urls[0] + "/api/health", procs[0])
        _wait_until_up(urls[1], procs[1])
        print(f"Prefect UI: {urls[0]}")
        print(f"MLflow UI:  {urls[1]}  (store: {tracking_uri})")
        print("To send new runs to this server: export PREFECT_API_URL=" + urls[0] + "/api")
        print("Ctrl-C stops both.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        gone = next(p for p in procs if p.poll() is not None)
        raise SystemExit(f"error: {gone.args[0]} exited with code {gone.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        _stop(procs)
