"""Streams packed shards into training batches.

Train: every worker resamples shards, mixes samples in a shuffle buffer,
augments image, mask and distance target jointly with albumentations and
batches; the epoch is a fixed number of batches, independent of the dataset
size. Every random choice of an epoch (shard draws, shuffle, augmentation) is a
function of (seed, epoch, worker) only: the stream is rebuilt and reseeded at
each epoch start, so a training resumed at epoch k sees exactly the batches an
uninterrupted one does. Under Lightning the epoch is the fit loop's (the number
it gives samplers' ``set_epoch``); elsewhere it counts iterations of the train
loader, or is set with :meth:`ShardDataModule.set_epoch`.
Val: every val sample once per epoch, in order, without augmentation.

Batches are ``(images uint8 [B,3,H,W], masks uint8 [B,H,W], distance uint8
[B,H,W], skipped count)``: distance is the sample's sdt (1..255, 128 on an
instance outline), 0 where the sample has none. The LightningModule turns them
into model inputs after the transfer to the device. Corrupt samples are skipped
and counted: each batch carries how many samples its worker skipped since its
previous batch, and the LightningModule logs the sum
(``train/skipped_samples``, ``val/skipped_samples``).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mapgap import storage
from mapgap.tasks.shards import (
    IGNORE,
    CorruptSampleError,
    decode_distance,
    decode_sample,
    register_gopen_schemes,
    trained_classes,
)
from mapgap.workers import worker_context

log = logging.getLogger("mapgap.data")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Stop instead of spinning forever on a shard set that yields nothing decodable.
MAX_BAD_BEFORE_GOOD = 64


class ShardSetError(ValueError):
    """An unusable list of shards (empty, missing files, nothing decodable)."""


def augmentations(size: int, augment: bool, seed: int) -> A.Compose:
    """Joint image+mask+distance augmentation; mask and distance are resampled
    nearest-neighbour, never interpolated, and only geometric transforms touch
    them (the colour transforms are image-only)."""
    if not augment:
        transforms = [A.RandomCrop(size, size)]
    else:
        transforms = [
            A.RandomResizedCrop(size=(size, size), scale=(0.35, 1.0), ratio=(0.8, 1.25)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=0,
                                 p=0.3),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.2),
        ]
    aug = A.Compose(transforms, additional_targets={"distance": "mask"})
    reseed(aug, seed)
    return aug


def reseed(aug: A.Compose, seed: int) -> None:
    """Restart every random choice of ``aug`` from ``seed``, with one generator
    shared by all its transforms: ``Compose(seed=...)`` gives each transform its
    own generator with the same seed, so transforms that draw alike (the two
    flips) would always fire together."""
    aug.set_random_state(np.random.default_rng(seed), random.Random(seed))


def epoch_seeds(seed: int, epoch: int, worker: int, n: int) -> list[int]:
    """``n`` independent seeds for one worker's epoch, from (seed, epoch, worker) only."""
    return [int(s) for s in np.random.SeedSequence([seed, epoch, worker]).generate_state(n)]


def class_lut(shard_classes: Sequence[str], trained: Sequence[str]) -> np.ndarray:
    """Mask value lookup: shard class i+1 -> trained index + 1; other classes -> 0."""
    lut = np.zeros(256, np.uint8)
    lut[IGNORE] = IGNORE
    for i, name in enumerate(shard_classes):
        if name in trained:
            lut[i + 1] = trained.index(name) + 1
    return lut


Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]


