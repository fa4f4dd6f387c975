"""Fetch throughput vs the ceiling of a raw httpx loop, against the same local
tile server.

The server runs in its own process (so it does not share our GIL) and serves
the real Kampala tiles (RGBA PNGs with transparent, black nodata, and JPEG
bytes named .png), repeated under N distinct tile coordinates. The ceiling is
the faster of two tight raw loops with the same concurrency that only download
the bytes (threads + one httpx.Client, and asyncio + httpx.AsyncClient).
mapgap's fetch additionally decodes every tile (to reject undecodable and
blank ones: a full decode for PNG, which has no reduced decoding), checks it
for blank pixels and writes it atomically into the run's tile store, as the
source bytes (every Kampala tile: readers that drop alpha already see black
nodata) or re-encoded when they are not usable as they are. To show what that
unavoidable work alone costs, a third tight loop downloads, decodes and writes
the bytes with the same helpers but no retries, checks, reporting or skip logic
("raw+store", printed for information). Before timing, a short raw run warms
the server's threads and the OS cache and a short mapgap run its one-time
imports; then the best of R interleaved rounds counts for each loop.

    .venv/bin/python bench/fetch.py [N] [--rounds R] [--rgb-png]
Last line: fetch_vs_ceiling=<ours tiles/s / ceiling tiles/s>
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from mapgap import storage
from mapgap.conf.imagery import ImageryConfig
from mapgap.grid import Tile
from mapgap.tasks.decode import decode_tile, encode_png
from mapgap.tasks.imagery import fetch_batch

KAMPALA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kampala"
CONCURRENCY = 16


def tile_folder(root: Path, n: int, rgb_png: bool = False) -> list[Tile]:
    """N tiles at z/x/y paths, each one of the real Kampala files (or, with
    ``rgb_png``, its pixels as an RGB PNG without alpha, also kept byte for byte)."""
    files = sorted(KAMPALA.glob("OAM-*.png"))
    if not files:
        sys.exit(f"no tiles in {KAMPALA} (see ../shared/data/README.md)")
    if rgb_png:
        converted = root / "rgb"
        converted.mkdir(parents=True)
        for f in files:
            data = encode_png(decode_tile(f.read_bytes()).rgb)
            (converted / f.name).write_bytes(data)
        files = sorted(converted.glob("OAM-*.png"))
    tiles = []
    for i in range(n):
        t = Tile(1000 + i % 32, 2000 + i // 32, 21)
        path = root / str(t.z) / str(t.x) / f"{t.y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(files[i % len(files)])
        tiles.append(t)
    return tiles


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mapgap.tileserver", str(folder), "{z}/{x}/{y}.png"],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline().strip() if proc.stdout else ""
    if not re.match(r"^http://127\.0\.0\.1:\d+/", line):
        proc.kill()
        sys.exit(f"tile server did not start (said {line!r})")
    return proc, line


def urls(template: str, tiles: list[Tile]) -> list[str]:
    return [template.format(z=t.z, x=t.x, y=t.y) for t in tiles]


def raw_threads(links: list[str]) -> float:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        t0 = time.perf_counter()
        sizes = list(pool.map(lambda u: len(client.get(u).content), links))
        elapsed = time.perf_counter() - t0
    assert all(sizes)
    return elapsed


def raw_with_store(links: list[str], work: Path) -> float:
    run = Path(tempfile.mkdtemp(dir=work))
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    def one(i_url: tuple[int, str]) -> None:
        data = client.get(i_url[1]).content
        decode_tile(data)
        storage.write_bytes(str(run / f"{i_url[0]}.png"), data)

    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        t0 = time.perf_counter()
        list(pool.map(one, enumerate(links)))
        elapsed = time.perf_counter() - t0
    shutil.rmtree(run)
    return elapsed


def raw_async(links: list[str]) -> float:
    async def run() -> float:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(limits=limits) as client:

            async def get(u: str) -> int:
                async with sem:
                    return len((await client.get(u)).content)

            t0 = time.perf_counter()
            sizes = await asyncio.gather(*(get(u) for u in links))
            elapsed = time.perf_counter() - t0
        assert all(sizes)
        return elapsed

    return asyncio.run(run())


def ours(template: str, tiles: list[Tile], work: Path) -> float:
    run = Path(tempfile.mkdtemp(dir=work))
    cfg = ImageryConfig(source=template, concurrency=CONCURRENCY)
    t0 = time.perf_counter()
    report = fetch_batch(str(run), cfg, 256, tiles)
    elapsed = time.perf_counter() - t0
    assert report["counts"]["fetched"] == len(tiles), report["counts"]
    shutil.rmtree(run)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rgb-png", action="store_true",
                        help="serve the tiles as RGB PNGs without alpha (also stored as they are)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mapgap-bench-fetch-") as tmp:
        work = Path(tmp)
        tiles = tile_folder(work / "src", args.n, args.rgb_png)
        proc, template = start_server(work / "src")
        try:
            links = urls(template, tiles)
            raw_threads(links[:50])  # warm the OS cache and the server's threads
            ours(template, tiles[:50], work)  # and mapgap's one-time imports
            runs = {"raw threads": lambda: raw_threads(links),
                    "raw asyncio": lambda: raw_async(links),
                    "raw+store": lambda: raw_with_store(links, work),
                    "mapgap": lambda: ours(template, tiles, work)}
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.rounds):  # interleaved, so load changes hit all alike
                for name, run in runs.items():
                    best[name] = min(best[name], run())
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    for name, secs in best.items():
        print(f"{name:12s} {args.n / secs:8.1f} tiles/s  ({secs:.2f} s for {args.n} tiles)")
    ceiling = min(best["raw threads"], best["raw asyncio"])
    print(f"fetch_vs_raw_plus_store={best['raw+store'] / best['mapgap']:.3f}")
    print(f"fetch_vs_ceiling={ceiling / best['mapgap']:.3f}")


if __name__ == "__main__":
    main()
