"""Where MLflow keeps a run's experiments, and the model registry policy.

Tracking store: ``train.tracking_uri`` when set (e.g. an ``http://`` server);
otherwise a SQLite file in the run dir (``sqlite:///<run dir>/mlflow.db``). MLflow
cannot keep SQLite on S3, so for an ``s3://`` run dir the database lives in a
local cache (``~/.cache/mapgap/<name>-<hash>/mlflow.db``) while artifacts still
go to ``<run dir>/mlartifacts`` on S3.

Registry: a model is registered under its trained classes joined by "-"
(e.g. ``building``). Every new version gets the alias ``candidate``; it also
becomes ``champion`` only when its val IoU (kept as the version tag
``val_iou``) beats the current champion's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mapgap import storage

# Before mlflow is imported anywhere through this module: we run offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CANDIDATE = "candidate"
CHAMPION = "champion"
METRIC_TAG = "val_iou"


def cache_dir(cfg: Any) -> Path:
    """Local state of a run whose run dir is remote (one per name + root)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha1(cfg.run_uri.encode()).hexdigest()[:8]
    return base / "mapgap" / f"{cfg.name}-{digest}"


def tracking_uri(cfg: Any) -> str:
    """The MLflow tracking (and registry) URI of a run; creates the SQLite folder."""
    if cfg.train.tracking_uri:
        return cfg.train.tracking_uri
    folder = cache_dir(cfg) if storage.is_remote(cfg.run_uri) else Path(cfg.run_uri).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(cfg: Any) -> str | None:
    """Artifacts next to the run's other outputs; a tracking server decides itself."""
    if cfg.train.tracking_uri and not cfg.train.tracking_uri.startswith("sqlite:"):
        return None
    if storage.is_remote(cfg.run_uri):
        return storage.join(cfg.run_uri, "mlartifacts")
    return str(Path(cfg.run_uri).resolve() / "mlartifacts")


def experiment_name(cfg: Any) -> str:
    return cfg.train.experiment or cfg.name


def model_name(classes: Sequence[str]) -> str:
    return "-".join(classes)


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(cfg: Any) -> str:
    """The experiment id, creating the experiment (with our artifact location)."""
    c = client(tracking_uri(cfg))
    name = experiment_name(cfg)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location(cfg))


_FLUENT = threading.RLock()


@contextlib.contextmanager
def active_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (needed by ``mlflow.pytorch.log_model``) at ``uri``
    for a block, then restore what was set before. Its URIs are process globals:
    one block at a time, or two tasks in threads would restore each other's."""
    import mlflow

    with _FLUENT:
        before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before[0])
            mlflow.set_registry_uri(before[1])


def flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, lists as JSON."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flat_params(item, f"{name}.{i}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def promote(c: Any, name: str, version: str | int, val_iou: float,
            replaces: str | None = None) -> list[str]:
    """Tag a new version with its val IoU, make it the candidate, and the champion
    when it beats the current one, or when the champion is ``replaces``: the model
    this one was derived from and chosen over (e.g. by hard-negative mining).
    Returns the aliases it now holds."""
    from mlflow.exceptions import MlflowException

    version = str(version)
    c.set_model_version_tag(name, version, METRIC_TAG, f"{val_iou:.6f}")
    c.set_registered_model_alias(name, CANDIDATE, version)
    aliases = [CANDIDATE]
    try:
        champion = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    best = champion.tags.get(METRIC_TAG) if champion is not None else None
    if best is None or val_iou > float(best) or str(champion.version) == str(replaces):
        c.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    return aliases


CRASHED_TAG = "mapgap.crashed"


def mark_crashed_runs(cfg: Any, since_s: float, reason: str) -> list[str]:
    """End the experiment's MLflow runs still RUNNING that started at or after
    ``since_s`` (epoch seconds: a killed or stopped run's start) as KILLED, tagged
    ``mapgap.crashed: true`` (the ``reason`` as note), so searches can skip them
    (``attributes.status != 'KILLED'``). Called by the run dir's lock holder only,
    so no live run of this run dir is among them. Returns their run ids."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # nothing was ever tracked: spare a stopping run the MLflow import
    c = client(uri)
    exp = c.get_experiment_by_name(experiment_name(cfg))
    if exp is None:
        return []
    found = c.search_runs([exp.experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and attributes.start_time >= {int(since_s * 1000)}"))
    for run in found:
        c.set_tag(run.info.run_id, CRASHED_TAG, "true")
        c.set_tag(run.info.run_id, "mlflow.note.content", reason)
        c.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in found]
