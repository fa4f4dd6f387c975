"""The training data module: batches (images, masks, distance, skipped) from real
packed shards, the distance target aligned with the mask through augmentation,
corrupt samples skipped and counted, the decoded cache, and epochs that replay
exactly (fresh at epoch k == reached after epochs 0..k-1, with 0 or 1 workers,
and through a Lightning resume)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image

from mapgap import storage
from mapgap.layout import RunLayout
from mapgap.models.datamodule import (
    DecodedCache,
    SampleTransform,
    ShardDataModule,
    ShardSetError,
    reseed,
)
from mapgap.tasks.pack import shard_uris
from mapgap.tasks.shards import AtomicShardWriter, decode_distance, png_bytes, sample_dict
from tests.test_pack import (
    make_config,
    make_run,
    read_shards,
    run_pack,
    synthetic_sdt,
    synthetic_tile,
)

TINY = {"classes": ["building"], "steps_per_epoch": 4, "batch_size": 2, "crop_size": 64}


def _packed(tmp: Path, sdt: bool) -> Any:
    cfg = make_config(str(tmp / "out"), tmp, n=4, train=TINY,
                      labels={"signed_distance": sdt})
    make_run(cfg, sdt=sdt)
    run_pack(cfg)
    return cfg


@pytest.fixture(scope="module")
def with_sdt(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A packed 4 x 4 tile run whose harvest wrote sdt PNGs."""
    return _packed(tmp_path_factory.mktemp("sdt"), sdt=True)


