"""Prefect wiring: results persist in the run dir and a rerun skips finished
tasks (a new flow run, same inputs, same code)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prefect import flow

from mapgap import storage
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
    flow(lambda: publish_run_artifacts(cfg, {"fetch": {"fetched": 3, "failed": 1}}),
         name="artifacts")()
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.key and a.key.startswith("t-")}
    assert set(arts) == {"t-summary", "t-fetch-failures", "t-review"}
    assert "| fetched | failed |" in arts["t-summary"].data
    assert "z18_1_2" in str(arts["t-fetch-failures"].data)
    assert arts["t-review"].data.startswith("[review.html](file://")
