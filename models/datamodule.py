"""Streams packed shards into training batches.

Train: every worker resamples shards with its own seed (so any number of
workers works with any number of shards), mixes samples in a shuffle buffer,
augments image and mask jointly with albumentations and batches; the epoch is a
fixed number of batches (``.with_epoch``), independent of the dataset size.
Val: every val sample once per epoch, in order, without augmentation.

Batches are (images uint8 [B,3,H,W], masks uint8 [B,H,W], skipped count); the
LightningModule turns them into model inputs after the transfer to the device.
Corrupt samples are skipped and counted: each batch carries how many samples
its worker skipped since its previous batch, and the LightningModule logs the
sum (``train/skipped_samples``, ``val/skipped_samples``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, get_worker_info

from mapgap import storage
from mapgap.tasks.shards import (
    IGNORE,
    CorruptSampleError,
    decode_sample,
    register_gopen_schemes,
    trained_classes,
)
from mapgap.workers import worker_context

log = logging.getLogger("mapgap.data")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Stop instead of spinning forever on a shard set that yields nothing decodable.
MAX_BAD_BEFORE_GOOD = 64


class ShardSetError(ValueError):
    """An unusable list of shards (empty, missing files, nothing decodable)."""


def augmentations(size: int, augment: bool, seed: int) -> A.Compose:
    """Joint image+mask augmentation; the mask is resampled nearest-neighbour and
    padded with the ignore value, never interpolated."""
    crop = A.RandomResizedCrop(size=(size, size), scale=(0.35, 1.0), ratio=(0.8, 1.25))
    if not augment:
        return A.Compose([A.RandomCrop(size, size)], seed=seed)
    return A.Compose([
        crop,
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=0, p=0.3),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.2),
    ], seed=seed)


def class_lut(shard_classes: Sequence[str], trained: Sequence[str]) -> np.ndarray:
    """Mask value lookup: shard class i+1 -> trained index + 1; other classes -> 0."""
    lut = np.zeros(256, np.uint8)
    lut[IGNORE] = IGNORE
    for i, name in enumerate(shard_classes):
        if name in trained:
            lut[i + 1] = trained.index(name) + 1
    return lut


class DecodedCache:
    """Decoded (image, mask) pairs by (shard URL, sample key), up to ``limit_mb``.

    Decoding a PNG costs more per sample than a small U-Net's training step on a
    CPU, and every epoch reads the same samples again, so a data set that fits is
    decoded once per loader process. Once full it keeps what it has instead of
    evicting: val re-reads in a fixed order and train resamples at random, and for
    both an LRU that is too small would only evict what is about to be read.
    Arrays are read-only: augmentations must (and do) return new arrays.
    """

    def __init__(self, limit_mb: int) -> None:
        self.limit = limit_mb << 20
        self.size = 0
        self.hits = 0
        self._items: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def get(self, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray] | None:
        item = self._items.get(key)
        self.hits += item is not None
        return item

    def put(self, key: tuple[str, str], image: np.ndarray, mask: np.ndarray) -> None:
        nbytes = image.nbytes + mask.nbytes
        if self.size + nbytes > self.limit:
            return
        image.flags.writeable = mask.flags.writeable = False
        self._items[key] = (image, mask)
        self.size += nbytes


class SampleTransform:
    """Raw WebDataset sample -> (image uint8 [3,H,W], mask uint8 [H,W]).

    Built lazily in each worker so every worker augments with its own seed.
    """

    def __init__(self, classes: Sequence[str], crop: int | None, augment: bool,
                 seed: int, cache_mb: int = 0) -> None:
        self.classes = list(classes)
        self.crop = crop
        self.augment = augment
        self.seed = seed
        self.skipped = 0
        self.good = 0
        self.cache = DecodedCache(cache_mb)
        self._aug: A.Compose | None = None
        self._luts: dict[tuple[str, ...], np.ndarray] = {}

    def _augmenter(self, size: int) -> A.Compose:
        if self._aug is None:
            info = get_worker_info()
            worker = info.id if info is not None else 0
            self._aug = augmentations(size, self.augment, self.seed * 1009 + worker)
        return self._aug

    def decode(self, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        key = (sample.get("__url__", ""), sample.get("__key__", ""))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        image, mask, meta = decode_sample(sample)
        names = tuple(meta.get("classes", ()))
        if names not in self._luts:
            self._luts[names] = class_lut(names, self.classes)
        mask = self._luts[names][mask]
        self.cache.put(key, image, mask)
        return image, mask

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image, mask = self.decode(sample)
        except CorruptSampleError as err:
            self.skipped += 1
            log.warning("skipping corrupt sample: %s", err)
            if self.good == 0 and self.skipped >= MAX_BAD_BEFORE_GOOD:
                raise ShardSetError(f"the first {self.skipped} samples were all corrupt "
                                    f"(last: {err})") from None
            return None
        self.good += 1
        if self.crop is not None or self.augment:
            out = self._augmenter(self.crop or image.shape[0])(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return to_tensors(image, mask)

    def collate(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        images = torch.stack([s[0] for s in samples])
        masks = torch.stack([s[1] for s in samples])
        skipped, self.skipped = self.skipped, 0
        return images, masks, torch.tensor(skipped)


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3,H,W] and uint8 [H,W]: a quarter of the bytes of float32 to pass from
    the workers; the LightningModule converts whole batches after the transfer."""
    x = torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))
    return x, torch.from_numpy(np.array(mask, order="C"))


