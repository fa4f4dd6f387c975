"""The model with pretrained encoders: real torch, real timm/smp, the real bundled
weights file, real files on disk and on a moto S3 server."""

from __future__ import annotations

import importlib.util
import io
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from mapgap import storage
from mapgap.models.encoders import (
    PretrainedWeightsError,
    build_model,
    bundled_timm_state,
    bundled_weights_file,
    load_encoder_state,
    read_state_dict,
)
from mapgap.models.inference import load_model, read_checkpoint
from mapgap.models.segmentation import (
    CHECKPOINT_FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationModel,
    model_from_checkpoint,
    save_checkpoint,
)
from mapgap.models.unet import UNet
from tests.conftest import shared_path

SMP_ARCHS = ("unet", "unetplusplus", "fpn", "deeplabv3plus")
ENCODER = "efficientnet_lite0"
# ImageNet classes a street with cars, a stop sign and poles can fairly be called.
STREET_CLASSES = {
    407: "ambulance", 436: "station wagon", 468: "taxi", 475: "car mirror",
    479: "car wheel", 511: "convertible", 555: "fire engine", 569: "garbage truck",
    581: "grille", 609: "jeep", 627: "limousine", 654: "minibus", 656: "minivan",
    661: "Model T", 705: "passenger car", 717: "pickup", 734: "police van",
    751: "racer", 757: "recreational vehicle", 779: "school bus", 817: "sports car",
    864: "tow truck", 867: "trailer truck", 874: "trolleybus", 919: "street sign",
    920: "traffic light",
}


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_bundled_weights_fill_every_encoder_tensor() -> None:
    model = build_model(["building"], arch="unet", encoder=ENCODER, encoder_weights="bundled")
    source = list(_tensors(torch.load(bundled_weights_file(), weights_only=True)).values())
    timm_keys = list(_tensors(timm.create_model(ENCODER).state_dict()))
    # Independent oracle: the two files list their tensors in the same order.
    assert len(source) == len(timm_keys) == 247
    by_order = dict(zip(timm_keys, source, strict=True))
    encoder = _tensors(model.net.encoder.state_dict())
    assert len(encoder) > 200
    for key, tensor in encoder.items():
        expected = by_order[key.removeprefix("model.")]
        assert tensor.shape == expected.shape, key
        assert torch.equal(tensor, expected), f"{key} is not the bundled tensor"
    assert model.hparams["pretrained"] == "bundled"
    assert model.hparams["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert model.hparams["std"] == pytest.approx(list(IMAGENET_STD))


def test_bundled_weights_only_for_their_encoder() -> None:
    with pytest.raises(PretrainedWeightsError) as err:
        build_model(["building"], arch="unet", encoder="resnet18", encoder_weights="bundled")
    assert "efficientnet_lite0" in _one_line(err) and "resnet18" in str(err.value)
    with pytest.raises(PretrainedWeightsError) as err:
        build_model(["building"], arch="scratch", encoder_weights="bundled")
    assert "scratch" in _one_line(err)


def test_bundled_weights_classify_a_street_photo() -> None:
    photo = shared_path("street-level/DSC00001.JPG")
    net = timm.create_model(ENCODER)
    net.load_state_dict(bundled_timm_state())  # strict: the classifier too
    img = Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)[None]
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        top5 = net.eval()(x).softmax(dim=1)[0].topk(5).indices.tolist()
    street = [STREET_CLASSES[i] for i in top5 if i in STREET_CLASSES]
    assert len(street) >= 2, f"top-5 ImageNet classes {top5}: not a street scene"


