"""Tile bytes -> pixels and back, trusting the bytes rather than the file name.

Real tile sets lie about their formats (Kampala's OpenAerialMap ``.png`` files
are partly JPEG), so formats are sniffed from magic bytes. Everything is done
with OpenCV, which releases the GIL, so decoding in fetch threads overlaps.
A :class:`Decoded` tile keeps OpenCV's own pixel layout (BGR/BGRA) and derives
RGB and the validity mask only when asked: the blank check and the decision to
store the source bytes as they are need neither.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# A garbage tile otherwise prints a libpng/libjpeg warning per tile; we report it instead.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
# Pillow only reads headers here (check_size) and warns about sizes far above the
# limit decode_tile enforces itself; such tiles are refused and reported instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

Format = Literal["jpeg", "png", "webp"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_RGB8 = (8, 2)  # IHDR bit depth, colour type "truecolour"
_PNG_UP = 2  # PNG row filter: each byte minus the byte above it
# Default nodata fill colours of tile servers (opaque black or white outside coverage).
FILL_COLOURS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 255, 255))
_OPAQUE, _RGB_BITS = np.uint32(1 << 24), np.uint32(0xFFFFFF)  # in packed BGRA pixels


class UndecodableTile(ValueError):
    """The bytes are not a complete JPEG, PNG or WebP image."""


class OversizedTile(UndecodableTile):
    """The header announces far more pixels than a tile has: refused undecoded."""


@dataclass(frozen=True, eq=False)
class Decoded:
    """A decoded tile: ``pixels`` as OpenCV returns them, 8-bit, (H, W) gray,
    (H, W, 2) gray + alpha, (H, W, 3) BGR or (H, W, 4) BGRA. :attr:`rgb` and
    :attr:`valid` are derived on first use: a tile stored as its own bytes
    needs neither."""

    pixels: np.ndarray
    format: Format

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.pixels.shape[0], self.pixels.shape[1]

    @property
    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB (alpha dropped: see :attr:`valid`)."""
        return self._memo("rgb", self._to_rgb)

    @property
    def valid(self) -> np.ndarray | None:
        """(H, W) bool, False where transparent; None when every pixel is opaque."""
        return self._memo("valid", self._to_valid)

    def _memo(self, name: str, compute: Callable[[], Any]) -> Any:
        # Not functools.cached_property: on Python 3.11 it takes one lock shared
        # by all instances, which would serialize the fetch threads.
        cache = self.__dict__.setdefault("_cache", {})
        if name not in cache:
            cache[name] = compute()
        return cache[name]

    def _to_rgb(self) -> np.ndarray:
        px = self.pixels
        if px.ndim == 2:
            return cv2.cvtColor(px, cv2.COLOR_GRAY2RGB)
        if px.shape[2] == 2:
            return cv2.cvtColor(np.ascontiguousarray(px[:, :, 0]), cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(px, cv2.COLOR_BGRA2RGB if px.shape[2] == 4 else cv2.COLOR_BGR2RGB)

    def _to_valid(self) -> np.ndarray | None:
        alpha = self._alpha
        if alpha is None or alpha.min() > 0:
            return None
        return alpha > 0

    @property
    def _alpha(self) -> np.ndarray | None:
        px = self.pixels
        return px[:, :, -1] if px.ndim == 3 and px.shape[2] in (2, 4) else None

    @property
    def _bgra32(self) -> np.ndarray | None:
        """BGRA pixels as one (H, W) uint32 each, B + G<<8 + R<<16 + A<<24 (a
        view, no copy): the checks below become single numpy passes."""
        px = self.pixels
        if px.ndim != 3 or px.shape[2] != 4 or not px.flags.c_contiguous:
            return None
        return px.view("<u4")[:, :, 0]

    def blank_fraction(
        self, fill_colours: Sequence[tuple[int, int, int]] = (), step: int = 1
    ) -> float:
        """:func:`blank_fraction` of :attr:`rgb` and :attr:`valid` (on every
        ``step``-th row and column), computed on the decoded pixels as they are."""
        packed = self._bgra32
        if packed is not None:
            v = packed[::step, ::step]
            blank = v < _OPAQUE  # alpha 0
            if fill_colours:
                colour = v & _RGB_BITS
                for r, g, b in fill_colours:
                    blank |= colour == (b | g << 8 | r << 16)
            return np.count_nonzero(blank) / blank.size
        px = self.pixels
        if px.ndim == 3 and px.shape[2] == 3:  # BGR: the same count, colours in BGR order
            return blank_fraction(px[::step, ::step], None, [c[::-1] for c in fill_colours])
        valid = self.valid  # gray (+ alpha), or BGRA not in one block: rare, via RGB
        return blank_fraction(self.rgb[::step, ::step],
                              None if valid is None else valid[::step, ::step], fill_colours)

    def nodata_is_black(self) -> bool:
        """True when no pixel is transparent, or every transparent one is black
        underneath: then a reader that drops alpha gets the pixels mapgap stores
        for it (nodata in black) from these very bytes."""
        packed = self._bgra32
        if packed is not None:  # transparent and not black: 0 < value < 2**24
            return not np.any(packed - np.uint32(1) < _RGB_BITS)
        alpha = self._alpha
        return alpha is None or not np.any(self.pixels[:, :, :-1][alpha == 0])


def sniff_format(data: bytes) -> Format | None:
    """The image format from magic bytes, whatever the name or Content-Type says."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_size(data: bytes, max_pixels: int) -> None:
    """Raise :class:`OversizedTile` when the image header (PNG IHDR, JPEG SOF,
    WebP VP8/VP8L/VP8X chunk; Pillow's lazy open decodes no pixel) announces
    more than ``max_pixels``. Unreadable headers are left to the decoder."""
    if len(data) >= 24 and data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        kind = "PNG"
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                kind = img.format or "image"
        except Image.DecompressionBombError:  # beyond Pillow's own limit: certainly too large
            raise OversizedTile(f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} px, refused"
                                " without decoding it") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return
    if width * height > max_pixels:
        raise OversizedTile(f"{kind} of {width}x{height} px, more than {max_pixels:,} px:"
                            " refused without decoding it")


def decode_tile(data: bytes, max_pixels: int | None = None) -> Decoded:
    """Decode JPEG/PNG/WebP bytes (16-bit samples become 8-bit).

    ``max_pixels``: refuse (:class:`OversizedTile`) an image whose header says
    it is larger, before decoding: a 12000 x 12000 px PNG is ~400 KB on the wire
    but 430 MB decoded, in each of the fetch threads."""
    fmt = sniff_format(data)
    if fmt is None:
        # Never quote the bytes: they end up in fetch reports, and a tile folder
        # may hold anything (a text file, a symlinked secret).
        raise UndecodableTile(f"not a JPEG, PNG or WebP image ({len(data)} bytes)")
    if max_pixels is not None:
        check_size(data, max_pixels)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise UndecodableTile(f"corrupt or truncated {fmt.upper()} ({len(data)} bytes)")
    if img.dtype == np.uint16:  # 16-bit PNG
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise UndecodableTile(f"unsupported {fmt.upper()} sample type {img.dtype}")
    if img.ndim == 3 and img.shape[2] not in (2, 3, 4):
        raise UndecodableTile(f"unsupported {fmt.upper()} with {img.shape[2]} channels")
    return Decoded(img, fmt)


def blank_fraction(
    rgb: np.ndarray,
    valid: np.ndarray | None = None,
    fill_colours: tuple[tuple[int, int, int], ...] | list = (),
) -> float:
    """Fraction of pixels that carry no imagery: invalid (transparent / nodata) or
    exactly one of ``fill_colours``."""
    blank = np.zeros(rgb.shape[:2], np.uint8) if valid is None else (~valid).view(np.uint8)
    for colour in fill_colours:
        blank = blank | cv2.inRange(rgb, colour, colour)
    return cv2.countNonZero(blank) / blank.size


def fit_to_size(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resample a square tile to ``size`` px (area averaging when shrinking)."""
    if rgb.shape[0] == rgb.shape[1] == size:
        return rgb
    shrink = rgb.shape[0] > size
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def fit_mask(valid: np.ndarray | None, size: int) -> np.ndarray | None:
    if valid is None or valid.shape == (size, size):
        return valid
    return cv2.resize(valid.view(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB uint8 array -> PNG bytes (the stored tile format).

    Encoding is the costliest step of a fetch, so this is a minimal PNG writer:
    one "Up" row filter in numpy and one zlib level-1 call (which releases the
    GIL). That is ~1.5x faster than libpng via OpenCV at level 1 for files within
    a few % of its size; level 6 would be ~3x slower for ~5% smaller files.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = _PNG_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, *_PNG_RGB8, 0, 0, 0)
    return b"".join((PNG_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1)), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
