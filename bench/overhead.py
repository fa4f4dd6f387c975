"""Prefect's overhead on the inference stage: ~2,000 tiles through the real
predict flow (tasks, persisted results, cache keys, logs) vs the same task
functions called plainly in one process, same batches, same model.

A small untimed warm-up of both first takes the once-per-process costs (the
ephemeral API server, first imports and kernels). Each measurement uses a fresh
run dir so nothing is served from cache; rounds alternate which goes first, and
the result is the median of the per-round ratios of CPU time (this process and
the API server it started; wall-time ratios are printed too, but on a shared
host they vary by more than the overhead they are meant to show).

    .venv/bin/python bench/overhead.py [--side 45] [--rounds 3]
Last line: prefect_overhead=<flow CPU time / plain CPU time>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mapgap.orchestration import setup_environment  # noqa: E402

setup_environment(Path(tempfile.mkdtemp(prefix="mapgap-bench-")))


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


def in_fresh_thread(cfg) -> None:
    """``plain`` on a new thread, as the flow's tasks run on the task runner's. On
    the main thread plain measured 10-15% slower than the flow (likely its OpenMP
    pool, sized by earlier torch work such as making the checkpoint)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(plain, cfg).result()


def cpu_seconds() -> float:
    """CPU time of this process and its children (the ephemeral API server): on a
    shared 2-core host, wall time between identical runs varies by +-15%, more than
    the overhead measured; the work done does not."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += c.user + c.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=45, help="AOI is side x side tiles")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from mapgap.flows.predict import predict_flow
    from tests.test_scale_out import random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="mapgap-overhead-"))
    ckpt = random_checkpoint(work / "model.pt")
    runs = {"plain": in_fresh_thread, "flow": lambda cfg: configured(predict_flow, cfg)(cfg)}
    # Untimed: the ephemeral API server's start, first imports (vectorize pulls in
    # GeoPandas) and first kernels are once-per-process costs, not per-run ones.
    for kind, run in runs.items():
        run(scene(work / f"warm-{kind}", 4, ckpt))
    wall: dict[str, list[float]] = {kind: [] for kind in runs}
    cpu: dict[str, list[float]] = {kind: [] for kind in runs}
    for r in range(args.rounds):
        # Alternate which goes first: load drifts between rounds, not within one.
        for kind in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            cfg = scene(work / f"{kind}-{r}", args.side, ckpt)
            start, cpu0 = time.perf_counter(), cpu_seconds()
            runs[kind](cfg)
            wall[kind].append(time.perf_counter() - start)
            cpu[kind].append(cpu_seconds() - cpu0)
            print(f"{kind:5s} round {r}: {wall[kind][-1]:.2f} s wall, {cpu[kind][-1]:.2f} s CPU "
                  f"for {args.side**2} tiles")
    for name, t in (("wall", wall), ("CPU", cpu)):
        ratios = [f / p for f, p in zip(t["flow"], t["plain"], strict=True)]
        print(f"{name} time, flow / plain per round:", " ".join(f"{x:.3f}" for x in ratios),
              f"(median {statistics.median(ratios):.3f})")
    ratios = [f / p for f, p in zip(cpu["flow"], cpu["plain"], strict=True)]
    print(f"prefect_overhead={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
