"""Prefect wiring shared by every flow: environment, caching, result storage,
task runners.

Why a rerun skips finished work: every stage task persists its result under the
run's storage and is keyed by ``INPUTS + TASK_SOURCE + CodeVersion``. Tasks take
and return URIs (never arrays), so keys are cheap and stable across processes.
``CodeVersion`` hashes mapgap's own source: TASK_SOURCE alone only sees the thin
``@task`` wrapper, not the helpers doing the work.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE_DIRS = ("mapgap", "flows", "tasks", "models")


def setup_environment(project_dir: Path | None = None) -> None:
    """Defaults that must be set before prefect/mlflow are imported.

    A project-local PREFECT_HOME (unless the user set one) keeps the ephemeral
    API database next to the project; telemetry is off because we run offline.
    """
    home = (project_dir or Path.cwd()) / ".prefect"
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_UI_ENABLED", "true")
    # The ephemeral API server needs ~9 s; more on a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Quiet, informative logs: our own lines matter more than Prefect's.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@cache
def code_version() -> str:
    """Hash of mapgap's Python sources: any code change invalidates cached tasks."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in PACKAGE_DIRS:
        pkg = root / d
        if not pkg.is_dir():  # installed (non-editable): everything is under mapgap/
            pkg = Path(__file__).resolve().parent / d
        for path in sorted(pkg.rglob("*.py")):
            h.update(str(path.relative_to(pkg.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cache_policy() -> Any:
    from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

    @dataclass
    class CodeVersion(CachePolicy):
        """Key part that changes whenever mapgap's code changes."""

        def compute_key(self, task_ctx: Any, inputs: Any, flow_parameters: Any, **kw: Any) -> str:
            return code_version()

    return INPUTS + TASK_SOURCE + CodeVersion()


def stage_task(fn: Any = None, **options: Any) -> Any:
    """``@task`` with mapgap's defaults: persisted results, cache across runs."""
    from prefect import task

    defaults: dict[str, Any] = {
        "cache_policy": _cache_policy(),
        "persist_result": True,
        "retries": 0,
    }
    defaults.update(options)
    if fn is None:
        return lambda f: task(f, **defaults)
    return task(fn, **defaults)


def result_storage_for(run_uri: str) -> Any:
    """Prefect result storage inside the run dir, so any worker can read results.

    Local dirs map to a Path; remote URIs need a saved RemoteFileSystem block.
    """
    from mapgap import storage

    target = storage.join(run_uri, "prefect-results")
    if not storage.is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        return Path(target)
    from prefect.filesystems import RemoteFileSystem

    slug = "mapgap-" + hashlib.sha1(target.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=target).save(slug, overwrite=True)
    return f"remote-file-system/{slug}"


def task_runner_for(runner: Any) -> Any:
    """Prefect task runner from ``runner`` config: scale out on Dask or Ray."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "process":
        return ProcessPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": 1,
                            "processes": True, "dashboard_address": None}
        )
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RuntimeError("runner.kind: ray needs the extra: pip install 'mapgap[ray]'") from None
    if runner.address:
        return RayTaskRunner(address=runner.address)
    # A local cluster for the flow run, as big as runner.workers (not every core).
    return RayTaskRunner(init_kwargs={"num_cpus": runner.workers})


def configured(flow_obj: Any, cfg: Any) -> Any:
    """A flow bound to a run: results in the run dir, the configured task runner."""
    return flow_obj.with_options(
        result_storage=result_storage_for(cfg.run_uri),
        persist_result=True,
        task_runner=task_runner_for(cfg.runner),
    )
