"""The model object every stage shares, and its portable checkpoint format.

A checkpoint is ``{"format": ..., "hparams": <JSON-able dict>, "state_dict": ...}``
saved with ``torch.save``: it loads with ``torch.load(weights_only=True)``, so
opening a model never unpickles classes (a checkpoint cannot run code). The
hparams rebuild the exact network, input normalisation included, so predict
feeds the model exactly as training did. Checkpoints written before the smp
architectures existed (hparams classes/width/depth/norm/activation only) load
as "scratch" models with unchanged outputs.
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
# "scratch" is mapgap's own U-Net; the others are segmentation-models-pytorch decoders.
ARCHS = ("scratch", "unet", "unetplusplus", "fpn", "deeplabv3plus")
DEFAULT_ENCODER = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The scratch U-Net's historical centring (x - 0.5) * 4, bit for bit.
SCRATCH_MEAN = (0.5, 0.5, 0.5)
SCRATCH_STD = (0.25, 0.25, 0.25)
SMP_MULTIPLE = 32  # five stride-2 stages in every smp encoder used here
DISTANCE_BAND = "distance"


class CheckpointError(ValueError):
    """A file that is not a mapgap model checkpoint (names the file)."""


def smp_encoder_name(encoder: str) -> str:
    """smp's name for ``encoder``: timm models go through smp's "tu-" universal
    encoder (any timm backbone, timm key names); names only smp knows stay native."""
    import segmentation_models_pytorch as smp
    import timm

    if encoder.startswith("tu-"):
        if not timm.is_model(encoder[3:]):
            raise ValueError(f"encoder {encoder!r}: {encoder[3:]!r} is not a timm model")
        return encoder
    if timm.is_model(encoder):
        return f"tu-{encoder}"
    if encoder in smp.encoders.get_encoder_names():
        return encoder
    raise ValueError(f"encoder {encoder!r}: neither a timm model nor an smp encoder "
                     "(e.g. efficientnet_lite0, resnet18, mobilenetv3_large_100)")


def _smp_net(arch: str, encoder: str, out_channels: int) -> nn.Module:
    import segmentation_models_pytorch as smp

    cls = {"unet": smp.Unet, "unetplusplus": smp.UnetPlusPlus, "fpn": smp.FPN,
           "deeplabv3plus": smp.DeepLabV3Plus}[arch]
    # Never downloads: pretrained weights are loaded by models.encoders.build_model.
    return cls(encoder_name=smp_encoder_name(encoder), encoder_weights=None,
               classes=out_channels, activation=None)


def _triple(name: str, value: Any, default: tuple[float, ...]) -> list[float]:
    vals = list(default if value is None else value)
    if len(vals) != 3 or not all(isinstance(v, int | float) for v in vals):
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
    return [float(v) for v in vals]


class SegmentationModel(nn.Module):
    """Per-class foreground probabilities (and an optional instance-distance band) from RGB.

    x is float32 [B, 3, H, W] RGB in 0..1 (pixel / 255), H and W multiples of
    ``self.multiple``; the model normalises it itself with ``mean``/``std``
    (hparams), so callers never need to know the encoder's pretraining.

    - ``logits(x)`` -> [B, K + I, H, W]: K = C class logits (+1 background first
      for "softmax"), then I = 1 distance logit if ``instances``. What losses see.
    - ``forward(x)`` -> class probabilities [B, C, H, W] (mining/predict contract).
    - ``bands(x)`` -> [B, C + I, H, W]: class probabilities, then sigmoid(distance).

    arch "scratch" is mapgap's U-Net (``width``, ``depth``, ``norm`` shape it;
    ``encoder`` is not used and recorded as None). The smp archs take a timm
    ``encoder`` (via smp's "tu-" encoders) and use batch norm in their decoders,
    so ``norm="group"`` is refused for them; ``width``/``depth`` are not used.
    ``pretrained`` only records which weights initialised the encoder: building
    a model never downloads or loads weights (see models.encoders.build_model).
    """

    def __init__(self, classes: list[str], *, arch: str = "scratch", encoder: str | None = None,
                 width: int = 16, depth: int = 4, norm: Norm = "batch",
                 activation: Activation = "sigmoid", instances: bool = False,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 pretrained: str = "none") -> None:
        super().__init__()
        if not classes:
            raise ValueError("a segmentation model needs at least one class")
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"unknown activation {activation!r} (sigmoid or softmax)")
        scratch = arch == "scratch"
        if not scratch and norm != "batch":
            raise ValueError(f"norm {norm!r} applies to arch scratch only "
                             f"(smp's {arch} decoder uses batch norm)")
        encoder = None if scratch else (encoder or DEFAULT_ENCODER)
        mean = _triple("mean", mean, SCRATCH_MEAN if scratch else IMAGENET_MEAN)
        std = _triple("std", std, SCRATCH_STD if scratch else IMAGENET_STD)
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.classes = list(classes)
        self.arch = arch
        self.activation = activation
        self.instances = bool(instances)
        self.calibration: dict[str, Any] | None = None  # set from a trained checkpoint
        self.hparams: dict[str, Any] = {
            "classes": self.classes, "arch": arch, "encoder": encoder, "width": width,
            "depth": depth, "norm": norm, "activation": activation,
            "instances": self.instances, "mean": mean, "std": std, "pretrained": pretrained,
        }
        # Not in the state dict: they come from hparams (and old checkpoints lack them).
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.class_channels = len(classes) + (1 if activation == "softmax" else 0)
        out = self.class_channels + (1 if self.instances else 0)
        if scratch:
            self.multiple = 2**depth
            self.net: nn.Module = UNet(out, width=width, depth=depth, norm=norm)
        else:
            self.multiple = SMP_MULTIPLE
            self.net = _smp_net(arch, encoder, out)

    @property
    def band_names(self) -> list[str]:
        """Names of the ``bands(x)`` channels, in order."""
        return self.classes + ([DISTANCE_BAND] if self.instances else [])

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The pretrained encoder's parameters (for a lower learning rate or freezing)."""
        return [] if self.arch == "scratch" else list(self.net.encoder.parameters())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"input {h}x{w} px: H and W must be multiples of {self.multiple}")
        return self.net((x - self.input_mean) / self.input_std)

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class logits [B,K,H,W], distance logit [B,1,H,W] or None) of ``logits(x)``."""
        k = self.class_channels
        return logits[:, :k], (logits[:, k:k + 1] if self.instances else None)

    def class_probabilities(self, class_logits: torch.Tensor) -> torch.Tensor:
        """[B,K,H,W] class logits -> [B,C,H,W] foreground probabilities."""
        if self.activation == "softmax":
            return class_logits.softmax(dim=1)[:, 1:]
        return class_logits.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_probabilities(self.split_logits(self.logits(x))[0])

    def bands(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities, then the sigmoid of the distance logit (``band_names``)."""
        class_logits, distance = self.split_logits(self.logits(x))
        probs = self.class_probabilities(class_logits)
        return probs if distance is None else torch.cat([probs, distance.sigmoid()], dim=1)


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
    # Threshold, minimum area and confidence table chosen on val by training
    # (JSON-able dict or None): predict uses them unless the config overrides them.
    model.calibration = ckpt.get("calibration")
    return model.eval()