class DecodedCache:
    """Decoded (image, mask, distance or None) by (shard URL, sample key), up to
    ``limit_mb``.

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
        self._items: dict[tuple[str, str], Decoded] = {}

    def get(self, key: tuple[str, str]) -> Decoded | None:
        item = self._items.get(key)
        self.hits += item is not None
        return item

    def put(self, key: tuple[str, str], image: np.ndarray, mask: np.ndarray,
            distance: np.ndarray | None = None) -> None:
        arrays = [a for a in (image, mask, distance) if a is not None]
        nbytes = sum(a.nbytes for a in arrays)
        if self.size + nbytes > self.limit:
            return
        for a in arrays:
            a.flags.writeable = False
        self._items[key] = (image, mask, distance)
        self.size += nbytes


class SampleTransform:
    """Raw WebDataset sample -> (image uint8 [3,H,W], mask uint8 [H,W], distance
    uint8 [H,W], 0 where the sample has no distance target).

    The augmenter is built lazily (its size is the first sample's) and seeded
    with ``seed`` until :meth:`reseed` restarts it for an epoch.
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
        self._aug_seed = seed
        self._aug: A.Compose | None = None
        self._luts: dict[tuple[str, ...], np.ndarray] = {}

    def reseed(self, seed: int) -> None:
        """Start an epoch: the augmentation restarts from ``seed`` and the skipped
        count from 0, whatever earlier epochs did."""
        self._aug_seed = seed
        self.skipped = 0
        if self._aug is not None:
            reseed(self._aug, seed)

    def _augmenter(self, size: int) -> A.Compose:
        if self._aug is None:
            self._aug = augmentations(size, self.augment, self._aug_seed)
        return self._aug

    def decode(self, sample: dict[str, Any]) -> Decoded:
        key = (sample.get("__url__", ""), sample.get("__key__", ""))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        image, mask, meta = decode_sample(sample)
        distance = decode_distance(sample)
        names = tuple(meta.get("classes", ()))
        if names not in self._luts:
            self._luts[names] = class_lut(names, self.classes)
        mask = self._luts[names][mask]
        self.cache.put(key, image, mask, distance)
        return image, mask, distance

    def __call__(self, sample: dict[str, Any]) -> Sample | None:
        try:
            image, mask, distance = self.decode(sample)
        except CorruptSampleError as err:
            self.skipped += 1
            log.warning("skipping corrupt sample: %s", err)
            if self.good == 0 and self.skipped >= MAX_BAD_BEFORE_GOOD:
                raise ShardSetError(f"the first {self.skipped} samples were all corrupt "
                                    f"(last: {err})") from None
            return None
        self.good += 1
        if distance is None:
            distance = np.zeros_like(mask)
        if self.crop is not None or self.augment:
            out = self._augmenter(self.crop or image.shape[0])(image=image, mask=mask,
                                                               distance=distance)
            image, mask, distance = out["image"], out["mask"], out["distance"]
        return to_tensors(image, mask, distance)

    def collate(self, samples: list[Sample]) -> Batch:
        images, masks, distance = (torch.stack(parts) for parts in zip(*samples, strict=True))
        skipped, self.skipped = self.skipped, 0
        return images, masks, distance, torch.tensor(skipped)


def to_tensors(image: np.ndarray, mask: np.ndarray, distance: np.ndarray) -> Sample:
    """uint8 [3,H,W], [H,W] and [H,W]: a quarter of the bytes of float32 to pass from
    the workers; the LightningModule converts whole batches after the transfer."""
    x = torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))
    return (x, torch.from_numpy(np.array(mask, order="C")),
            torch.from_numpy(np.array(distance, order="C")))


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


def _tar_error(exn: Exception) -> bool:
    """A truncated or unreadable shard: warn and carry on with the next one."""
    log.warning("skipping unreadable shard data: %s", exn)
    return True