def check_shards(urls: Sequence[str], what: str) -> list[str]:
    """Fail early and clearly instead of streaming from nothing."""
    urls = list(urls)
    if not urls:
        raise ShardSetError(f"no {what} shards given (pack first, or check the manifest)")
    missing = [u for u in urls if not storage.exists(u)]
    if missing:
        raise ShardSetError(f"{missing[0]}: {what} shard not found"
                            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    return urls


def _worker_init(worker_id: int) -> None:
    """Lightning's per-worker seeding (it skips loaders with their own init
    function), and the s3:// opener, which a worker may not have inherited."""
    pl_worker_init_function(worker_id)
    register_gopen_schemes()


def loader(dataset: Any, workers: int) -> DataLoader:
    """Batches come pre-collated from the dataset; workers start from a fork server
    (see :mod:`mapgap.workers`) and persist across epochs."""
    if not workers:
        return DataLoader(dataset, batch_size=None)
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True,
                      prefetch_factor=4, multiprocessing_context=worker_context(__name__),
                      worker_init_fn=_worker_init)


def _tar_error(exn: Exception) -> bool:
    """A truncated or unreadable shard: warn and carry on with the next one."""
    log.warning("skipping unreadable shard data: %s", exn)
    return True


class ShardDataModule(L.LightningDataModule):
    """Train/val loaders over lists of shard URIs (local paths or any fsspec URI)."""

    def __init__(self, train_shards: Sequence[str], val_shards: Sequence[str],
                 classes: Sequence[str], *, batch_size: int = 8, steps_per_epoch: int = 50,
                 crop_size: int | None = None, num_workers: int = 0,
                 shuffle_buffer: int = 256, augment: bool = True, seed: int = 0,
                 preview_samples: int = 4, decode_cache_mb: int = 0) -> None:
        super().__init__()
        register_gopen_schemes()
        self.train_shards = check_shards(train_shards, "train")
        self.val_shards = check_shards(val_shards, "val")
        self.classes = list(classes)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.crop_size = crop_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.seed = seed
        self.preview_samples = preview_samples
        self.train_transform = SampleTransform(self.classes, crop_size, augment, seed,
                                               decode_cache_mb)
        self.val_transform = SampleTransform(self.classes, None, False, seed, decode_cache_mb)

    @classmethod
    def from_config(cls, cfg: Any, train_shards: Sequence[str],
                    val_shards: Sequence[str]) -> ShardDataModule:
        t = cfg.train
        return cls(train_shards, val_shards, trained_classes(cfg), batch_size=t.batch_size,
                   steps_per_epoch=t.steps_per_epoch, crop_size=t.crop_size,
                   num_workers=t.num_workers, shuffle_buffer=t.shuffle_buffer,
                   augment=t.augment, seed=t.seed, preview_samples=t.preview_samples,
                   decode_cache_mb=t.decode_cache_mb)

    def train_dataset(self) -> wds.DataPipeline:
        workers = max(1, self.num_workers)
        per_worker = math.ceil(self.steps_per_epoch / workers)
        t = self.train_transform
        return wds.DataPipeline(
            # deterministic=True: the shard order depends on seed + worker + epoch only.
            wds.ResampledShards(self.train_shards, seed=self.seed, deterministic=True),
            wds.tarfile_to_samples(handler=_tar_error),
            wds.detshuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 64),
                           seed=self.seed),
            wds.map(t),
            wds.batched(self.batch_size, collation_fn=t.collate, partial=False),
        ).with_epoch(per_worker)

    def val_dataset(self) -> wds.WebDataset:
        t = self.val_transform
        return (
            wds.WebDataset(self.val_shards, shardshuffle=False, nodesplitter=None,
                           empty_check=False, handler=_tar_error)
            .map(t)
            .batched(self.batch_size, collation_fn=t.collate, partial=True)
        )

    def train_dataloader(self) -> DataLoader:
        return loader(self.train_dataset(), self.num_workers)

    def val_dataloader(self) -> DataLoader:
        # Val shards are split between workers: no more workers than shards.
        return loader(self.val_dataset(), min(self.num_workers, len(self.val_shards)))

    def preview_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first val samples (fixed across epochs) for the preview images."""
        if self.preview_samples == 0:
            return None
        images, masks = [], []
        t = SampleTransform(self.classes, None, False, self.seed)
        for sample in wds.WebDataset(self.val_shards, shardshuffle=False, nodesplitter=None,
                                     workersplitter=None, empty_check=False,
                                     handler=_tar_error).map(t):
            if len(images) >= self.preview_samples:
                break
            images.append(sample[0])
            masks.append(sample[1])
        if not images:
            raise ShardSetError(f"{self.val_shards[0]}: no decodable val sample")
        return torch.stack(images), torch.stack(masks)

