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


# --- hostile values: nothing shown on the map may run as script ----------------------------

XSS = "<img src=x onerror=alert(1)>"
XSS_FLAG = "<img src=x onerror=\"window.__pwned=1\">"
# Opens every feature's tooltip and popup of every layer (the hidden grid too) and
# really hovers one feature per layer; returns what the mapper would read.
_OPEN_EVERYTHING = """async () => {
  const map = Object.values(window).find(v => v instanceof L.Map);
  const layers = Object.values(window).filter(v => v instanceof L.GeoJSON);
  const texts = [];
  for (const group of layers) {
    group.addTo(map);
    group.eachLayer(f => {  // the events a mapper's hover and click send, per feature
      const at = {latlng: f.getBounds().getCenter()};
      f.fire('mouseover', at, true);
      if (group.getTooltip()) texts.push(group.getTooltip().getElement().textContent);
      f.fire('mouseout', at, true);
      f.fire('click', at, true);
      if (group.getPopup()) texts.push(group.getPopup().getElement().textContent);
    });
  }
  const legend = document.querySelector('.leaflet-control-layers').textContent;
  await new Promise(r => setTimeout(r, 300));  // let <img onerror> fire, if any
  return {texts, legend, title: document.title, pwned: window.__pwned || 0,
          centres: layers.map(g => { const f = g.getLayers()[0];
            const p = map.latLngToContainerPoint(f.getBounds().getCenter());
            return [p.x, p.y]; })};
}"""


def open_review_page(html: Path, tmp_path: Path) -> dict:
    """Load review.html in headless Chromium (Playwright), open every tooltip and
    hover each layer; ``dialogs``: alert()s that ran, ``pwned``: the window flag."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = _chromium()
    dialogs: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(html.as_uri())
            page.wait_for_function("typeof L !== 'undefined'")
            seen = page.evaluate(_OPEN_EVERYTHING)
            for x, y in seen["centres"]:  # real mouse hovers too
                page.mouse.move(x, y)
                page.wait_for_timeout(100)
                page.mouse.click(x, y)
            page.wait_for_timeout(300)
            seen["pwned"] = seen["pwned"] or page.evaluate("window.__pwned || 0")
            seen["imgs"] = page.evaluate(
                "document.querySelectorAll('.leaflet-tooltip img, .leaflet-popup img,"
                " .leaflet-control-layers img').length")
        finally:
            browser.close()
    return {**seen, "dialogs": dialogs}


def _hostile_vector_labels(tmp_path: Path) -> Path:
    """A user's vector label file: one OSM-like building whose osm_type is markup."""
    from tests.helpers_inference import tile_lonlat

    (w, n), (e, s) = tile_lonlat(ORIGIN.x + 0.7, ORIGIN.y + 0.7), tile_lonlat(ORIGIN.x + 0.9,
                                                                            ORIGIN.y + 0.9)
    feature = {"type": "Feature", "properties": {"osm_type": XSS, "osm_id": 7, "note": XSS_FLAG},
               "geometry": shapely.geometry.mapping(shapely.box(w, s, e, n))}
    path = tmp_path / "hostile.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def test_review_page_from_a_hostile_vector_label_file_runs_no_script(tmp_path) -> None:
    """Harvest -> dedup -> review of a label file whose osm_type is an <img onerror>:
    the OSM and Unsupported OSM tooltips show the markup as text, no script runs."""
    from mapgap.tasks.labels import write_outputs
    from mapgap.tasks.vector_labels import harvest_vector

    cfg, layout, _ = _scene(tmp_path)
    source = str(_hostile_vector_labels(tmp_path))
    write_outputs(harvest_vector(source, cfg.classes, "class", cfg.aoi_geometry), layout, source)
    summary = dedup_class(layout, "building", cfg.dedup, cfg.zoom)
    out = write_review(layout, [summary], {"building": {"building": "yes"}}, {"run": XSS},
                       "tiles/{z}/{x}/{y}.png", cfg.zoom)
    seen = open_review_page(Path(out["review.html"]), tmp_path)
    assert seen["dialogs"] == [] and seen["pwned"] == 0 and seen["imgs"] == 0
    shown = [t for t in seen["texts"] if XSS in t]
    assert len(shown) == 2, seen["texts"]  # the OSM and the unsupported OSM tooltip
    assert seen["title"] == f"mapgap review: {XSS}"


def test_review_page_escapes_every_value_of_every_layer(tmp_path) -> None:
    """Markup in any property of any layer (classes, ids, scores, tiles, lists)."""
    from mapgap.tasks.review import review_html

    poly = shapely.box(32.0, 0.0, 32.001, 0.001)
    every = {f: XSS for f in ("class", "osm_type", "osm_id", "score", "area_m2", "iou",
                              "osm_overlap", "support", "tile", "osm", "predicted",
                              "candidates")}
    every["tiles"] = [XSS_FLAG]
    layers = {name: (np.array([poly], dtype=object), [dict(every)])
              for name in ("Quality grid (tile IoU)", "OSM", "Predictions", "Unsupported OSM",
                           "Candidates (missing from OSM)")}
    html = tmp_path / "review.html"
    html.write_text(review_html(layers, "tiles/{z}/{x}/{y}.png", 18, title=XSS))
    seen = open_review_page(html, tmp_path)
    assert seen["dialogs"] == [] and seen["pwned"] == 0 and seen["imgs"] == 0
    assert len(seen["texts"]) == 5 and all(XSS in t for t in seen["texts"]), seen["texts"]
    assert "Quality grid (tile IoU) (1)" in seen["legend"]