@pytest.fixture(scope="module")
def without_sdt(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same kind of run packed without distance targets (shards of older runs)."""
    return _packed(tmp_path_factory.mktemp("plain"), sdt=False)


def shards(cfg: Any, split: str) -> list[str]:
    return shard_uris(RunLayout(cfg.run_uri).manifest, split)


def data(cfg: Any, **kw: Any) -> ShardDataModule:
    return ShardDataModule(shards(cfg, "train"), shards(cfg, "val"), ["building"],
                           **{"batch_size": 2, "steps_per_epoch": 4, "crop_size": 64,
                              "shuffle_buffer": 8, **kw})


def inside(masks: torch.Tensor) -> torch.Tensor:
    """Where synthetic_sdt is > 128: buildings and their ignore sliver."""
    return (masks == 1) | (masks == 255)


def test_val_distance_is_the_harvested_sdt(with_sdt: Any) -> None:
    dm = data(with_sdt, preview_samples=2)
    batches = list(dm.val_dataloader())
    assert all(len(b) == 4 and b[2].dtype == torch.uint8 for b in batches)
    got = torch.cat([b[2] for b in batches]).numpy()
    want = np.stack([decode_distance(s) for s in read_shards(shards(with_sdt, "val"))])
    np.testing.assert_array_equal(got, want)
    images, masks = dm.preview_batch()
    assert images.shape == (2, 3, 256, 256) and masks.shape == (2, 256, 256)


def test_augmented_distance_stays_aligned_with_the_mask(with_sdt: Any) -> None:
    batches = list(data(with_sdt, steps_per_epoch=12).train_dataloader())
    assert len(batches) == 12
    for images, masks, distance, skipped in batches:
        assert images.shape == (2, 3, 64, 64) and distance.shape == masks.shape == (2, 64, 64)
        assert int(skipped) == 0 and (distance > 0).all()  # every sample has a target
        assert torch.equal(distance > 128, inside(masks))


def test_shards_without_sdt_give_zero_distance(without_sdt: Any) -> None:
    dm = data(without_sdt)
    for batch in [*dm.train_dataloader(), *dm.val_dataloader()]:
        assert len(batch) == 4 and not batch[2].any() and batch[2].shape == batch[1].shape


def test_empty_or_missing_shards_are_clear_errors(without_sdt: Any, tmp_path: Path) -> None:
    with pytest.raises(ShardSetError, match="no train shards"):
        ShardDataModule([], shards(without_sdt, "val"), ["building"])
    missing = str(tmp_path / "val-000000.tar")
    with pytest.raises(ShardSetError, match=f"{missing}: val shard not found"):
        ShardDataModule(shards(without_sdt, "train"), [missing], ["building"])


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    image, mask = synthetic_tile(3, 3)
    meta = {"classes": ["building", "road"]}
    good = sample_dict("z18_0_0", _png(image), "png", png_bytes(mask), meta,
                       png_bytes(synthetic_sdt(mask)))
    with AtomicShardWriter(str(tmp_path), "val", maxcount=100, maxsize=10**9) as out:
        out.write(good)
        out.write({**good, "__key__": "z18_0_1", "image.png": b"\x89PNG broken"})
        out.write({**good, "__key__": "z18_0_2", "mask.png": png_bytes(mask[:128])})
        out.write({**good, "__key__": "z18_0_3", "sdt.png": b"\x89PNG broken"})
        out.write({**good, "__key__": "z18_0_4", "sdt.png": png_bytes(mask[:128])})
        out.write({**good, "__key__": "z18_0_5"})
    uris = [str(tmp_path / s.name) for s in out.shards]
    dm = ShardDataModule(uris, uris, ["building"], batch_size=2, steps_per_epoch=3,
                         crop_size=64)
    batches = list(dm.val_dataloader())
    assert sum(len(b[0]) for b in batches) == 2
    assert sum(int(b[3]) for b in batches) == 4  # skipped, and counted in the batches
    assert len(list(dm.train_dataloader())) == 3  # the fixed epoch length still holds

    with AtomicShardWriter(str(tmp_path), "bad", maxcount=100, maxsize=10**9) as out:
        out.write({**good, "image.png": b"garbage"})
    bad = [str(tmp_path / s.name) for s in out.shards]
    dm = ShardDataModule(bad, bad, ["building"], batch_size=2, steps_per_epoch=3)
    with pytest.raises(ShardSetError, match="samples were all corrupt"):
        next(iter(dm.train_dataloader()))


def test_class_selection_and_joint_augmentation() -> None:
    image, mask = synthetic_tile(5, 4)
    image[...] = 0
    image[mask == 1] = 255  # the image says where the buildings are
    meta = {"classes": ["building", "road"]}
    sample = sample_dict("z18_0_0", _png(image), "png", png_bytes(mask), meta,
                         png_bytes(synthetic_sdt(mask)))
    t = SampleTransform(["building"], crop=96, augment=True, seed=1, cache_mb=16)
    for _ in range(20):  # decoded once, then from the (read-only) cache
        x, y, d = t(sample)
        assert x.shape == (3, 96, 96) and y.shape == d.shape == (96, 96)
        assert x.dtype == y.dtype == d.dtype == torch.uint8
        assert set(y.unique().tolist()) <= {0, 1, 255}  # road pixels became background
        assert torch.equal(d > 128, inside(y))  # colour ops never touch the distance
        bright = x.float().mean(0) / 255
        if (y == 1).any() and (y == 0).any():
            assert bright[y == 1].mean() > bright[y == 0].mean() + 0.5
    assert t.cache.hits == 19
    cached = t.decode(sample)
    assert not cached[0].flags.writeable and (cached[0] == image).all()
    assert not cached[2].flags.writeable and (cached[2] == synthetic_sdt(mask)).all()
    road_only = SampleTransform(["road"], crop=None, augment=False, seed=1)
    _, y, d = road_only(sample)
    assert set(np.unique(y.numpy())) <= {0, 1, 255} and (y == 1).sum() == (mask == 2).sum()
    assert torch.equal(d, torch.from_numpy(synthetic_sdt(mask)))  # identity: the sdt as is


def test_reseeded_flips_are_independent() -> None:
    """All four flip combinations occur: albumentations' Compose(seed=...) seeds
    each transform alike, so the two flips would always fire together."""
    aug = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    reseed(aug, 3)
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4)
    views = {"none": mask, "h": mask[:, ::-1], "v": mask[::-1], "hv": mask[::-1, ::-1]}
    seen = {name for _ in range(40) for name, view in views.items()
            if np.array_equal(aug(image=mask)["image"], view)}
    assert seen == set(views)


def test_decoded_cache_keeps_what_fits() -> None:
    cache = DecodedCache(limit_mb=1)
    image, mask = np.zeros((256, 256, 3), np.uint8), np.zeros((256, 256), np.uint8)
    for i in range(5):  # 256 KiB each: the first 4 fit, the 5th is not kept
        cache.put(("u", f"k{i}"), image.copy(), mask.copy())
    assert cache.size <= 1 << 20
    assert cache.get(("u", "k0")) is not None and cache.get(("u", "k3")) is not None
    assert cache.get(("u", "k4")) is None and cache.hits == 2
    cache.put(("u", "x"), image, mask)
    assert image.flags.writeable  # not cached (and not frozen) when it does not fit
    small = DecodedCache(limit_mb=1)
    small.put(("u", "d"), image[:64].copy(), mask[:64].copy(), mask[:64].copy())
    assert small.size == 64 * 256 * 5 and not small.get(("u", "d"))[2].flags.writeable


# --- determinism per epoch -------------------------------------------------------------

def digest(batches: list[tuple[torch.Tensor, ...]]) -> list[str]:
    """Every byte of every tensor of each batch."""
    return [hashlib.sha256(b"".join(t.numpy().tobytes() for t in b)).hexdigest()
            for b in batches]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_epoch_replays_exactly(with_sdt: Any, workers: int) -> None:
    """Epoch 2 of a fresh data module started at epoch 2 == epoch 2 reached through
    epochs 0 and 1 (decode cache warm, workers persistent); epochs differ."""
    through = data(with_sdt, num_workers=workers, decode_cache_mb=16).train_dataloader()
    epochs = [digest(list(through)) for _ in range(3)]
    fresh = data(with_sdt, num_workers=workers)
    fresh.set_epoch(2)
    assert digest(list(fresh.train_dataloader())) == epochs[2]
    assert len(epochs[2]) == 4 and not set(epochs[0]) & set(epochs[1])


class Recorder(L.LightningModule):
    """Records a digest of every training batch by epoch (a trivial model to step)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(digest([batch]))
        return (self.w * batch[0].float().mean()).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CrashAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def fit(cfg: Any, ckpt_dir: Path, callbacks: list[Callback], resume: str | None) -> Recorder:
    module = Recorder()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                        limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True), *callbacks])
    trainer.fit(module, datamodule=data(cfg), ckpt_path=resume)
    return module


