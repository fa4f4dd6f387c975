"""Training: a tiny run logged to a real MLflow SQLite store and registered;
resume after a failure; champion promotion; the model contract; data loading
failure cases (empty shard set, missing shard, corrupt samples)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from mapgap import storage, tracking
from mapgap.layout import RunLayout
from mapgap.models import losses
from mapgap.models.inference import ModelSpecError, load_model
from mapgap.models.segmentation import CheckpointError, SegmentationModel, save_checkpoint
from mapgap.tasks.pack import manifest_digest, shard_uris
from tests.test_pack import make_config, make_run, run_pack

TINY = {"classes": ["building"], "architecture": "scratch", "epochs": 2, "steps_per_epoch": 10,
        "batch_size": 4, "width": 8, "depth": 3, "crop_size": 64, "lr": 0.01, "preview_samples": 2}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A packed 4 x 4 tile run (building + road masks) shared by the tests."""
    tmp = tmp_path_factory.mktemp("packed")
    cfg = make_config(str(tmp / "out"), tmp, n=4, train=TINY)
    make_run(cfg)
    run_pack(cfg)
    return cfg


def shards(cfg: Any, split: str) -> list[str]:
    return shard_uris(RunLayout(cfg.run_uri).manifest, split)


def with_root(cfg: Any, root: Path, **train: Any) -> Any:
    """The same packed data, another run dir for MLflow/checkpoints."""
    data = cfg.model_dump(mode="json")
    data["storage"]["root"] = str(root)
    data["train"].update(train)
    return type(cfg).model_validate(data)


def train(cfg: Any, src: Any, **kw: Any) -> dict[str, Any]:
    from mapgap.tasks.train import train_model

    return train_model(cfg, shards(src, "train"), shards(src, "val"),
                       data_digest=manifest_digest(storage.read_json(
                           RunLayout(src.run_uri).manifest)), **kw)


@pytest.mark.slow
def test_training_is_tracked_and_registered(packed: Any, tmp_path: Path) -> None:
    from mapgap.flows.train import train_flow
    from mapgap.orchestration import configured

    cfg = packed
    result = configured(train_flow, cfg)(cfg)
    uri = tracking.tracking_uri(cfg)
    assert uri == f"sqlite:///{Path(cfg.run_uri).resolve()}/mlflow.db"
    c = tracking.client(uri)
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.width"] == "8" and params["classes.0.name"] == "building"
    assert params["pack.negative_ratio"] == "0.5" and params["zoom"] == "18"
    for key in ("val/iou", "val/iou_building", "val/f1_building", "val/precision_building",
                "val/recall_building", "val/loss", "train/loss"):
        assert len(c.get_metric_history(run.info.run_id, key)) == 2, key  # once per epoch
    assert "val/iou_road" not in run.data.metrics  # road is not trained
    losses_per_epoch = [m.value for m in c.get_metric_history(run.info.run_id, "train/loss")]
    assert losses_per_epoch[1] < losses_per_epoch[0]
    assert result["val_metrics"]["val/iou"] == max(
        m.value for m in c.get_metric_history(run.info.run_id, "val/iou"))

    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert "checkpoint" in artifacts and "images" in artifacts
    images = [a.path for a in c.list_artifacts(run.info.run_id, "images")]
    assert sum(p.endswith(".png") and "preview" in p for p in images) >= 2  # one per epoch

    mv = c.get_model_version_by_alias("building", "champion")
    assert str(mv.version) == result["version"] and result["aliases"] == ["candidate", "champion"]
    assert float(mv.tags["val_iou"]) == pytest.approx(result["val_metrics"]["val/iou"], abs=1e-5)

    # The inference contract, from the registry and from the checkpoint file.
    for spec in ("models:/building@champion", result["checkpoint_uri"]):
        model = load_model(spec, uri)
        assert model.classes == ["building"] and not model.training
        x = torch.rand(2, 3, 32, 48)
        probs = model(x)
        assert probs.shape == (2, 1, 32, 48) and probs.min() >= 0 and probs.max() <= 1
    # Rerunning the flow reuses the finished training (no new run, no new version).
    again = configured(train_flow, cfg)(cfg)
    assert again["run_id"] == result["run_id"]
    assert len(c.search_model_versions("name='building'")) == 1


class FailAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_resume_after_failure(packed: Any, tmp_path: Path) -> None:
    cfg = with_root(packed, tmp_path / "resume", steps_per_epoch=4, preview_samples=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, packed, callbacks=[FailAtEpoch(1)])
    c = tracking.client(tracking.tracking_uri(cfg))
    [run] = c.search_runs([tracking.ensure_experiment(cfg)])
    assert run.info.status == "FAILED"
    assert len(c.get_metric_history(run.info.run_id, "val/iou")) == 1

    result = train(cfg, packed)
    assert result["resumed"] and result["run_id"] == run.info.run_id
    history = c.get_metric_history(run.info.run_id, "val/iou")
    assert len(history) == 2 and history[0].step < history[1].step  # epoch 1 not redone
    assert len(c.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert c.get_run(run.info.run_id).info.status == "FINISHED"
    assert train(cfg, packed) == result  # finished: returned, not retrained


class FailAtBatch(Callback):
    """A crash in the middle of an epoch, after some of its steps were taken."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
        if trainer.current_epoch == self.epoch and index == self.batch:
            raise RuntimeError("simulated crash mid-epoch")


def trained_weights(result: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = torch.load(result["checkpoint_uri"], map_location="cpu", weights_only=True)
    return state["state_dict"]


def test_resume_mid_epoch_gives_the_uninterrupted_model(packed: Any, tmp_path: Path) -> None:
    """A crash in epoch 2 and a rerun: the same weights, bit for bit, and the same
    metrics as a training that never stopped (model, optimizer, scheduler and data
    order restored; the interrupted epoch restarts from its beginning)."""
    whole = train(with_root(packed, tmp_path / "whole", epochs=3, preview_samples=0), packed)
    cfg = with_root(packed, tmp_path / "crashed", epochs=3, preview_samples=0)
    with pytest.raises(RuntimeError, match="mid-epoch"):
        train(cfg, packed, callbacks=[FailAtBatch(1, 5)])
    resumed = train(cfg, packed)
    assert resumed["resumed"] and not whole["resumed"]
    weights, reference = trained_weights(resumed), trained_weights(whole)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert resumed["val_metrics"] == whole["val_metrics"]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_gives_the_uninterrupted_model(packed: Any,
                                                                   tmp_path: Path) -> None:
    """`mapgap train` killed with SIGKILL once epoch 1 is checkpointed (so in epoch
    2), then rerun: the weights of a training that never stopped, bit for bit."""
    cfg = with_root(packed, tmp_path / "killed", epochs=3, steps_per_epoch=20,
                    preview_samples=0)
    run_dir = Path(cfg.run_uri)
    shutil.copytree(packed.run_uri, run_dir)  # the packed shards, in a run dir of its own
    for done in ("train", "prefect-results", "mlflow.db"):  # other tests' trainings
        path = run_dir / done
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    whole = train(with_root(packed, tmp_path / "whole", epochs=3, steps_per_epoch=20,
                            preview_samples=0), packed)

    mapgap = [sys.executable, "-m", "mapgap.cli", "train", str(config)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(mapgap, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list(run_dir.glob("train/*/checkpoints/last.ckpt")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(run_dir.glob("train/*/result.json"))

    rerun = subprocess.run(mapgap, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [done] = run_dir.glob("train/*/result.json")
    resumed = storage.read_json(str(done))
    assert resumed["resumed"]
    weights, reference = trained_weights(resumed), trained_weights(whole)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert resumed["val_metrics"] == whole["val_metrics"]


def test_training_log_has_no_lightning_chatter(packed: Any, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Lightning's tips and device banners stay out of the log, also once its twin
    package (pytorch_lightning, which MLflow may import) has renamed their logger."""
    import logging

    import pytorch_lightning  # noqa: F401

    caplog.set_level(logging.INFO)
    train(with_root(packed, tmp_path / "quiet", epochs=1, steps_per_epoch=2,
                    preview_samples=0), packed)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "epoch 1/1" in text
    assert "litlogger" not in text and "GPU available" not in text, text


def test_champion_only_when_val_iou_beats_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    c.create_registered_model("building")
    aliases = []
    for iou in (0.5, 0.4, 0.6, 0.6):
        mv = c.create_model_version("building", source=str(tmp_path))
        aliases.append(tracking.promote(c, "building", mv.version, iou))
    assert aliases == [["candidate", "champion"], ["candidate"], ["candidate", "champion"],
                       ["candidate"]]
    assert str(c.get_model_version_by_alias("building", "champion").version) == "3"
    assert str(c.get_model_version_by_alias("building", "candidate").version) == "4"


def test_tracking_locations(packed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = packed.model_dump(mode="json")
    data["storage"]["root"] = "s3://bucket/prefix"
    remote = type(packed).model_validate(data)
    uri = tracking.tracking_uri(remote)
    assert uri.startswith(f"sqlite:///{tmp_path / 'cache' / 'mapgap'}/t-")
    assert tracking.artifact_location(remote) == "s3://bucket/prefix/runs/t/mlartifacts"
    data["train"]["tracking_uri"] = "http://127.0.0.1:5000"
    server = type(packed).model_validate(data)
    assert tracking.tracking_uri(server) == "http://127.0.0.1:5000"
    assert tracking.artifact_location(server) is None


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_losses_ignore_255_and_reward_correct_logits(name: str) -> None:
    fn, activation = losses.loss_for(name)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 4:10] = 1
    target[:, 0, :] = 255
    channels = 1 if activation == "sigmoid" else 2
    good = torch.full((2, channels, 16, 16), -6.0)
    if activation == "sigmoid":
        good[:, 0][target == 1] = 6.0
    else:
        good[:, 0] = 6.0
        good[:, 0][target == 1] = -6.0
        good[:, 1][target == 1] = 6.0
    bad = -good
    assert fn(good, target) < 0.1 < fn(bad, target)
    changed = good.clone()
    changed[:, :, 0, :] = 100.0  # only ignore pixels differ
    assert fn(changed, target) == pytest.approx(float(fn(good, target)), abs=1e-5)


def test_model_contract_and_checkpoint_errors(tmp_path: Path) -> None:
    for activation in ("sigmoid", "softmax"):
        model = SegmentationModel(["building", "road"], width=4, depth=2,
                                  activation=activation).eval()
        probs = model(torch.rand(1, 3, 8, 12))
        assert probs.shape == (1, 2, 8, 12) and probs.min() >= 0 and probs.max() <= 1
        with pytest.raises(ValueError, match="multiples of 4"):
            model(torch.rand(1, 3, 10, 12))
        path = str(tmp_path / f"{activation}.pt")
        save_checkpoint(model, path)
        loaded = load_model(path)
        x = torch.rand(1, 3, 16, 16)
        assert torch.equal(loaded(x), model(x)) and loaded.classes == ["building", "road"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read checkpoint"):
        load_model(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a mapgap model checkpoint"):
        load_model(str(tmp_path / "other.pt"))
    with pytest.raises(ModelSpecError, match="no such checkpoint"):
        load_model(str(tmp_path / "absent.pt"))
    with pytest.raises(ModelSpecError, match="not found in the registry"):
        load_model("models:/nothing@champion", f"sqlite:///{tmp_path / 'm.db'}")
