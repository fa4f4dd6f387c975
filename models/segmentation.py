"""The model object every stage shares, and its portable checkpoint format.

A checkpoint is ``{"format": ..., "hparams": <JSON-able dict>, "state_dict": ...}``
saved with ``torch.save``: it loads with ``torch.load(weights_only=True)``, so
opening a model never unpickles classes (a checkpoint cannot run code).
"""

from __future__ import annotations

import io
from typing import Any, Literal

import torch
from torch import nn

from mapgap import storage
from mapgap.models.unet import Norm, UNet

CHECKPOINT_FORMAT = "mapgap-segmentation/1"
Activation = Literal["sigmoid", "softmax"]


class CheckpointError(ValueError):
    """A file that is not a mapgap model checkpoint (names the file)."""


class SegmentationModel(nn.Module):
    """Per-class foreground probabilities from RGB.

    ``forward(x)``: x float32 [B, 3, H, W] in 0..1 (RGB / 255, nothing else),
    H and W multiples of ``self.multiple`` (= 2**depth); returns [B, C, H, W]
    in 0..1, C = len(classes). "softmax" models predict an extra background
    channel, dropped in ``forward``; "sigmoid" models predict one channel per
    class. ``logits(x)`` is what the losses see.
    """

    def __init__(self, classes: list[str], width: int = 16, depth: int = 4,
                 norm: Norm = "batch", activation: Activation = "sigmoid") -> None:
        super().__init__()
        if not classes:
            raise ValueError("a segmentation model needs at least one class")
        self.classes = list(classes)
        self.hparams: dict[str, Any] = {
            "classes": self.classes, "width": width, "depth": depth, "norm": norm,
            "activation": activation,
        }
        self.activation = activation
        self.multiple = 2**depth
        extra = 1 if activation == "softmax" else 0
        self.net = UNet(len(classes) + extra, width=width, depth=depth, norm=norm)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"input {h}x{w} px: H and W must be multiples of {self.multiple}")
        # Centre the 0..1 input; the first norm layer learns the rest.
        return self.net((x - 0.5) * 4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        if self.activation == "softmax":
            return logits.softmax(dim=1)[:, 1:]
        return logits.sigmoid()


def checkpoint_dict(model: SegmentationModel, **extra: Any) -> dict[str, Any]:
    """The portable checkpoint: tensors + JSON-able hparams (plus e.g. metrics)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "hparams": dict(model.hparams), "state_dict": state,
            **extra}


def save_checkpoint(model: SegmentationModel, uri: str, **extra: Any) -> str:
    buf = io.BytesIO()
    torch.save(checkpoint_dict(model, **extra), buf)
    return storage.write_bytes(uri, buf.getvalue())


def model_from_checkpoint(ckpt: dict[str, Any], source: str) -> SegmentationModel:
    """Build the model from a loaded checkpoint dict; ``source`` names it in errors."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: not a mapgap model checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT!r})")
    try:
        model = SegmentationModel(**ckpt["hparams"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: bad hparams ({err})") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{source}: weights do not fit the hparams ({first})") from None
    return model.eval()