def _random_encoder_state(prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {prefix + k: v for k, v in timm.create_model(ENCODER).state_dict().items()}


def _assert_encoder_holds(model: SegmentationModel, state: dict[str, torch.Tensor]) -> None:
    plain = {k.removeprefix("encoder.").removeprefix("model."): v for k, v in state.items()}
    for key, tensor in _tensors(model.net.encoder.state_dict()).items():
        assert torch.equal(tensor, plain[key.removeprefix("model.")]), key


def test_state_dict_from_a_local_pth(tmp_path) -> None:
    state = _random_encoder_state("model.")
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = build_model(["road"], arch="fpn", encoder=ENCODER, encoder_weights=str(path))
    _assert_encoder_holds(model, state)
    assert model.hparams["pretrained"] == str(path)


def test_safetensors_on_s3(s3_bucket: str) -> None:
    source = build_model(["road"], arch="unet", encoder=ENCODER)
    state = {k: v.contiguous() for k, v in source.net.state_dict().items()}  # encoder.+decoder.
    uri = f"{s3_bucket}/weights/encoder.safetensors"
    storage.write_bytes(uri, save_safetensors(state))
    model = build_model(["road"], arch="deeplabv3plus", encoder=ENCODER, encoder_weights=uri)
    _assert_encoder_holds(model, {k: v for k, v in state.items() if k.startswith("encoder.")})


def test_state_dicts_that_do_not_fit_fail_in_one_line(tmp_path) -> None:
    model = build_model(["road"], arch="unet", encoder=ENCODER)
    state = _random_encoder_state()
    missing = dict(state)
    del missing["blocks.2.1.conv_dw.weight"]
    with pytest.raises(PretrainedWeightsError) as err:
        load_encoder_state(model.net.encoder, missing, "a.pth")
    assert "a.pth" in _one_line(err) and "1 missing" in str(err.value)
    assert "blocks.2.1.conv_dw.weight" in str(err.value)
    extra = {**state, "decoder_of_something.weight": torch.zeros(3)}
    with pytest.raises(PretrainedWeightsError) as err:
        load_encoder_state(model.net.encoder, extra, "b.pth")
    assert "1 unexpected (decoder_of_something.weight)" in _one_line(err)
    shaped = {**state, "conv_stem.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(PretrainedWeightsError) as err:
        load_encoder_state(model.net.encoder, shaped, "c.pth")
    assert "conv_stem.weight (8, 3, 3, 3) vs (32, 3, 3, 3)" in _one_line(err)
    resnet = tmp_path / "resnet.safetensors"
    resnet.write_bytes(save_safetensors(timm.create_model("resnet18").state_dict()))
    with pytest.raises(PretrainedWeightsError) as err:
        build_model(["road"], arch="unet", encoder=ENCODER, encoder_weights=str(resnet))
    assert "missing" in _one_line(err) and "unexpected" in str(err.value)


def test_unreadable_weights_fail_in_one_line(tmp_path) -> None:
    with pytest.raises(PretrainedWeightsError) as err:
        read_state_dict(str(tmp_path / "absent.pth"))
    assert "absent.pth" in _one_line(err)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError) as err:
        read_state_dict(str(junk))
    assert "junk.pt" in _one_line(err)


def test_imagenet_offline_fails_fast_in_one_line(monkeypatch) -> None:
    from mapgap.models.encoders import _reachable

    if _reachable("huggingface.co"):
        pytest.skip("this machine reaches huggingface.co: the offline error cannot be shown")
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as err:
        build_model(["building"], arch="unet", encoder="resnet18", encoder_weights="imagenet")
    assert time.monotonic() - start < 10
    msg = _one_line(err)
    assert "resnet18" in msg and "'bundled'" in msg and "s3://" in msg


def test_torchgeo_weights_without_torchgeo() -> None:
    if importlib.util.find_spec("torchgeo") is not None:
        pytest.skip("torchgeo is installed here: the missing-package error cannot be shown")
    with pytest.raises(PretrainedWeightsError) as err:
        build_model(["tree"], arch="unet", encoder="resnet50",
                    encoder_weights="torchgeo:Unet_Weights.OAM_RGB_RESNET50_TCD")
    assert "pip install torchgeo" in _one_line(err) and "internet" in str(err.value)


@pytest.mark.parametrize("arch", ("scratch", *SMP_ARCHS))
def test_outputs_of_every_arch(arch: str) -> None:
    classes = ["building", "road"]
    x = torch.rand(2, 3, 64, 64)
    for instances, activation in ((False, "sigmoid"), (True, "softmax")):
        model = build_model(classes, arch=arch, encoder=ENCODER, activation=activation,
                            instances=instances, width=8, depth=3).eval()
        k = len(classes) + (activation == "softmax")
        i = int(instances)
        with torch.no_grad():
            logits, probs, bands = model.logits(x), model(x), model.bands(x)
        assert logits.shape == (2, k + i, 64, 64)
        assert probs.shape == (2, 2, 64, 64)
        assert bands.shape == (2, 2 + i, 64, 64)
        assert model.band_names == classes + ["distance"] * i
        assert torch.equal(bands[:, :2], probs)
        assert float(probs.min()) >= 0 and float(probs.max()) <= 1
        if activation == "softmax":
            assert torch.allclose(probs.sum(1) + logits[:, :k].softmax(1)[:, 0], torch.ones(1))
        else:
            assert torch.equal(probs, logits.sigmoid())
        if instances:
            assert torch.equal(bands[:, -1], logits[:, -1].sigmoid())
    if arch == "scratch":
        assert model.multiple == 8 and model.encoder_parameters() == []
        assert model.hparams["encoder"] is None
    else:
        assert model.multiple == 32
        ids = {id(p) for p in model.encoder_parameters()}
        assert ids == {id(p) for p in model.net.encoder.parameters()}
        assert 0 < len(ids) < len(list(model.parameters()))
    with pytest.raises(ValueError, match="multiples of"):
        model(torch.rand(1, 3, 36, 40))


def test_bad_model_arguments() -> None:
    with pytest.raises(ValueError, match="arch"):
        SegmentationModel(["a"], arch="segformer++")
    with pytest.raises(ValueError, match="norm 'group' applies to arch scratch"):
        SegmentationModel(["a"], arch="unet", encoder=ENCODER, norm="group")
    with pytest.raises(ValueError, match="not_a_net"):
        SegmentationModel(["a"], arch="fpn", encoder="not_a_net")
    with pytest.raises(ValueError, match="mean"):
        SegmentationModel(["a"], mean=[0.5, 0.5])


def test_checkpoint_round_trip_keeps_normalisation_and_outputs(tmp_path) -> None:
    model = build_model(["building", "road"], arch="unet", encoder=ENCODER,
                        encoder_weights="bundled", activation="softmax", instances=True,
                        mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25]).eval()
    path = str(tmp_path / "model.pt")
    save_checkpoint(model, path, metrics={"val/iou": 0.5})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.bands(x)
    for loaded in (read_checkpoint(path), load_model(path)):
        assert loaded.hparams == model.hparams
        assert loaded.hparams["mean"] == pytest.approx([0.4, 0.5, 0.6])
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded.bands(x), expected)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT


