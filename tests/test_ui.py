"""`mapgap ui` starts the real Prefect and MLflow servers on 127.0.0.1, prints
their URLs, and leaves no process behind when it is stopped."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import psutil
import pytest
import yaml

from tests.test_deployments import free_port

URL_LINES = {"Prefect": re.compile(r"^Prefect UI: (http://127\.0\.0\.1:\d+)"),
             "MLflow": re.compile(r"^MLflow UI:\s+(http://127\.0\.0\.1:\d+)")}


def read_lines(stream: IO[str], into: queue.Queue) -> None:
    """Drain the pipe (the servers write to it too) so that nobody blocks on it."""
    for line in stream:
        into.put(line.rstrip("\n"))


def wait_for_urls(lines: queue.Queue, proc: subprocess.Popen, timeout_s: float) -> dict[str, str]:
    """The URLs `mapgap ui` prints once both servers answer."""
    urls: dict[str, str] = {}
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(urls) < len(URL_LINES):
        if time.monotonic() > deadline or proc.poll() is not None:
            tail = "\n".join(seen[-30:])
            pytest.fail(f"mapgap ui printed no URLs (exit code {proc.poll()}):\n{tail}")
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        for name, pattern in URL_LINES.items():
            if m := pattern.match(line):
                urls[name] = m.group(1)
    return urls


def start_ui(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, queue.Queue, int, int]:
    """`mapgap ui` on free, non-default ports: (process, its output lines, ports)."""
    (tmp_path / "labels.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    config = tmp_path / "ui.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ui", "storage": {"root": "out"}, "aoi": [32.59, 0.34, 32.60, 0.35], "zoom": 18,
        "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
        "labels": {"source": "labels.geojson"},
        "imagery": {"source": "http://127.0.0.1:1/{z}/{x}/{y}.png"},
    }))
    prefect_port = free_port()
    mlflow_port = next(p for p in iter(free_port, None) if p != prefect_port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mapgap.cli", "ui", str(config),
         "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines, prefect_port, mlflow_port


def isolated_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.mark.slow
def test_ui_serves_both_and_stops_cleanly(tmp_path: Path) -> None:
    proc, lines, prefect_port, mlflow_port = start_ui(tmp_path, isolated_env(tmp_path))
    servers: list[psutil.Process] = []
    try:
        urls = wait_for_urls(lines, proc, timeout_s=300)
        assert urls == {"Prefect": f"http://127.0.0.1:{prefect_port}",
                        "MLflow": f"http://127.0.0.1:{mlflow_port}"}
        servers = psutil.Process(proc.pid).children(recursive=True)
        for url in urls.values():
            with urllib.request.urlopen(url, timeout=30) as reply:
                assert reply.status == 200, url
    finally:
        code, leaked = stop(proc, servers or psutil.Process(proc.pid).children(recursive=True))
    assert code == 0
    assert len(servers) >= 2
    assert not leaked, f"still running after mapgap ui stopped: {leaked}"


CHROMIUM = Path("/usr/bin/chromium")
FLOW_NAME = "mapgap-ui-check"


@pytest.mark.slow
def test_prefect_ui_on_another_port_shows_earlier_runs(tmp_path: Path) -> None:
    """The browser asks /ui-settings where the API is: it must be this server."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("needs Chromium: apt-get install -y chromium")
    env = isolated_env(tmp_path)
    subprocess.run([sys.executable, "-c", "from prefect import flow; "
                    f"flow(name={FLOW_NAME!r}, log_prints=True)(lambda: print('ran'))()"],
                   env=env, check=True, capture_output=True, timeout=300)
    proc, lines, prefect_port, _ = start_ui(tmp_path, env)
    servers: list[psutil.Process] = []
    try:
        urls = wait_for_urls(lines, proc, timeout_s=300)
        servers = psutil.Process(proc.pid).children(recursive=True)
        with urllib.request.urlopen(urls["Prefect"] + "/ui-settings", timeout=30) as reply:
            assert json.load(reply)["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            try:
                page = browser.new_page()
                page.goto(urls["Prefect"] + "/runs", timeout=120_000)
                page.get_by_text(FLOW_NAME).first.wait_for(timeout=120_000)
                assert "Can't connect to Server API" not in page.content()
            finally:
                browser.close()
    finally:
        stop(proc, servers or psutil.Process(proc.pid).children(recursive=True))


def stop(proc: subprocess.Popen, servers: list[psutil.Process]) -> tuple[int, list[str]]:
    """SIGTERM `mapgap ui` (as `kill` would); its exit code and the servers it left."""
    names = {p.pid: " ".join(p.cmdline()) for p in servers}
    proc.terminate()
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    _, left = psutil.wait_procs(servers, timeout=10)
    for p in left:  # do not leak servers into the rest of the session
        p.kill()
    return code, [names[p.pid] for p in left]
