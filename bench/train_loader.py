"""Training steps/s with the real WebDataset loader vs the same batches preloaded
in memory: is the loader the bottleneck?

Shards hold the real Kampala tiles (PNG and JPEG-bytes-named-.png, re-encoded as
RGB PNG like the fetch stage does) with rectangle masks, or synthetic tiles
when ../shared/data is absent. Both modes run the same model, optimiser and
step function in this process; the loader mode streams, decodes, augments and
batches with the DataModule (``--workers`` processes), the memory mode iterates
a list of batches collected from that same loader beforehand. Each round times
one block of each mode back to back (alternating which goes first; the loader
starts a fresh epoch, so nothing is prefetched while the other mode runs) and
the result is the median of the per-round ratios: on a shared machine, load
drifts between rounds but hits both blocks of a round alike.

Defaults are conf/demo.yaml's training (batch 8 x 128 px crops, U-Net width 8
depth 3: the fastest steps we ship, so the loader's hardest case) with one loader
worker and the shipped decoded-sample cache (``train.decode_cache_mb``). The
memory batches are collected from the loader first, so the cache is warm, as it
is from a training's second epoch on; ``--cache-mb 0`` measures every epoch
decoding again (the first epoch's cost).

    .venv/bin/python bench/train_loader.py [--steps 8] [--rounds 6] [--workers 1]
Last line: loader_vs_memory=<loader steps/s / memory steps/s>  (goal >= 0.9)
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mapgap.conf.training import TrainConfig
from mapgap.models.datamodule import ShardDataModule
from mapgap.models.module import SegmentationModule
from mapgap.tasks.shards import AtomicShardWriter, png_bytes, sample_dict

KAMPALA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kampala"
CLASSES = ["building"]


def tile_images(n: int) -> list[np.ndarray]:
    paths = sorted(KAMPALA.glob("OAM-*-21.png"))
    if paths:
        return [np.asarray(Image.open(paths[i % len(paths)]).convert("RGB")) for i in range(n)]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(n)]


def write_shards(directory: str, n: int) -> list[str]:
    rng = np.random.default_rng(1)
    with AtomicShardWriter(directory, "train", maxcount=32, maxsize=10**9) as out:
        for i, image in enumerate(tile_images(n)):
            mask = np.zeros(image.shape[:2], np.uint8)
            for _ in range(4):
                y, x = rng.integers(0, 200, 2)
                mask[y:y + 40, x:x + 50] = 1
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            out.write(sample_dict(f"z21_{i}_0", buf.getvalue(), "png", png_bytes(mask),
                                  {"classes": CLASSES}))
    return [str(Path(directory, s.name)) for s in out.shards]


def steps_per_second(module: SegmentationModule, opt: torch.optim.Optimizer,
                     batches: Iterable, steps: int) -> float:
    """Train ``steps`` steps after one warm-up step (worker start-up excluded)."""
    it = iter(batches)
    t0 = None
    for i in range(steps + 1):
        images, masks = module.on_after_batch_transfer(next(it), 0)[:2]
        loss = module.loss_fn(module.model.logits(images), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 0:
            t0 = time.perf_counter()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--cache-mb", type=int, default=TrainConfig().decode_cache_mb,
                    help="decoded-sample cache per loader process (train.decode_cache_mb)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mapgap-bench-") as tmp:
        urls = write_shards(tmp, 96)
        dm = ShardDataModule(urls, urls, CLASSES, batch_size=args.batch_size,
                             steps_per_epoch=args.steps + 1, crop_size=args.crop,
                             num_workers=args.workers, shuffle_buffer=64,
                             decode_cache_mb=args.cache_mb)
        loader = dm.train_dataloader()
        # The very batches the loader produces, copied out of the workers' shared memory.
        memory = [tuple(t.clone() for t in batch) for batch in loader]
        module = SegmentationModule(CLASSES, width=args.width, depth=args.depth)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        rates: dict[str, list[float]] = {"memory": [], "loader": []}
        for r in range(args.rounds):
            for mode in ("memory", "loader") if r % 2 == 0 else ("loader", "memory"):
                src = memory if mode == "memory" else loader
                rates[mode].append(steps_per_second(module, opt, src, args.steps))
            print(f"round {r + 1}: memory {rates['memory'][-1]:.3f} steps/s, loader "
                  f"{rates['loader'][-1]:.3f} steps/s", flush=True)
    ratio = statistics.median(ld / mem for ld, mem in zip(rates["loader"], rates["memory"],
                                                           strict=True))
    print(f"batch {args.batch_size} x {args.crop}px, U-Net width {args.width} depth "
          f"{args.depth}, {args.workers} loader worker(s), decode cache {args.cache_mb} MB, "
          f"{torch.get_num_threads()} torch "
          f"threads; median steps/s: memory {statistics.median(rates['memory']):.3f}, "
          f"loader {statistics.median(rates['loader']):.3f}")
    print(f"loader_vs_memory={ratio:.3f}")


if __name__ == "__main__":
    main()
