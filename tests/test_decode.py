"""Tiles are decoded by their bytes, not their names: real JPEG-named-.png
Kampala tiles, real WebP/JPEG RoboSat tiles, and broken bytes."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from mapgap.tasks.decode import (
    FILL_COLOURS,
    Decoded,
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


def _layouts() -> dict[str, bytes]:
    """One real Kampala tile in every pixel layout decode_tile returns, with
    transparent, black and white pixels in it."""
    rgba = next(np.asarray(Image.open(f).convert("RGBA"))
                for f in sorted(shared_path("kampala").glob("OAM-*.png"))
                if sniff_format(f.read_bytes()) == "png").copy()
    rgba[:40] = 0  # transparent, black underneath (as in the source tiles)
    rgba[40:70] = (0, 0, 0, 255)  # opaque black fill
    rgba[70:90] = (255, 255, 255, 255)  # opaque white fill
    rgba[90:95, :100] = (0, 0, 1, 255)  # near-black imagery is still imagery
    gray = np.asarray(Image.fromarray(rgba).convert("LA"))
    return {"bgra": _png(rgba, "RGBA"), "bgr": _png(np.ascontiguousarray(rgba[..., :3]), "RGB"),
            "gray": _png(np.ascontiguousarray(gray[..., 0]), "L"), "gray+alpha": _png(gray, "LA")}


@pytest.mark.parametrize("layout", ["bgra", "bgr", "gray", "gray+alpha"])
def test_blank_fraction_on_decoded_pixels_matches_rgb_and_mask(layout: str) -> None:
    decoded = decode_tile(_layouts()[layout])
    assert decoded.pixels.ndim == (2 if layout == "gray" else 3)
    for colours in [(), FILL_COLOURS, [(255, 255, 255)], [(1, 0, 0)]]:
        for step in (1, 4):
            valid = None if decoded.valid is None else decoded.valid[::step, ::step]
            expected = blank_fraction(decoded.rgb[::step, ::step], valid, colours)
            assert decoded.blank_fraction(colours, step) == pytest.approx(expected, abs=1e-12)
    assert decoded.blank_fraction(FILL_COLOURS) >= 90 / 256
    flipped = Decoded(decoded.pixels[::-1], decoded.format)  # not one block: another path
    assert flipped.blank_fraction(FILL_COLOURS) == decoded.blank_fraction(FILL_COLOURS)


def test_nodata_is_black_only_when_every_transparent_pixel_is() -> None:
    layouts = _layouts()
    for name in ("bgra", "gray+alpha", "bgr", "gray"):
        assert decode_tile(layouts[name]).nodata_is_black(), name
    rgba = np.asarray(Image.open(io.BytesIO(layouts["bgra"]))).copy()
    rgba[5, 7, :3] = (0, 0, 1)  # one transparent pixel that is not black underneath
    decoded = decode_tile(_png(rgba, "RGBA"))
    assert not decoded.nodata_is_black()
    assert not Decoded(decoded.pixels[::-1], "png").nodata_is_black()
    rgba[5, 7, 3] = 255  # now opaque: near-black imagery
    assert decode_tile(_png(rgba, "RGBA")).nodata_is_black()
    la = np.asarray(Image.open(io.BytesIO(layouts["gray+alpha"]))).copy()
    la[0, 0, 0] = 9
    assert not decode_tile(_png(la, "LA")).nodata_is_black()


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


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_size_is_checked_from_the_header_before_decoding(ext: str) -> None:
    from mapgap.tasks.decode import OversizedTile

    data = cv2.imencode(ext, np.full((300, 200, 3), 120, np.uint8))[1].tobytes()
    with pytest.raises(OversizedTile, match=r"of 200x300 px, more than 59,999 px"):
        decode_tile(data, max_pixels=59_999)
    assert decode_tile(data, max_pixels=60_000).shape == (300, 200)
    with pytest.raises(UndecodableTile, match="truncated"):  # a cut header: the decoder says
        decode_tile(data[:20], max_pixels=60_000)
