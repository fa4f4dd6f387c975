"""Train flow: the packed shards -> a trained, registered model.

Training is one cached task keyed by the config and the manifest digest: a
finished training is reused, a failed one resumes from its last checkpoint.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mapgap import storage
from mapgap.conf.schema import PipelineConfig
from mapgap.layout import RunLayout
from mapgap.tasks.pack import manifest_digest, shard_uris
from mapgap.tasks.train import TrainingError, result_uri, train_task


@flow(name="train")
def train_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Returns run id, model URI (+ aliases), best val metrics and checkpoint URI."""
    layout = RunLayout(cfg.run_uri)
    if not storage.exists(layout.manifest):
        raise TrainingError(f"{layout.manifest}: no shard manifest (run `mapgap pack` first)")
    digest = manifest_digest(storage.read_json(layout.manifest))
    train, val = shard_uris(layout.manifest, "train"), shard_uris(layout.manifest, "val")
    task = train_task
    if not storage.exists(result_uri(cfg, train, val, digest)):
        # Never trained, failed (resume), or its files were deleted: a cached
        # result must not point at missing checkpoints.
        task = train_task.with_options(refresh_cache=True)
    return task(cfg, train, val, digest)
