"""XYZ/TMS fetching against a real tile server on 127.0.0.1 serving the real
Kampala (flat ``OAM-{x}-{y}-{z}.png``, partly JPEG bytes) and RoboSat (512 px
JPEG + WebP) tiles, with injected faults."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
from pathlib import Path

import mercantile
import numpy as np
import pytest
import yaml
from PIL import Image

from mapgap import storage
from mapgap.conf import ConfigError, load_config
from mapgap.conf.imagery import ImageryConfig
from mapgap.grid import Tile, children, tile_key, tiles_for_geometry
from mapgap.layout import RunLayout
from mapgap.tasks.decode import decode_tile, sniff_format
from mapgap.tasks.imagery import fetch_batch
from mapgap.tasks.tilestore import ImageryError, merge_reports
from mapgap.tasks.xyz import TileTemplate
from mapgap.tileserver import Fault, TileServer
from tests.conftest import shared_path

KAMPALA_PATTERN = "OAM-{x}-{y}-{z}.png"


def kampala_tiles(zoom: int | None = None) -> list[Tile]:
    tiles = []
    for f in shared_path("kampala").glob("OAM-*.png"):
        x, y, z = map(int, re.fullmatch(r"OAM-(\d+)-(\d+)-(\d+)\.png", f.name).groups())
        if zoom is None or z == zoom:
            tiles.append(Tile(x, y, z))
    return sorted(tiles)


def kampala_file(tile: Tile) -> Path:
    return shared_path("kampala") / f"OAM-{tile.x}-{tile.y}-{tile.z}.png"


def source_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def stored(run: Path, tile: Tile) -> bytes:
    return storage.read_bytes(RunLayout(str(run)).image(tile))


def imagery(source: str, **kw: object) -> ImageryConfig:
    defaults = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, "concurrency": 8}
    return ImageryConfig(source=source, **{**defaults, **kw})


def by_tile(entries: list[dict]) -> dict[str, dict]:
    return {e["tile"]: e for e in entries}


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- templates ---

def test_template_placeholders() -> None:
    tile = Tile(3, 5, 4)
    t = TileTemplate("https://{s}.t/{z}/{x}/{y}/{-y}/{q}.png", ("a", "b"))
    assert t.url(tile) == f"https://a.t/4/3/5/10/{mercantile.quadkey(tile)}.png"
    assert TileTemplate("https://{s}.t/{z}", ("a", "b")).url(Tile(4, 5, 4)) == "https://b.t/4"
    keyed = TileTemplate("https://t/{z}/{x}/{y}?key={key}", (), "s3cr3t")
    assert keyed.url(tile) == "https://t/4/3/5?key=s3cr3t"
    assert keyed.redact("GET /4/3/5?key=s3cr3t failed") == "GET /4/3/5?key=*** failed"


def test_template_without_z_is_a_one_line_config_error(tmp_path: Path) -> None:
    (tmp_path / "town.osm.pbf").write_bytes(b"")
    cfg = {"name": "t", "aoi": [32.59, 0.34, 32.60, 0.35], "zoom": 18,
           "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
           "labels": {"source": "town.osm.pbf"},
           "imagery": {"source": "http://127.0.0.1:1/tiles/{x}/{y}.png"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    msg = str(err.value)
    assert "\n" not in msg and "imagery.source" in msg and "{z}" in msg and "c.yaml" in msg
    cfg["imagery"]["source"] = "http://127.0.0.1:1/tiles/a{q}.jpeg"  # quadkeys encode the zoom
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert load_config(tmp_path / "c.yaml").imagery.kind == "xyz"


# --- a real server with faults ---

def test_kampala_over_http_with_faults_is_reported_per_tile(tmp_path: Path) -> None:
    tiles = kampala_tiles(21)[:40]
    jpeg_tiles = [t for t in tiles if sniff_format(kampala_file(t).read_bytes()) == "jpeg"]
    assert jpeg_tiles, "the sample should contain JPEG bytes named .png"
    gone, flaky, slow, junk, limited = tiles[:5]
    faults = {gone: Fault.not_found(), flaky: Fault.error(500, times=2), slow: Fault.slow(1.0),
              junk: Fault.garbage(), limited: Fault.rate_limited(times=1, retry_after=0.05)}
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN, faults=faults) as server:
        report = fetch_batch(str(tmp_path), imagery(server.url_template, timeout_s=0.3),
                             256, tiles)
        assert server.hits[flaky] == 3 and server.hits[gone] == 1  # 404s are not retried
        assert server.hits[slow] == 3  # timeouts are retried, then given up

    counts = report["counts"]
    assert counts == {"tiles": 40, "fetched": 37, "skipped_existing": 0, "missing": 1,
                      "blank": 0, "failed": 2, "retried": 2}
    assert by_tile(report["missing"]) == {tile_key(gone): {"tile": tile_key(gone),
                                                           "reason": "HTTP 404"}}
    failures = by_tile(report["failures"])
    assert failures[tile_key(slow)]["reason"] == "timeout (ReadTimeout) after 3 attempts"
    assert failures[tile_key(junk)]["reason"].startswith("undecodable: not a JPEG, PNG or WebP")
    retried = by_tile(report["retried"])
    assert retried[tile_key(flaky)] == {"tile": tile_key(flaky), "reason": "HTTP 500",
                                        "attempts": 3}
    assert retried[tile_key(limited)]["reason"] == "HTTP 429"

    for t in tiles:
        exists = storage.exists(RunLayout(str(tmp_path)).image(t))
        assert exists == (t not in (gone, slow, junk))
    # Every Kampala tile is usable as it is (JPEG, or RGBA PNG whose transparent
    # pixels are black underneath): stored byte for byte, never re-encoded.
    for t in tiles:
        if t not in (gone, slow, junk):
            assert stored(tmp_path, t) == kampala_file(t).read_bytes()


def test_rerun_fetches_only_what_is_missing(tmp_path: Path) -> None:
    tiles = kampala_tiles(20)
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN,
                    faults={tiles[0]: Fault.error(503, times=3)}) as server:
        cfg = imagery(server.url_template, retries=1)
        first = fetch_batch(str(tmp_path), cfg, 256, tiles)
        assert first["counts"]["failed"] == 1 and first["counts"]["fetched"] == len(tiles) - 1
        failure = by_tile(first["failures"])[tile_key(tiles[0])]
        assert failure["reason"] == "HTTP 503 after 2 attempts"
        before = server.hits.copy()
        second = fetch_batch(str(tmp_path), cfg, 256, tiles)
        assert second["counts"]["skipped_existing"] == len(tiles) - 1
        assert second["counts"]["fetched"] == 1  # the third try of the flaky tile succeeds
        assert {t for t in tiles if server.hits[t] != before[t]} == {tiles[0]}
    merged = merge_reports([second, first])
    assert merged["counts"]["tiles"] == 2 * len(tiles)
    assert [e["tile"] for e in merged["failures"]] == [tile_key(tiles[0])]


def test_robosat_jpeg_and_webp_through_tms_quadkey_and_subdomain_urls(tmp_path: Path) -> None:
    robosat = shared_path("robosat")
    jpg = [Tile(69105, 105093, 18), Tile(69108, 105091, 18), Tile(69108, 105092, 18)]
    webp = [Tile(69623, 104946, 18), Tile(70761, 104120, 18)]
    with TileServer(robosat / "images", "{z}/{x}/{y}.jpg",
                    url_pattern="tms/{s}/{z}/{x}/{-y}.jpg") as tms, \
            TileServer(robosat / "parking" / "images", "{z}/{x}/{y}.webp",
                       url_pattern="q/{q}.webp") as quad:
        assert "{-y}" in tms.url_template and "{q}" in quad.url_template
        r1 = fetch_batch(str(tmp_path), imagery(tms.url_template, subdomains=["a", "b"]), 512, jpg)
        r2 = fetch_batch(str(tmp_path), imagery(quad.url_template), 512, webp)
        served = {p.split("/")[2] for p, _ in tms.requests}
        assert served == {"a", "b"}
        assert {p for p, _ in quad.requests} == {f"/q/{mercantile.quadkey(t)}.webp" for t in webp}
    assert r1["counts"]["fetched"] == 3 and r2["counts"]["fetched"] == 2
    for t, path in [(jpg[0], robosat / "images/18/69105/105093.jpg"),
                    (webp[0], robosat / "parking/images/18/69623/104946.webp")]:
        rgb = decode_tile(stored(tmp_path, t)).rgb
        assert rgb.shape == (512, 512, 3)
        assert np.abs(rgb.astype(int) - source_rgb(path).astype(int)).mean() < 1.0


def test_512_px_sources_are_resampled_to_the_tile_size(tmp_path: Path) -> None:
    folder = shared_path("robosat") / "images"
    tile = Tile(69105, 105093, 18)
    report = fetch_batch(str(tmp_path), imagery(f"{folder}/{{z}}/{{x}}/{{y}}.jpg"), 256, [tile])
    assert report["counts"]["fetched"] == 1
    rgb = decode_tile(stored(tmp_path, tile)).rgb
    expected = np.asarray(Image.open(folder / "18/69105/105093.jpg").convert("RGB").resize(
        (256, 256), Image.BOX)).astype(int)
    assert rgb.shape == (256, 256, 3)
    assert np.abs(rgb.astype(int) - expected).mean() < 2.0


def test_overzoom_builds_512_px_tiles_from_four_children(tmp_path: Path) -> None:
    parents = kampala_tiles(19)[:3]
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN) as server:
        report = fetch_batch(str(tmp_path), imagery(server.url_template, overzoom=True),
                             512, parents)
        assert all(server.hits[c] == 1 for p in parents for c in children(p, 20))
        assert not any(server.hits[p] for p in parents)
    assert report["counts"]["fetched"] == 3
    for p in parents:
        rgb = decode_tile(stored(tmp_path, p)).rgb
        quads = [decode_tile(kampala_file(c).read_bytes()) for c in children(p, 20)]
        for q, (r, c) in zip(quads, [(0, 0), (0, 1), (1, 0), (1, 1)], strict=True):
            part = rgb[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256]
            expected = q.rgb if q.valid is None else np.where(q.valid[..., None], q.rgb, 0)
            assert np.array_equal(part, expected)


def test_overzoom_with_a_failing_child_fails_the_tile(tmp_path: Path) -> None:
    parent = kampala_tiles(19)[0]
    bad = children(parent, 20)[2]
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN, faults={bad: Fault.garbage()}) as s:
        report = fetch_batch(str(tmp_path), imagery(s.url_template, overzoom=True), 512, [parent])
    [failure] = report["failures"]
    assert failure["tile"] == tile_key(parent)
    assert failure["reason"].startswith(f"child {tile_key(bad)}: undecodable")


def test_blank_tiles_are_skipped_and_reported(tmp_path: Path) -> None:
    tiles = kampala_tiles(21)[:3]
    for t in tiles:
        rgb = source_rgb(kampala_file(t)).copy()
        if t != tiles[0]:
            rgb[: 250 if t == tiles[1] else 200] = 0  # 98% vs 78% black fill
        path = tmp_path / "src" / str(t.z) / str(t.x) / f"{t.y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
    source = f"file://{tmp_path}/src/{{z}}/{{x}}/{{y}}.png"
    report = fetch_batch(str(tmp_path / "run"), imagery(source), 256, tiles)
    assert report["counts"]["fetched"] == 2 and report["counts"]["blank"] == 1
    [blank] = report["blank"]
    assert blank["tile"] == tile_key(tiles[1]) and blank["fraction"] > 0.95
    # An 8-bit RGB PNG of the right size is stored byte for byte.
    assert stored(tmp_path / "run", tiles[0]) == (tmp_path / "src" / "21" / str(tiles[0].x)
                                                  / f"{tiles[0].y}.png").read_bytes()


def test_transparent_tiles_keep_their_bytes_only_when_nodata_is_black(tmp_path: Path) -> None:
    """Readers (pack, predict) take RGB and drop alpha: RGBA bytes are kept when
    that gives black nodata, else the tile is re-encoded as RGB with black nodata."""
    from mapgap.tasks.pack import PackSpec, read_image
    from mapgap.tasks.predict import read_image as predict_read_image

    source = next(t for t in kampala_tiles(21)
                  if sniff_format(kampala_file(t).read_bytes()) == "png")
    rgba = np.asarray(Image.open(kampala_file(source))).copy()
    rgba[:64] = 0  # a quarter without imagery, black underneath
    painted = rgba.copy()
    painted[:64, :, :3] = (200, 30, 30)  # the same, but red under the transparent pixels
    tiles = kampala_tiles(21)[:2]
    for t, arr in zip(tiles, (rgba, painted), strict=True):
        path = tmp_path / "src" / str(t.z) / str(t.x) / f"{t.y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "RGBA").save(path)
    run = tmp_path / "run"
    report = fetch_batch(str(run), imagery(f"file://{tmp_path}/src/{{z}}/{{x}}/{{y}}.png"),
                         256, tiles)
    assert report["counts"]["fetched"] == 2
    kept, repainted = (stored(run, t) for t in tiles)
    assert kept == (tmp_path / "src" / "21" / str(tiles[0].x) / f"{tiles[0].y}.png").read_bytes()
    assert Image.open(io.BytesIO(repainted)).mode == "RGB"
    expected = rgba[..., :3]  # imagery where opaque, black where transparent
    spec = PackSpec(str(run), 21, 256, ("building",), ("building",))
    for t in tiles:
        packed = np.asarray(Image.open(io.BytesIO(read_image(spec, t))).convert("RGB"))
        assert np.array_equal(packed, expected)
        assert np.array_equal(predict_read_image(RunLayout(str(run)), 256, t), expected)


def test_local_directory_template_and_missing_files(tmp_path: Path) -> None:
    tiles = kampala_tiles(21)[:4] + [Tile(1, 1, 21)]
    report = fetch_batch(str(tmp_path), imagery(f"{shared_path('kampala')}/{KAMPALA_PATTERN}"),
                         256, tiles)
    assert report["counts"]["fetched"] == 4
    assert report["missing"] == [{"tile": tile_key(Tile(1, 1, 21)), "reason": "no such file"}]
    with pytest.raises(ImageryError) as err:
        fetch_batch(str(tmp_path), imagery(f"{tmp_path}/nope/{{z}}/{{x}}/{{y}}.png"), 256, tiles)
    assert "\n" not in str(err.value) and f"{tmp_path}/nope" in str(err.value)


def test_tile_folder_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    tiles = kampala_tiles(21)[:3]
    for t in tiles[:2]:
        storage.write_bytes(f"{s3_bucket}/oam/{t.z}/{t.x}/{t.y}.png", kampala_file(t).read_bytes())
    source = f"{s3_bucket}/oam/{{z}}/{{x}}/{{y}}.png"
    report = fetch_batch(str(tmp_path), imagery(source), 256, tiles)
    assert report["counts"]["fetched"] == 2
    assert report["missing"] == [{"tile": tile_key(tiles[2]), "reason": "no such file"}]
    assert np.array_equal(decode_tile(stored(tmp_path, tiles[0])).rgb,
                          decode_tile(kampala_file(tiles[0]).read_bytes()).rgb)


def test_unreachable_server_is_one_clear_error(tmp_path: Path) -> None:
    source = f"http://127.0.0.1:{unused_port()}/{{z}}/{{x}}/{{y}}.png"
    with pytest.raises(ImageryError) as err:
        fetch_batch(str(tmp_path), imagery(source, retries=1), 256, kampala_tiles(21)[:20])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"tile server unreachable: {source} (ConnectError")


def test_api_key_is_sent_but_never_logged_or_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "k3y-0f-the-t1le-server"
    monkeypatch.setenv("MAPGAP_TEST_TILE_KEY", secret)
    tiles = kampala_tiles(21)[:3]
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN,
                    faults={tiles[0]: Fault.error(500, times=None)}) as server:
        cfg = imagery(server.url_template + "?key={key}", api_key_env="MAPGAP_TEST_TILE_KEY",
                      headers={"Authorization": "Bearer {key}"}, retries=1)
        with caplog.at_level(logging.DEBUG):
            report = fetch_batch(str(tmp_path), cfg, 256, tiles)
        assert all(p.endswith(f"?key={secret}") for p, _ in server.requests)
        assert all(h["Authorization"] == f"Bearer {secret}" for _, h in server.requests)
    assert report["counts"]["fetched"] == 2 and report["counts"]["failed"] == 1
    assert secret not in json.dumps(report) and secret not in caplog.text
    monkeypatch.delenv("MAPGAP_TEST_TILE_KEY")
    with pytest.raises(ImageryError, match="environment variable MAPGAP_TEST_TILE_KEY is not set"):
        fetch_batch(str(tmp_path), cfg, 256, tiles)


def test_report_lists_are_mergeable_in_any_order(tmp_path: Path) -> None:
    tiles = kampala_tiles(21)[:6]
    faults = {tiles[1]: Fault.not_found(), tiles[4]: Fault.garbage()}
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN, faults=faults) as server:
        parts = [fetch_batch(str(tmp_path), imagery(server.url_template), 256, tiles[i:i + 3])
                 for i in (0, 3)]
    merged = merge_reports(parts, source="x")
    assert merged == merge_reports(parts[::-1], source="x")
    assert merged["source"] == "x"
    assert merged["counts"]["fetched"] == 4 and merged["counts"]["tiles"] == 6
    assert [e["tile"] for e in merged["missing"]] == [tile_key(tiles[1])]
    assert json.loads(json.dumps(merged)) == merged


def test_tile_server_serves_real_bytes_and_404s() -> None:
    import httpx

    tile = kampala_tiles(21)[0]
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN) as server:
        url = server.url_template.format(x=tile.x, y=tile.y, z=tile.z)
        r = httpx.get(url)
        assert r.status_code == 200 and r.content == kampala_file(tile).read_bytes()
        assert r.headers["content-type"] == f"image/{sniff_format(r.content)}"
        assert httpx.get(server.url_template.format(x=1, y=1, z=21)).status_code == 404
        assert httpx.get(f"{server.base_url}/not/a/tile").status_code == 404
        port = server.port
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/")
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (256, 256)


# --- the Prefect flow ---

def flow_config(tmp_path: Path, source: str, tiles: list[Tile], **imagery_kw: object):
    from mapgap.conf.schema import validate_config

    w = min(mercantile.bounds(t).west for t in tiles)
    e = max(mercantile.bounds(t).east for t in tiles)
    s = min(mercantile.bounds(t).south for t in tiles)
    n = max(mercantile.bounds(t).north for t in tiles)
    (tmp_path / "l.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    data = {"name": "fetch-test", "storage": {"root": str(tmp_path / "out")},
            "aoi": [w, s, e, n], "zoom": tiles[0].z,
            "classes": [{"name": "building", "tags": {"include": {"building": "*"}}}],
            "labels": {"source": "l.geojson"},
            "imagery": {"source": source, "tiles_per_task": 4, "retries": 1, "backoff_s": 0.01,
                        **imagery_kw}}
    return validate_config(data, "test", tmp_path)


def test_fetch_flow_batches_merges_the_report_and_reruns_only_missing(tmp_path: Path) -> None:
    from mapgap.flows.fetch import fetch_flow
    from mapgap.orchestration import configured

    x0, y0, _ = kampala_tiles(21)[0]
    block = [Tile(x0 + i, y0 + j, 21) for i in range(3) for j in range(3)]
    assert set(block) <= set(kampala_tiles(21))
    gone = block[4]
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN,
                    faults={gone: Fault.not_found()}) as server:
        cfg = flow_config(tmp_path, server.url_template, block)
        assert tiles_for_geometry(cfg.aoi_geometry, 21) == sorted(block)
        summary = configured(fetch_flow, cfg)(cfg)
        report = storage.read_json(RunLayout(cfg.run_uri).fetch_report)
        assert summary["report"] == RunLayout(cfg.run_uri).fetch_report
        assert summary["fetched"] == 8 and summary["missing"] == 1 and summary["tiles"] == 9
        assert report["source"] == server.url_template and report["zoom"] == 21
        assert report["missing"] == [{"tile": tile_key(gone), "reason": "HTTP 404"}]
        before = server.hits.copy()
        again = configured(fetch_flow, cfg)(cfg)
        assert again["skipped_existing"] == 8 and again["missing"] == 1 and again["fetched"] == 0
        assert {t for t in block if server.hits[t] != before[t]} == {gone}
    assert all(storage.exists(RunLayout(cfg.run_uri).image(t)) for t in block if t != gone)


def test_fetch_flow_with_no_tile_at_all_fails_with_one_line(tmp_path: Path) -> None:
    from mapgap.flows.fetch import fetch_flow
    from mapgap.orchestration import configured

    tiles = kampala_tiles(21)[:2]
    faults = {t: Fault.not_found() for t in tiles}
    with TileServer(shared_path("kampala"), KAMPALA_PATTERN, faults=faults) as server:
        cfg = flow_config(tmp_path, server.url_template, tiles)
        with pytest.raises(ImageryError) as err:
            configured(fetch_flow, cfg)(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "none of the 2 AOI tiles could be fetched (2 missing" in msg
    assert storage.exists(RunLayout(cfg.run_uri).fetch_report)


# --- images far larger than a tile ---

def _flat_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A one-colour RGB PNG, compressed row block by row block (never the whole
    image in memory): 12000x12000 px is ~2 MB on the wire, 430 MB decoded."""
    import struct
    import zlib

    from mapgap.tasks.decode import PNG_SIGNATURE, _chunk

    comp = zlib.compressobj(1)
    parts = [comp.compress(b"\x00" + bytes(rgb) * width)]  # then "Up": rows of zeros
    block = (b"\x02" + bytes(3 * width)) * 500
    for done in range(1, height, 500):
        parts.append(comp.compress(block[: (1 + 3 * width) * min(500, height - done)]))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join((PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", b"".join(parts)),
                     _chunk(b"IEND", b"")))


