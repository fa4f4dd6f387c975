"""A tile plus a margin of context from its 8 neighbours, read through a small
LRU of decoded tiles.

Why: a model (or a morphology filter) that only sees one tile leaves seams at
tile borders. With context from the neighbours the centre of every window
sees the same pixels it would see in one big mosaic. Where a neighbour has no
data the tile itself is mirrored across the border (never black, which would
look like a real dark edge). Tiles are visited in row-major order so each
decoded tile is reused by its neighbours before it falls out of the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from mapgap.grid import Tile, neighbours

Loader = Callable[[Tile], "np.ndarray | None"]


class TileCache:
    """Decoded tiles (or ``None`` for a missing one) by tile, least recently used evicted."""

    def __init__(self, load: Loader, capacity: int) -> None:
        self._load = load
        self._capacity = max(1, capacity)
        self._items: OrderedDict[Tile, np.ndarray | None] = OrderedDict()
        self.loads = 0

    def get(self, tile: Tile) -> np.ndarray | None:
        if tile in self._items:
            self._items.move_to_end(tile)
            return self._items[tile]
        value = self._load(tile)
        self.loads += 1
        self._items[tile] = value
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return value


def row_major(tiles: list[Tile]) -> list[Tile]:
    return sorted(tiles, key=lambda t: (t.z, t.y, t.x))


def cache_capacity(tiles: list[Tile], limit: int) -> int:
    """Enough tiles for two rows of the batch plus a few: every neighbour read
    once is still cached when the next row needs it (bounded by ``limit``)."""
    if not tiles:
        return 9
    width = max(t.x for t in tiles) - min(t.x for t in tiles) + 1
    return max(9, min(limit, 2 * width + 6))


def with_margin(tile: Tile, cache: TileCache, margin: int) -> np.ndarray:
    """The tile [H, W, ...] grown by ``margin`` px on each side from its neighbours."""
    centre = cache.get(tile)
    if centre is None:
        raise KeyError(f"no data for tile {tile}")
    if margin == 0:
        return centre
    h, w = centre.shape[:2]
    if margin >= min(h, w):
        raise ValueError(f"margin {margin} px must be smaller than the tile ({w}x{h} px)")
    pad = [(margin, margin), (margin, margin)] + [(0, 0)] * (centre.ndim - 2)
    out = np.pad(centre, pad, mode="reflect")
    rows = _strips(margin, h)
    cols = _strips(margin, w)
    for n in neighbours(tile):
        img = cache.get(n)
        if img is None:
            continue
        dx, dy = _offset(tile, n)
        (out_r, src_r), (out_c, src_c) = rows[dy], cols[dx]
        out[out_r, out_c] = img[src_r, src_c]
    return out


def _strips(margin: int, n: int) -> dict[int, tuple[slice, slice]]:
    """Per neighbour offset: (slice of the output window, slice of the neighbour)."""
    return {-1: (slice(0, margin), slice(n - margin, n)),
            0: (slice(margin, margin + n), slice(0, n)),
            1: (slice(margin + n, None), slice(0, margin))}


def _offset(tile: Tile, n: Tile) -> tuple[int, int]:
    """(dx, dy) of a neighbour, with x wrapping around the antimeridian."""
    dx = n.x - tile.x
    if abs(dx) > 1:
        dx = -1 if dx > 0 else 1
    return dx, n.y - tile.y
