"""Prefect wiring: results persist in the run dir and a rerun skips finished
tasks (a new flow run, same inputs, same code)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect import flow

from mapgap import orchestration, storage, tracking
from mapgap.orchestration import code_version, configured, stage_task

CALLS: list[str] = []


@stage_task
def write_marker(uri: str, text: str) -> str:
    CALLS.append(text)
    return storage.write_text(uri, text)


@flow
def two_steps(run_uri: str, fail_second: bool = False) -> list[str]:
    a = write_marker(storage.join(run_uri, "a.txt"), "first")
    if fail_second:
        raise RuntimeError("injected failure")
    b = write_marker(storage.join(run_uri, "b.txt"), "second")
    return [a, b]


def fake_cfg(root: Path) -> SimpleNamespace:
    return SimpleNamespace(run_uri=str(root / "runs" / "t"),
                           runner=SimpleNamespace(kind="thread", workers=2, address=None))


def test_rerun_after_failure_skips_finished_tasks(tmp_path: Path) -> None:
    cfg = fake_cfg(tmp_path)
    bound = configured(two_steps, cfg)
    CALLS.clear()
    state = bound(cfg.run_uri, fail_second=True, return_state=True)
    assert state.is_failed() and CALLS == ["first"]
    assert bound(cfg.run_uri) == [storage.join(cfg.run_uri, n) for n in ("a.txt", "b.txt")]
    assert CALLS == ["first", "second"]  # "first" came from the cache
    assert any((Path(cfg.run_uri) / "prefect-results").iterdir())


def test_code_version_is_stable_hex() -> None:
    assert code_version() == code_version()
    assert len(code_version()) == 16 and int(code_version(), 16) >= 0


def test_code_change_invalidates_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A twin of mapgap/orchestration.py in a scratch tree: its code_version() hashes
    # that tree, which the test may edit, exactly as the real one hashes ours.
    pkg = tmp_path / "src" / "mapgap"
    pkg.mkdir(parents=True)
    shutil.copy(orchestration.__file__, pkg / "orchestration.py")
    spec = importlib.util.spec_from_file_location("twin_orchestration", pkg / "orchestration.py")
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    monkeypatch.setattr(orchestration, "code_version", twin.code_version)
    cfg = fake_cfg(tmp_path)
    bound = configured(two_steps, cfg)
    CALLS.clear()
    bound(cfg.run_uri)
    bound(cfg.run_uri)
    assert CALLS == ["first", "second"]  # same code: the second run is all cache hits
    before = twin.code_version()
    (pkg / "helpers.py").write_text("SCALE = 2\n")  # a helper changed, no @task did
    twin.code_version.cache_clear()  # as a new process would see it
    assert twin.code_version() != before
    bound(cfg.run_uri)
    assert CALLS == ["first", "second", "first", "second"]


@pytest.mark.parametrize("user_home", [True, False])
def test_setup_environment_keeps_a_user_prefect_home(tmp_path: Path, user_home: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    if user_home:
        env["PREFECT_HOME"] = str(tmp_path / "mine")
    script = ("from mapgap.orchestration import setup_environment; setup_environment(); "
              "from prefect.settings import get_current_settings; "
              "print(get_current_settings().home)")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)
    expected = tmp_path / ("mine" if user_home else ".prefect")
    assert Path(proc.stdout.strip()) == expected


def test_run_artifacts_show_in_prefect(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from mapgap.flows.pipeline import publish_run_artifacts
    from mapgap.layout import RunLayout
    from tests.helpers_inference import make_config

    cfg = make_config(tmp_path)
    layout = RunLayout(cfg.run_uri)
    failure = {"tile": "z18_1_2", "reason": "HTTP 500"}
    storage.write_json(layout.fetch_report, {"failures": [failure], "missing": []})
    storage.write_text(layout.output("review.html"), "<html></html>")
    experiment = tracking.ensure_experiment(cfg)
    summary = {"fetch": {"fetched": 3, "failed": 1}, "train": {"run_id": "abc123"},
               "dedup": {"classes": {"building": {"candidates": 7}}, "outputs": ["x", "y"]}}
    flow(lambda: publish_run_artifacts(cfg, summary), name="artifacts")()
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.key and a.key.startswith("t-")}
    assert set(arts) == {"t-summary", "t-fetch-failures", "t-review"}
    text = arts["t-summary"].data
    assert "| fetched | 3 |" in text and "| failed | 1 |" in text
    # Nested counts flattened, lists counted, the MLflow run linked, outputs listed.
    assert "| classes.building.candidates | 7 |" in text and "| outputs (count) | 2 |" in text
    assert f"(http://127.0.0.1:5000/#/experiments/{experiment}/runs/abc123)" in text
    assert f"- `{layout.output('review.html')}`" in text
    assert "z18_1_2" in str(arts["t-fetch-failures"].data)
    assert arts["t-review"].data.startswith("[review.html](file://")