def test_lightning_resume_replays_the_epochs(with_sdt: Any, tmp_path: Path) -> None:
    """A training resumed from its end-of-epoch-1 checkpoint sees, in every epoch
    it runs, the batches an uninterrupted training saw in that epoch."""
    whole = fit(with_sdt, tmp_path / "whole", [], None).seen
    assert sorted(whole) == [0, 1, 2] and len({tuple(v) for v in whole.values()}) == 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(with_sdt, tmp_path / "resumed", [CrashAt(2)], None)
    last = tmp_path / "resumed" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    resumed = fit(with_sdt, tmp_path / "resumed", [], str(last)).seen
    assert 2 in resumed and all(resumed[e] == whole[e] for e in resumed)


@pytest.mark.slow
def test_shards_stream_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    """Through a (spawned) loader worker, which must find the s3 scheme itself."""
    cfg = make_config(s3_bucket + "/out", tmp_path, n=4, train={**TINY, "num_workers": 1},
                      labels={"signed_distance": True})
    make_run(cfg, sdt=True)
    run_pack(cfg)
    dm = ShardDataModule.from_config(cfg, shards(cfg, "train"), shards(cfg, "val"))
    images, masks, distance, skipped = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 64, 64) and masks.shape == distance.shape == (2, 64, 64)
    assert int(skipped) == 0 and torch.equal(distance > 128, inside(masks))
    assert sum(len(b[0]) for b in dm.val_dataloader()) == storage.read_json(
        RunLayout(cfg.run_uri).manifest)["splits"]["val"]["samples"]
