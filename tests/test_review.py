"""Review outputs: the JOSM file (parsed by osmium), the combined GeoJSON files,
report.json, and a self-contained review.html rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import osmium
import pytest
import shapely

from mapgap.layout import RunLayout
from mapgap.tasks.dedup import dedup_class
from mapgap.tasks.geometry import read_geojson
from mapgap.tasks.review import candidate_tags, josm_xml, write_review
from tests.helpers_inference import ORIGIN, SIZE, make_config, tile_lonlat, write_labels

REPO = Path(__file__).resolve().parent.parent
TAGS = candidate_tags({"building": "yes"})


def _shapes() -> list:
    ring = shapely.box(32.0, 0.0, 32.001, 0.001)
    holed = shapely.box(32.002, 0, 32.004, 0.002).difference(
        shapely.box(32.0025, 0.0005, 32.0035, 0.0015))
    twin = shapely.MultiPolygon([shapely.box(32.01, 0, 32.011, 0.001),
                                 shapely.box(32.011, 0, 32.012, 0.001)])  # shares an edge
    return [ring, holed, twin]


def test_josm_file_parses_with_osmium(tmp_path) -> None:
    path = tmp_path / "candidates.osm"
    path.write_text(josm_xml(_shapes(), [TAGS] * 3))
    ways, rels, nodes = {}, {}, {}
    for o in osmium.FileProcessor(str(path)):
        if o.is_node():
            nodes[o.id] = (o.location.lon, o.location.lat)
        elif o.is_way():
            ways[o.id] = ([n.ref for n in o.nodes], dict(o.tags))
        else:
            rels[o.id] = ([(m.type, m.ref, m.role) for m in o.members], dict(o.tags))
    assert all(i < 0 for i in [*nodes, *ways, *rels])  # new objects for JOSM
    # One tagged closed way; two multipolygons with untagged member ways.
    tagged = [w for w in ways.values() if w[1]]
    assert len(tagged) == 1 and tagged[0][1] == {"building": "yes", "source": "mapgap"}
    assert all(refs[0] == refs[-1] and len(refs) == 5 for refs, _ in ways.values())
    assert sorted(tags["type"] for _, tags in rels.values()) == ["multipolygon"] * 2
    assert all(tags["building"] == "yes" and tags["source"] == "mapgap"
               for _, tags in rels.values())
    roles = sorted(sorted(r for _, _, r in members) for members, _ in rels.values())
    assert roles == [["inner", "outer"], ["outer", "outer"]]
    assert len(nodes) == 4 + 8 + 6  # the twin squares share their 2 common corners
    assert "action=\"modify\"" in path.read_text()


def test_josm_geometry_assembles_into_the_same_areas(tmp_path) -> None:
    """libosmium only assembles areas of positive ids, so check geometry on a copy
    with the signs flipped: every candidate comes back with its area."""
    path = tmp_path / "pos.osm"
    path.write_text(re.sub(r'(id|ref)="-(\d+)"', r'\1="\2"', josm_xml(_shapes(), [TAGS] * 3)))
    wkb = osmium.geom.WKBFactory()
    areas = sorted(shapely.from_wkb(wkb.create_multipolygon(a)).area
                   for a in osmium.FileProcessor(str(path)).with_areas() if a.is_area())
    assert areas == pytest.approx(sorted(g.area for g in _shapes()), rel=1e-4)


def _scene(tmp_path):
    """A run with predictions, labels and probability tiles; dedup done for one class."""
    from mapgap import storage
    from mapgap.grid import Tile
    from mapgap.tasks.geometry import write_geojson
    from mapgap.tasks.predict import encode_probability

    cfg = make_config(tmp_path, cols=1, rows=1)
    layout = RunLayout(cfg.run_uri)
    storage.write_bytes(layout.probability(Tile(ORIGIN.x, ORIGIN.y, ORIGIN.z)),
                        encode_probability(np.zeros((1, 8, 8), np.uint8)))

    def box(c0, r0, c1, r1):
        w, n = tile_lonlat(ORIGIN.x + c0 / SIZE, ORIGIN.y + r0 / SIZE)
        e, s = tile_lonlat(ORIGIN.x + c1 / SIZE, ORIGIN.y + r1 / SIZE)
        return shapely.box(w, s, e, n)

    write_geojson(layout.predictions, [box(10, 10, 50, 50), box(100, 100, 150, 140)],
                  [{"class": "building", "score": 0.9, "area_m2": 570.0, "tiles": ["t"]},
                   {"class": "building", "score": 0.7, "area_m2": 713.0, "tiles": ["t"]}])
    write_labels(layout, [box(10, 10, 50, 50), box(180, 20, 220, 60)])
    summary = dedup_class(layout, "building", cfg.dedup, cfg.zoom)
    return cfg, layout, summary


def test_review_files_are_complete_and_self_contained(tmp_path) -> None:
    cfg, layout, summary = _scene(tmp_path)
    out = write_review(layout, [summary], {"building": {"building": "yes"}},
                       {"run": "t", "mlflow_run_id": "abc123", "thresholds": {"dedup_iou": 0.3}},
                       "tiles/{z}/{x}/{y}.png", cfg.zoom)
    assert sorted(out) == sorted(["candidates.geojson", "candidates.osm", "report.json",
                                  "review.html", "unsupported_osm.geojson",
                                  "quality_grid.geojson"])
    _, cands = read_geojson(out["candidates.geojson"])
    assert [c["score"] for c in cands] == [0.7]
    _, uns = read_geojson(out["unsupported_osm.geojson"])
    assert [u["osm_id"] for u in uns] == [2]
    report = json.loads(Path(out["report.json"]).read_text())
    assert report["mlflow_run_id"] == "abc123" and report["thresholds"]["dedup_iou"] == 0.3
    assert report["totals"] == {"predictions": 2, "osm": 2, "candidates": 1, "unsupported": 1}
    assert report["classes"]["building"]["metrics"]["osm_objects_vs_predictions"]["tp"] == 1
    html = Path(out["review.html"]).read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", html)  # nothing from a CDN
    assert "L.tileLayer" in html and "tiles/{z}/{x}/{y}.png" in html
    for layer in ("OSM (2)", "Predictions (2)", "Candidates (missing from OSM) (1)",
                  "Unsupported OSM (1)", "Quality grid (tile IoU) (1)"):
        assert layer in html


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    return exe


@pytest.mark.slow
def test_review_page_renders_in_headless_chromium(tmp_path) -> None:
    """A synthetic town through the real predict -> vectorize -> dedup -> review
    code, rendered by Chromium; with MAPGAP_UPDATE_DOCS=1 the screenshot becomes
    the README's docs/review.png."""
    from tests.review_scene import build_review_scene

    html = build_review_scene(tmp_path)
    report = json.loads((html.parent / "report.json").read_text())
    # 28 roofs, every 4th withheld from OSM; one OSM building has no roof any more.
    assert report["totals"] == {"predictions": 28, "osm": 22, "candidates": 7, "unsupported": 1}
    shot = tmp_path / "review.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
         f"--screenshot={shot}", "--window-size=1200,800", "--virtual-time-budget=4000",
         html.as_uri()], check=True, timeout=120, capture_output=True)
    import cv2

    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (800, 1200)
    # Imagery drawn (not just the grey empty map) and the candidate magenta present.
    assert img.reshape(-1, 3).std(axis=0).mean() > 20
    magenta = (img[..., 2] > 180) & (img[..., 1] < 90) & (img[..., 0] > 90)
    assert magenta.sum() > 200
    if os.environ.get("MAPGAP_UPDATE_DOCS"):  # refresh the README's picture on purpose only
        shutil.copy(shot, REPO / "docs" / "review.png")