def test_huge_images_are_refused_from_their_header_and_resampling_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    folder = tmp_path / "served"
    z, row = 18, 500
    huge, one_px, big = Tile(1, row, z), Tile(2, row, z), Tile(3, row, z)
    retina = [Tile(x, row, z) for x in range(4, 7)]
    sizes = {huge: 12000, one_px: 1, big: 1025, **{t: 512 for t in retina}}
    for t, side in sizes.items():
        (folder / str(z) / str(t.x)).mkdir(parents=True)
        (folder / f"{z}/{t.x}/{row}.png").write_bytes(_flat_png(side, side, (40, 90, 200)))
    assert (folder / f"{z}/{huge.x}/{row}.png").stat().st_size < 3_000_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with caplog.at_level(logging.WARNING, logger="mapgap"), \
            TileServer(folder, "{z}/{x}/{y}.png") as server:
        report = fetch_batch(str(tmp_path / "run"), imagery(server.url_template), 256,
                             list(sizes))
        assert server.hits[huge] == 1  # a permanent problem: not retried
    # Never decoded (430 MB per copy); the 1025 px one (16 MB) is refused too.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000
    failures = by_tile(report["failures"])
    assert set(failures) == {tile_key(huge), tile_key(big)}
    assert failures[tile_key(huge)]["reason"] == (
        "too large: PNG of 12000x12000 px, more than 1,048,576 px: refused without decoding it")
    assert report["counts"]["fetched"] == 4
    resampled = [r.getMessage() for r in caplog.records if "resampling" in r.getMessage()]
    assert len(resampled) == 2, resampled  # once for 512 px, once for 1 px: not per tile
    assert any("512x512 px tiles; resampling them to 256 px" in m for m in resampled)
