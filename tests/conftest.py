"""Shared fixtures: an isolated Prefect home, the real sample data, a moto S3
server on 127.0.0.1."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports prefect: a throwaway Prefect home for the whole session.
_PREFECT_HOME = tempfile.mkdtemp(prefix="mapgap-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
# Local state of S3 runs (their MLflow database) must not outlive the session either.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mapgap-cache-")
# INFO lines logged at interpreter exit would hit pytest's closed capture streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from mapgap.orchestration import setup_environment  # noqa: E402

setup_environment()

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MAPGAP_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(relative: str) -> Path:
    """A file or folder from ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real sample data not available: {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session", autouse=True)
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with credentials in the environment.

    Yields the endpoint URL. Storage code finds it through AWS_ENDPOINT_URL,
    exactly as it would find a real S3-compatible endpoint. Started before any
    test: DataLoader workers fork from a server process that keeps the
    environment it started with, which must already name this endpoint.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture()
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test; returns ``s3://<bucket>``."""
    import boto3

    name = "mapgap-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    import fsspec

    fsspec.filesystem("s3").invalidate_cache()
    return f"s3://{name}"
