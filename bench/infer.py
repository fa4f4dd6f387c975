"""End-to-end inference throughput vs the bare model forward.

End to end = what a predict task does: read PNG tiles + neighbour margins
(DataLoader worker), forward, crop, uint8, encode and write the probability
PNGs. Baseline = the same model on the same window tensors, same batch size and
threads, nothing else. Prints ``infer_vs_forward=<end-to-end tiles/s / forward
tiles/s>`` last (goal >= 0.8).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mapgap import storage
from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.models.segmentation import SegmentationModel
from mapgap.tasks.predict import ContextWindows, PredictSettings, predict_tiles

COLS, ROWS, SIZE, Z = 8, 4, 256, 18
BATCH, THREADS, REPEATS = 8, 1, 3


def make_tiles(layout: RunLayout) -> list[Tile]:
    rng = np.random.default_rng(0)
    tiles = []
    for r in range(ROWS):
        for c in range(COLS):
            img = rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
            img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
            t = Tile(131072 + c, 131072 + r, Z)
            storage.write_bytes(layout.image(t), cv2.imencode(".png", img)[1].tobytes())
            tiles.append(t)
    return tiles


def main() -> None:
    torch.set_num_threads(THREADS)
    model = SegmentationModel(["building"], width=16, depth=4).eval()  # the trained architecture
    with tempfile.TemporaryDirectory(prefix="mapgap-bench-") as tmp:
        layout = RunLayout(str(Path(tmp) / "run"))
        tiles = make_tiles(layout)
        s = PredictSettings(tile_size=SIZE, batch_size=BATCH, threads=THREADS, loader_workers=1)
        windows = [w for _, w in ContextWindows(layout, tiles, s)]
        batches = [torch.stack(windows[i:i + BATCH]).float().div_(255)
                   for i in range(0, len(windows), BATCH)]

        def forward() -> None:
            with torch.inference_mode():
                for x in batches:
                    model(x)

        def end_to_end() -> None:
            predict_tiles(layout, tiles, model, s)

        end_to_end()  # warm-up: starts the loader's fork server, allocator, caches
        forward()
        t_fwd, t_e2e = [], []
        for _ in range(REPEATS):  # interleaved: load from other processes hits both alike
            for fn, out in ((forward, t_fwd), (end_to_end, t_e2e)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    n = len(tiles)
    fwd, e2e = n / statistics.median(t_fwd), n / statistics.median(t_e2e)
    window = windows[0].shape[-1]
    print(f"{n} tiles of {SIZE} px (+margin: {window} px windows), batch {BATCH}, "
          f"{THREADS} thread(s), U-Net width 16 depth 4")
    print(f"forward only:  {fwd:.2f} tiles/s  (runs {[round(t, 2) for t in t_fwd]} s)")
    print(f"end to end:    {e2e:.2f} tiles/s  (runs {[round(t, 2) for t in t_e2e]} s)")
    print(f"infer_vs_forward={e2e / fwd:.3f}")


if __name__ == "__main__":
    main()
