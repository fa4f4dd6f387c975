"""Prefect's overhead on the inference stage: ~2,000 tiles through the real
predict flow (tasks, persisted results, cache keys, logs) vs the same task
functions called plainly in one process, same batches, same model.

The ephemeral API server is started by a warm-up flow before timing: it is a
once-per-process cost, not a per-run one. Each measurement uses a fresh run dir
so nothing is served from cache.

    .venv/bin/python bench/overhead.py [--side 45] [--rounds 2]
Last line: prefect_overhead=<flow time / plain time>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mapgap.orchestration import setup_environment  # noqa: E402

setup_environment(Path(tempfile.mkdtemp(prefix="mapgap-bench-")))

from prefect import flow  # noqa: E402

from mapgap.grid import iter_batches, tile_key  # noqa: E402
from mapgap.layout import RunLayout  # noqa: E402
from mapgap.orchestration import configured  # noqa: E402
from tests.helpers_inference import SIZE, make_config, write_mosaic  # noqa: E402


def scene(root: Path, side: int, ckpt: str):
    root.mkdir(parents=True)
    cfg = make_config(root, cols=side, rows=side,
                      runner={"kind": "thread", "workers": 1},
                      inference={"model": ckpt, "tiles_per_task": 512, "loader_workers": 0,
                                 "batch_size": 16, "threads": 1, "min_area_m2": 0})
    rng = np.random.default_rng(0)
    mosaic = rng.integers(0, 200, (side * SIZE, side * SIZE, 3), dtype=np.uint8)
    write_mosaic(RunLayout(cfg.run_uri), mosaic)
    return cfg


def plain(cfg) -> None:
    from mapgap.tasks.predict import (
        PredictSettings,
        blocked_order,
        imagery_digest,
        load_model,
        predict_batch,
        resolve_model,
        tiles_to_predict,
        write_meta,
    )
    from mapgap.tasks.vectorize import VectorSettings, merge_batches, vectorize_batch

    layout = RunLayout(cfg.run_uri)
    ref, settings = resolve_model(cfg), PredictSettings.from_config(cfg)
    versions, _ = tiles_to_predict(cfg, layout)
    classes = list(load_model(ref).classes)
    write_meta(layout, ref, classes, settings)
    n = cfg.inference.tiles_per_task
    batches = list(iter_batches(blocked_order(list(versions), n), n))
    digests = [imagery_digest(b, versions) for b in batches]
    batches = [[tile_key(t) for t in b] for b in batches]
    for keys, digest in zip(batches, digests, strict=True):
        predict_batch.fn(cfg.run_uri, keys, ref, settings, digest)
    vector = VectorSettings.from_config(cfg, classes)
    pieces = [vectorize_batch.fn(cfg.run_uri, keys, vector, f"{ref.key}|{settings}|{digest}")
              for keys, digest in zip(batches, digests, strict=True)]
    merge_batches.fn(cfg.run_uri, pieces, vector)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=45, help="AOI is side x side tiles")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from mapgap.flows.predict import predict_flow
    from tests.test_scale_out import random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="mapgap-overhead-"))
    ckpt = random_checkpoint(work / "model.pt")
    flow(lambda: None, name="warm-up")()  # start the ephemeral API server untimed
    times: dict[str, list[float]] = {"plain": [], "flow": []}
    for r in range(args.rounds):
        for kind in ("plain", "flow"):
            cfg = scene(work / f"{kind}-{r}", args.side, ckpt)
            start = time.perf_counter()
            if kind == "plain":
                plain(cfg)
            else:
                configured(predict_flow, cfg)(cfg)
            times[kind].append(time.perf_counter() - start)
            print(f"{kind:5s} round {r}: {times[kind][-1]:.2f} s for {args.side**2} tiles")
    ratio = min(times["flow"]) / min(times["plain"])
    print(f"prefect_overhead={ratio:.3f}")


if __name__ == "__main__":
    main()
