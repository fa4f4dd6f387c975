"""Tiles are decoded by their bytes, not their names: real JPEG-named-.png
Kampala tiles, real WebP/JPEG RoboSat tiles, and broken bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mapgap.tasks.decode import (
    UndecodableTile,
    blank_fraction,
    decode_tile,
    encode_png,
    fit_to_size,
    sniff_format,
)
from tests.conftest import shared_path


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def test_kampala_png_names_hide_jpeg_bytes_and_both_decode_like_pillow() -> None:
    files = sorted(shared_path("kampala").glob("OAM-*.png"))
    formats = {f.name: sniff_format(f.read_bytes()) for f in files}
    assert set(formats.values()) == {"png", "jpeg"}
    assert sum(v == "jpeg" for v in formats.values()) == 24
    jpeg = next(f for f in files if formats[f.name] == "jpeg")
    png = next(f for f in files if formats[f.name] == "png")
    for path in (jpeg, png):
        decoded = decode_tile(path.read_bytes())
        assert decoded.rgb.shape == (256, 256, 3) and decoded.rgb.dtype == np.uint8
        expected = np.asarray(Image.open(path).convert("RGB")).astype(int)
        # PNG is lossless; JPEG decoders may differ by a rounding step.
        assert np.abs(decoded.rgb.astype(int) - expected).max() <= (0 if path is png else 8)


def test_transparent_pixels_are_invalid_and_count_as_blank() -> None:
    opaque = (np.asarray(Image.open(f).convert("RGBA"))
              for f in sorted(shared_path("kampala").glob("OAM-*.png")))
    rgba = next(a for a in opaque if a[..., 3].min() == 255).copy()
    assert decode_tile(_png(rgba, "RGBA")).valid is None
    rgba[:64, :, 3] = 0  # a quarter of the tile without imagery
    decoded = decode_tile(_png(rgba, "RGBA"))
    assert decoded.valid is not None
    assert decoded.valid.sum() == 192 * 256
    assert blank_fraction(decoded.rgb, decoded.valid) == pytest.approx(0.25)


def test_fill_colours_count_as_blank_only_when_asked() -> None:
    rgb = np.full((100, 100, 3), 120, np.uint8)
    rgb[:30] = 0
    rgb[30:40] = 255
    rgb[40:45] = (0, 0, 1)  # near-black imagery is still imagery
    assert blank_fraction(rgb) == 0
    assert blank_fraction(rgb, None, [(0, 0, 0)]) == pytest.approx(0.30)
    assert blank_fraction(rgb, None, [(0, 0, 0), (255, 255, 255)]) == pytest.approx(0.40)


@pytest.mark.parametrize("name", ["images/18/69105/105093.jpg",
                                  "parking/images/18/69623/104946.webp"])
def test_robosat_jpeg_and_webp_decode_at_512(name: str) -> None:
    data = (shared_path("robosat") / name).read_bytes()
    decoded = decode_tile(data)
    assert decoded.format == ("webp" if name.endswith("webp") else "jpeg")
    assert decoded.rgb.shape == (512, 512, 3) and decoded.valid is None
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 1.0
    assert fit_to_size(decoded.rgb, 256).shape == (256, 256, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b"",
        b"\xff\xd8\xff\xe0" + b"\x00" * 100,  # JPEG header, no image
    ],
)
def test_garbage_is_undecodable_with_a_reason(data: bytes) -> None:
    with pytest.raises(UndecodableTile) as err:
        decode_tile(data)
    assert "\n" not in str(err.value) and str(len(data)) in str(err.value)


def test_truncated_real_tiles_are_undecodable() -> None:
    for path in (next(shared_path("kampala").glob("OAM-*.png")),
                 shared_path("robosat") / "parking/images/18/69623/104946.webp",
                 shared_path("robosat") / "images/18/69105/105093.jpg"):
        data = path.read_bytes()
        with pytest.raises(UndecodableTile, match="corrupt or truncated"):
            decode_tile(data[: len(data) // 2])


def test_gray_and_16_bit_png_become_8_bit_rgb() -> None:
    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    decoded = decode_tile(_png(gray16))
    assert decoded.rgb.shape == (64, 64, 3) and decoded.rgb.dtype == np.uint8
    assert (decoded.rgb[..., 0] == decoded.rgb[..., 2]).all()
    assert (decoded.rgb[..., 0] == (gray16 >> 8)).all()


def test_encode_png_is_lossless_rgb8() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert sniff_format(data) == "png" and (data[24], data[25]) == (8, 2)  # 8-bit truecolour
    assert (decode_tile(data).rgb == rgb).all()
