"""Load a trained model for inference: THE contract between training and
prediction.

``load_model(spec, tracking_uri=None) -> SegmentationModel``:

- ``spec``: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (MLflow
  registry at ``tracking_uri``, default ``$MLFLOW_TRACKING_URI``), or the
  path/URI of a checkpoint (the portable ``model.pt`` written by training, or a
  Lightning ``.ckpt`` of mapgap's module).
- Weights are read with ``torch.load(weights_only=True)``: loading a model never
  unpickles classes.
- The model is in eval mode on the CPU. ``model.classes`` lists the classes;
  ``model(x)`` takes float32 [B,3,H,W] RGB in 0..1 (pixel / 255; the model
  applies its encoder's normalisation itself) and returns per-class foreground
  probabilities [B,C,H,W] in 0..1 (activation included); ``model.bands(x)``
  adds the instance-distance band when ``model.instances`` (``model.band_names``).
  H and W must be multiples of ``model.multiple`` (2**depth for scratch, e.g.
  16 for depth 4; 32 for smp encoders): pad the input (mirroring is best) and
  crop the output.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mapgap import storage
from mapgap.models.segmentation import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    SegmentationModel,
    model_from_checkpoint,
)
from mapgap.tracking import active_tracking

# Where the portable checkpoint sits inside a logged MLflow model.
MODEL_FILE = "model.pt"
REGISTRY_PATH = f"extra_files/{MODEL_FILE}"
LIGHTNING_PREFIX = "model."


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved (names the spec)."""


def _portable(ckpt: Any, source: str) -> dict[str, Any]:
    """Accept mapgap's Lightning checkpoints too: same weights under ``model.``.

    The module saves the model's own hparams as ``model_hparams``; checkpoints of
    the older module only have classes/width/depth/norm/loss (a scratch U-Net).
    """
    if isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt:
        hp = ckpt.get("hyper_parameters") or {}
        if isinstance(hp.get("model_hparams"), dict):
            hparams = dict(hp["model_hparams"])
        elif "classes" in hp:
            from mapgap.models.losses import loss_for

            _, activation = loss_for(hp.get("loss", "bce_dice"))
            hparams = {"classes": list(hp["classes"]), "width": hp.get("width", 16),
                       "depth": hp.get("depth", 4), "norm": hp.get("norm", "batch"),
                       "activation": activation}
        else:
            raise CheckpointError(f"{source}: a Lightning checkpoint, but not of mapgap's model")
        state = {k[len(LIGHTNING_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                 if k.startswith(LIGHTNING_PREFIX)}
        return {"format": CHECKPOINT_FORMAT, "hparams": hparams, "state_dict": state}
    return ckpt


def read_checkpoint(uri: str) -> SegmentationModel:
    """A model from a checkpoint file (local path or any storage URI)."""
    try:
        ckpt = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                          weights_only=True)
    except storage.StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{uri}: cannot read checkpoint ({first[:200]})") from None
    return model_from_checkpoint(_portable(ckpt, uri), uri)


def _registry_file(spec: str, tracking_uri: str | None) -> bytes:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ModelSpecError(f"{spec}: a registry model needs a tracking URI "
                             "(pass tracking_uri or set MLFLOW_TRACKING_URI)")
    # The registry too must be ``uri``: ``download_artifacts`` alone resolves the
    # model name in whatever registry the process last used.
    with tempfile.TemporaryDirectory(prefix="mapgap-model-") as tmp, active_tracking(uri):
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{spec.rstrip('/')}/{REGISTRY_PATH}", dst_path=tmp,
                tracking_uri=uri)
        except MlflowException as err:
            first = str(err).strip().splitlines()[0][:200]
            raise ModelSpecError(f"{spec}: not found in the registry at {uri} ({first})") from None
        return Path(path).read_bytes()


def load_model(spec: str, tracking_uri: str | None = None) -> SegmentationModel:
    """The model named by ``spec`` (see the module docstring), in eval mode on CPU."""
    if spec.startswith("models:/"):
        data = _registry_file(spec, tracking_uri)
        try:
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{spec}: cannot read checkpoint ({err})") from None
        return model_from_checkpoint(ckpt, spec)
    if not storage.exists(spec):
        raise ModelSpecError(f"{spec}: no such checkpoint (expected models:/<name>@<alias> "
                             "or a checkpoint path/URI)")
    return read_checkpoint(spec)
