"""Where fetched tiles land and how each tile's fate is reported.

Every imagery source (XYZ server, local tile folder, GeoTIFF) ends in
:meth:`TileStore.save`: one blank check, one PNG format, one atomic write per
tile under ``RunLayout.image``. A :class:`FetchReport` per batch records what
happened to every tile; batch reports merge into the run's fetch report.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mapgap import storage
from mapgap.grid import Tile, tile_key
from mapgap.layout import RunLayout
from mapgap.tasks.decode import (
    blank_fraction,
    encode_png,
    fit_mask,
    fit_to_size,
    sniff_format,
)

OUTCOMES = ("missing", "blank", "failures", "retried")
_SAMPLE_STEP, _SAMPLE_MARGIN = 4, 0.05


class ImageryError(RuntimeError):
    """A whole source is unusable (unreachable server, raster without CRS...): one
    line naming the source and the problem. Single bad tiles are reported instead."""


@dataclass
class FetchReport:
    """Counts and per-tile reasons for one batch; thread-safe to fill from workers.

    ``missing``: the source has no such tile (HTTP 404, no file). ``blank``: more
    nodata than allowed, not stored. ``failures``: gave up (undecodable bytes,
    timeouts, HTTP errors after retries). ``retried``: stored after transient errors.
    """

    fetched: int = 0
    skipped_existing: int = 0
    missing: list[dict[str, Any]] = field(default_factory=list)
    blank: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    retried: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, outcome: str, tile: Tile, reason: str, **extra: Any) -> None:
        """Record ``tile`` under one of :data:`OUTCOMES`."""
        with self._lock:
            getattr(self, outcome).append({"tile": tile_key(tile), "reason": reason, **extra})

    def count_fetched(self) -> None:
        with self._lock:
            self.fetched += 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "counts": {
                "fetched": self.fetched,
                "skipped_existing": self.skipped_existing,
                "missing": len(self.missing),
                "blank": len(self.blank),
                "failed": len(self.failures),
                "retried": len(self.retried),
            }
        }
        for name in OUTCOMES:
            out[name] = sorted(getattr(self, name), key=lambda e: e["tile"])
        out["counts"]["tiles"] = sum(out["counts"][k] for k in _TERMINAL)
        return out


# Every tile ends in exactly one of these (retried tiles are also counted as fetched).
_TERMINAL = ("fetched", "skipped_existing", "missing", "blank", "failed")


def merge_reports(parts: Iterable[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One report from many batch reports (order-independent), plus ``extra`` keys."""
    merged = FetchReport()
    for part in parts:
        merged.fetched += part["counts"]["fetched"]
        merged.skipped_existing += part["counts"]["skipped_existing"]
        for name in OUTCOMES:
            getattr(merged, name).extend(part[name])
    return {**extra, **merged.to_dict()}


def keep_as_is(original: bytes, rgb: np.ndarray, valid: np.ndarray | None, size: int) -> bool:
    """Source bytes are stored untouched when they already decode to an opaque
    ``size`` px tile: re-encoding costs ~8x the download and gains nothing (a
    JPEG stays lossy). Readers decode by content (a JPEG behind ``.png`` is fine)
    and take RGB (an all-opaque alpha band is dropped)."""
    return valid is None and rgb.shape[:2] == (size, size) and sniff_format(original) is not None


@dataclass(frozen=True)
class TileStore:
    """The run's tile folder: knows what exists and stores tiles in the one format."""

    run_uri: str
    tile_size: int
    max_blank_fraction: float
    blank_colors: Sequence[tuple[int, int, int]] = ()

    def uri(self, tile: Tile) -> str:
        return RunLayout(self.run_uri).image(tile)

    def existing(self, tiles: Iterable[Tile]) -> set[Tile]:
        """Tiles already stored: one listing per tile column instead of one
        request per tile (cheap on S3 too)."""
        by_column: dict[str, list[Tile]] = {}
        for t in tiles:
            by_column.setdefault(os.path.dirname(self.uri(t)), []).append(t)
        found: set[Tile] = set()
        for column, col_tiles in by_column.items():
            names = {os.path.basename(p) for p in storage.glob(storage.join(column, "*.png"))}
            found.update(t for t in col_tiles if os.path.basename(self.uri(t)) in names)
        return found

    def too_blank(self, rgb: np.ndarray, valid: np.ndarray | None) -> float | None:
        """The exact blank fraction if above the limit, else None. Clear cases are
        decided on every 4th row and column: a 16x smaller count on the hot path."""
        step = _SAMPLE_STEP
        sample = blank_fraction(rgb[::step, ::step],
                                None if valid is None else valid[::step, ::step], self.blank_colors)
        if sample <= self.max_blank_fraction - _SAMPLE_MARGIN:
            return None
        fraction = blank_fraction(rgb, valid, self.blank_colors)
        return fraction if fraction > self.max_blank_fraction else None

    def save(
        self,
        tile: Tile,
        rgb: np.ndarray,
        valid: np.ndarray | None,
        report: FetchReport,
        original: bytes | None = None,
    ) -> bool:
        """Store one decoded tile unless it is blank; ``original`` bytes are kept
        as they are when they already are the stored format. True if stored."""
        height, width = rgb.shape[:2]
        if height != width:
            report.add("failures", tile, f"not a square tile ({width}x{height} px)")
            return False
        fraction = self.too_blank(rgb, valid)
        if fraction is not None:
            report.add("blank", tile, f"{fraction:.1%} blank > {self.max_blank_fraction:.1%}",
                       fraction=round(fraction, 4))
            return False
        if original is not None and keep_as_is(original, rgb, valid, self.tile_size):
            data = original
        else:
            rgb = fit_to_size(rgb, self.tile_size)
            mask = fit_mask(valid, self.tile_size)
            if mask is not None:  # nodata is black in the stored tile, whatever the source had
                rgb = np.where(mask[..., None], rgb, 0).astype(np.uint8)
            data = encode_png(rgb)
        storage.write_bytes(self.uri(tile), data)
        report.count_fetched()
        return True
