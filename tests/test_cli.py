"""Errors that only show while running (a broken PBF, an Overpass endpoint that
refuses connections, a GeoTIFF without CRS) end `mapgap run` with one `error:`
line naming the file or URL and exit code 2, no traceback; `--debug` shows it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers_inference import make_config


def refused_url() -> str:
    """An HTTP URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/interpreter"


def broken_pbf(tmp_path: Path) -> tuple[dict, str]:
    pbf = tmp_path / "area.osm.pbf"
    pbf.write_bytes(np.random.default_rng(0).bytes(4096))
    return {"labels": {"source": str(pbf)}}, str(pbf)


def refusing_overpass(tmp_path: Path) -> tuple[dict, str]:
    url = refused_url()
    return {"labels": {"source": url, "overpass": {"retries": 0, "backoff_s": 0}}}, url


def geotiff_without_crs(tmp_path: Path) -> tuple[dict, str]:
    import rasterio

    tif = tmp_path / "nocrs.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=3,
                       dtype="uint8") as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    return {"imagery": {"source": str(tif)}}, str(tif)


def run_config(tmp_path: Path, overrides: dict) -> Path:
    cfg = make_config(tmp_path, **overrides)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    return config


def mapgap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapgap.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", [broken_pbf, refusing_overpass, geotiff_without_crs],
                         ids=lambda f: f.__name__)
def test_runtime_errors_are_one_line_naming_the_input(tmp_path: Path, case) -> None:
    overrides, culprit = case(tmp_path)
    proc = mapgap("run", str(run_config(tmp_path, overrides)))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and culprit in last, last


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    overrides, _ = broken_pbf(tmp_path)
    proc = mapgap("run", "--debug", str(run_config(tmp_path, overrides)))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
