"""Where fetched tiles land and how each tile's fate is reported.

Every imagery source (XYZ server, local tile folder, GeoTIFF) ends in
:meth:`TileStore.save` (rendered pixels) or :meth:`TileStore.save_source`
(fetched bytes): one blank check and one atomic write per tile under
``RunLayout.image``, as the source's own bytes when readers get the right pixels
from them (:func:`keep_as_is`), else as an RGB PNG with nodata in black. A
:class:`FetchReport` per batch records what happened to every tile; batch
reports merge into the run's fetch report.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mapgap import storage
from mapgap.grid import Tile, tile_key
from mapgap.layout import RunLayout
from mapgap.tasks.decode import Decoded, blank_fraction, encode_png, fit_mask, fit_to_size

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


def keep_as_is(decoded: Decoded, size: int) -> bool:
    """Source bytes are stored untouched when they decode to a ``size`` px tile
    with nodata already black (or none): re-encoding costs more than the
    download and gains nothing (a JPEG stays lossy). Readers decode by content
    (a JPEG behind ``.png`` is fine) and take RGB, dropping alpha, so they get
    the same pixels as from a re-encoded RGB PNG."""
    return decoded.shape == (size, size) and decoded.nodata_is_black()


@dataclass(frozen=True)
class TileStore:
    """The run's tile folder: knows what exists and stores tiles."""

    run_uri: str
    tile_size: int
    max_blank_fraction: float
    blank_colors: Sequence[tuple[int, int, int]] = ()
    overwrite: bool = False  # fetch stored tiles again (``--refresh fetch``)

    def uri(self, tile: Tile) -> str:
        return RunLayout(self.run_uri).image(tile)

    def existing(self, tiles: Iterable[Tile]) -> set[Tile]:
        """Tiles already stored (none when overwriting): one listing per tile
        column instead of one request per tile (cheap on S3 too)."""
        if self.overwrite:
            return set()
        by_column: dict[str, list[Tile]] = {}
        for t in tiles:
            by_column.setdefault(os.path.dirname(self.uri(t)), []).append(t)
        found: set[Tile] = set()
        for column, col_tiles in by_column.items():
            names = {os.path.basename(p) for p in storage.glob(storage.join(column, "*.png"))}
            found.update(t for t in col_tiles if os.path.basename(self.uri(t)) in names)
        return found

    def too_blank(self, fraction: Callable[[int], float]) -> float | None:
        """The exact blank fraction if above the limit, else None; ``fraction(step)``
        counts on every ``step``-th row and column. Clear cases are decided on
        every 4th: a 16x smaller count on the hot path."""
        sample = fraction(_SAMPLE_STEP)
        if sample <= self.max_blank_fraction - _SAMPLE_MARGIN:
            return None
        exact = fraction(1)
        return exact if exact > self.max_blank_fraction else None

    def save(
        self, tile: Tile, rgb: np.ndarray, valid: np.ndarray | None, report: FetchReport
    ) -> bool:
        """Store one rendered tile (RGB + validity mask) unless it is blank. True if stored."""
        def fraction(step: int) -> float:
            return blank_fraction(rgb[::step, ::step],
                                  None if valid is None else valid[::step, ::step],
                                  self.blank_colors)

        if not self._usable(tile, rgb.shape[:2], fraction, report):
            return False
        return self._write(tile, self._encode(rgb, valid), report)

    def save_source(self, tile: Tile, data: bytes, decoded: Decoded, report: FetchReport) -> bool:
        """Store one fetched tile (its bytes, already decoded) unless it is blank:
        the bytes themselves when :func:`keep_as_is`, else a PNG. True if stored."""
        def fraction(step: int) -> float:
            return decoded.blank_fraction(self.blank_colors, step)

        if not self._usable(tile, decoded.shape, fraction, report):
            return False
        if not keep_as_is(decoded, self.tile_size):
            data = self._encode(decoded.rgb, decoded.valid)
        return self._write(tile, data, report)

    def _usable(self, tile: Tile, shape: tuple[int, ...], fraction: Callable[[int], float],
                report: FetchReport) -> bool:
        height, width = shape[:2]
        if height != width:
            report.add("failures", tile, f"not a square tile ({width}x{height} px)")
            return False
        blank = self.too_blank(fraction)
        if blank is not None:
            report.add("blank", tile, f"{blank:.1%} blank > {self.max_blank_fraction:.1%}",
                       fraction=round(blank, 4))
            return False
        return True

    def _encode(self, rgb: np.ndarray, valid: np.ndarray | None) -> bytes:
        rgb = fit_to_size(rgb, self.tile_size)
        mask = fit_mask(valid, self.tile_size)
        if mask is not None:  # nodata is black in the stored tile, whatever the source had
            rgb = np.where(mask[..., None], rgb, 0).astype(np.uint8)
        return encode_png(rgb)

    def _write(self, tile: Tile, data: bytes, report: FetchReport) -> bool:
        storage.write_bytes(self.uri(tile), data)
        report.count_fetched()
        return True