class TrainStream(IterableDataset):
    """One epoch of train batches per iteration, rebuilt at each epoch start from
    (seed, epoch, worker): the shard draws, the shuffle buffer and the augmenter
    all restart from seeds of those three, so no state of earlier epochs (or of a
    process that never ran them) leaks in.

    The epoch lives in shared memory: persistent workers keep their copy of this
    object, and read the epoch the main process set (:meth:`set_epoch`) before it
    asked them for the epoch's batches.
    """

    def __init__(self, shards: Sequence[str], transform: SampleTransform, batch_size: int,
                 batches_per_worker: int, shuffle_buffer: int, seed: int) -> None:
        super().__init__()
        self.shards = list(shards)
        self.transform = transform
        self.batch_size = batch_size
        self.batches_per_worker = batches_per_worker
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shard_seed, shuffle_seed, aug_seed = epoch_seeds(self.seed, int(self.epoch), worker, 3)
        self.transform.reseed(aug_seed)
        t = self.transform
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.shards, seed=shard_seed, deterministic=True),
            wds.tarfile_to_samples(handler=_tar_error),
            wds.detshuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 64),
                           seed=shuffle_seed),
            wds.map(t),
            wds.batched(self.batch_size, collation_fn=t.collate, partial=False),
        )
        return islice(iter(pipeline), self.batches_per_worker)


class EpochLoader(DataLoader):
    """A DataLoader that tells its :class:`TrainStream` which epoch an iteration is
    before any worker starts on it (``next_epoch()`` is asked once per iteration)."""

    def __init__(self, dataset: TrainStream, next_epoch: Callable[[], int],
                 **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.next_epoch = next_epoch

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self.next_epoch())
        return super().__iter__()


def loader(dataset: Any, workers: int,
           next_epoch: Callable[[], int] | None = None) -> DataLoader:
    """Batches come pre-collated from the dataset; workers start from a fork server
    (see :mod:`mapgap.workers`) and persist across epochs. ``next_epoch``: the
    dataset is a :class:`TrainStream` to tell the epoch."""
    kwargs: dict[str, Any] = {"batch_size": None}
    if workers:
        kwargs.update(num_workers=workers, persistent_workers=True, prefetch_factor=4,
                      multiprocessing_context=worker_context(__name__),
                      worker_init_fn=_worker_init)
    if next_epoch is None:
        return DataLoader(dataset, **kwargs)
    return EpochLoader(dataset, next_epoch, **kwargs)


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
        self._epoch = 0

    @classmethod
    def from_config(cls, cfg: Any, train_shards: Sequence[str],
                    val_shards: Sequence[str]) -> ShardDataModule:
        t = cfg.train
        return cls(train_shards, val_shards, trained_classes(cfg), batch_size=t.batch_size,
                   steps_per_epoch=t.steps_per_epoch, crop_size=t.crop_size,
                   num_workers=t.num_workers, shuffle_buffer=t.shuffle_buffer,
                   augment=t.augment, seed=t.seed, preview_samples=t.preview_samples,
                   decode_cache_mb=t.decode_cache_mb)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the train loader's next iteration serves, outside Lightning
        (tests, benchmarks); later iterations count on from it."""
        self._epoch = epoch

    def next_epoch(self) -> int:
        """The epoch a new iteration of the train loader serves. While Lightning fits
        with this data module: its fit loop's epoch, which it also gives samplers'
        ``set_epoch`` (right on resume too, where Lightning creates the epoch's
        iterator before any epoch hook runs); otherwise counted."""
        if self.trainer is not None:
            return self.trainer.fit_loop.epoch_progress.current.processed
        epoch, self._epoch = self._epoch, self._epoch + 1
        return epoch

    def train_dataset(self) -> TrainStream:
        per_worker = math.ceil(self.steps_per_epoch / max(1, self.num_workers))
        return TrainStream(self.train_shards, self.train_transform, self.batch_size,
                           per_worker, self.shuffle_buffer, self.seed)

    def val_dataset(self) -> wds.WebDataset:
        t = self.val_transform
        return (
            wds.WebDataset(self.val_shards, shardshuffle=False, nodesplitter=None,
                           empty_check=False, handler=_tar_error)
            .map(t)
            .batched(self.batch_size, collation_fn=t.collate, partial=True)
        )

    def train_dataloader(self) -> DataLoader:
        return loader(self.train_dataset(), self.num_workers, self.next_epoch)

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