def test_lightning_checkpoint_with_model_hparams(tmp_path) -> None:
    model = build_model(["building"], arch="fpn", encoder=ENCODER, instances=True).eval()
    ckpt = {"pytorch-lightning_version": "2.5.0",
            "hyper_parameters": {"model_hparams": model.hparams, "lr": 1e-3, "loss": "focal"},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path = tmp_path / "best.ckpt"
    path.write_bytes(buf.getvalue())
    loaded = read_checkpoint(str(path))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.bands(x), model.bands(x))
    assert loaded.hparams == model.hparams


def test_old_checkpoints_load_as_scratch_with_unchanged_outputs(tmp_path) -> None:
    torch.manual_seed(1)
    net = UNet(2, width=8, depth=3, norm="group").eval()
    old = {"format": CHECKPOINT_FORMAT,
           "hparams": {"classes": ["building"], "width": 8, "depth": 3, "norm": "group",
                       "activation": "softmax"},
           "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}
    model = model_from_checkpoint(old, "old.pt")
    assert model.arch == "scratch" and not model.instances and model.band_names == ["building"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # Bit for bit what the pre-smp model computed: centring (x - 0.5) * 4.
        assert torch.equal(model(x), net((x - 0.5) * 4.0).softmax(dim=1)[:, 1:])
    ckpt = {"pytorch-lightning_version": "2.4.0",
            "hyper_parameters": {"classes": ["building"], "width": 8, "depth": 3,
                                 "norm": "group", "loss": "ce_lovasz"},
            "state_dict": {f"model.{k}": v for k, v in old["state_dict"].items()}}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    (tmp_path / "old.ckpt").write_bytes(buf.getvalue())
    with torch.no_grad():
        assert torch.equal(read_checkpoint(str(tmp_path / "old.ckpt"))(x), model(x))
