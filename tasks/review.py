"""Files for the people who fix OSM: candidates as GeoJSON and as a JOSM file,
unsupported OSM features, the per-tile quality grid, a report, and one
self-contained HTML map to look at all of it over the imagery.

review.html inlines Leaflet (vendored from npm under static/leaflet) instead of
folium's CDN links: it opens offline, from a zip, or on a machine without
internet, like the rest of mapgap.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import shapely

from mapgap import storage
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.tasks.geometry import read_geojson, write_geojson

LEAFLET = Path(__file__).parent / "static" / "leaflet"
OUTPUTS = ("candidates.geojson", "candidates.osm", "unsupported_osm.geojson",
           "quality_grid.geojson", "report.json", "review.html")
_PARTS = {"candidates.geojson": "candidates", "unsupported_osm.geojson": "unsupported",
          "quality_grid.geojson": "grid"}


# --- JOSM ----------------------------------------------------------------------------------

class _OsmXml:
    """New OSM objects with negative ids; nodes shared by touching rings are reused."""

    def __init__(self) -> None:
        self.next_id = 0
        self.nodes: dict[tuple[float, float], int] = {}
        self.lines: list[str] = []
        self.objects: list[str] = []

    def _id(self) -> int:
        self.next_id -= 1
        return self.next_id

    def node(self, lon: float, lat: float) -> int:
        key = (round(lon, 7), round(lat, 7))
        if key not in self.nodes:
            self.nodes[key] = nid = self._id()
            self.lines.append(f'  <node id="{nid}" action="modify" visible="true" '
                              f'lat="{key[1]:.7f}" lon="{key[0]:.7f}"/>')
        return self.nodes[key]

    def way(self, ring: Any, tags: dict[str, str]) -> int:
        refs = [self.node(x, y) for x, y in np.asarray(ring.coords)[:-1]]
        wid = self._id()
        body = [f'    <nd ref="{r}"/>' for r in [*refs, refs[0]]] + _tag_lines(tags)
        self.objects.append(f'  <way id="{wid}" action="modify" visible="true">\n'
                            + "\n".join(body) + "\n  </way>")
        return wid

    def polygon(self, geom: Any, tags: dict[str, str]) -> None:
        """A simple polygon -> a tagged closed way; holes or parts -> a multipolygon."""
        parts = list(shapely.get_parts(geom))
        if len(parts) == 1 and not parts[0].interiors:
            self.way(parts[0].exterior, tags)
            return
        members = []
        for p in parts:
            members.append(("outer", self.way(p.exterior, {})))
            members += [("inner", self.way(r, {})) for r in p.interiors]
        rid = self._id()
        body = [f'    <member type="way" ref="{ref}" role="{role}"/>' for role, ref in members]
        body += _tag_lines({"type": "multipolygon", **tags})
        self.objects.append(f'  <relation id="{rid}" action="modify" visible="true">\n'
                            + "\n".join(body) + "\n  </relation>")

    def text(self) -> str:
        return "\n".join(['<?xml version="1.0" encoding="UTF-8"?>',
                          '<osm version="0.6" generator="mapgap">', *self.lines, *self.objects,
                          "</osm>", ""])


def _tag_lines(tags: dict[str, str]) -> list[str]:
    return [f"    <tag k={quoteattr(k)} v={quoteattr(str(v))}/>" for k, v in tags.items()]


def josm_xml(geoms: Iterable[Any], tags: Iterable[dict[str, str]]) -> str:
    """OSM XML that JOSM opens as new, unsaved objects (negative ids)."""
    doc = _OsmXml()
    for g, t in zip(geoms, tags, strict=True):
        doc.polygon(g, t)
    return doc.text()


def candidate_tags(class_tags: dict[str, str], source: str = "mapgap") -> dict[str, str]:
    return {**class_tags, "source": source}


# --- map -----------------------------------------------------------------------------------

_STYLES = {
    "OSM": {"color": "#2b8cbe", "weight": 2, "fillOpacity": 0.05},
    "Predictions": {"color": "#fee08b", "weight": 1.5, "fillOpacity": 0.1},
    "Candidates (missing from OSM)": {"color": "#e7298a", "weight": 3, "fillOpacity": 0.35},
    "Unsupported OSM": {"color": "#fc8d59", "weight": 3, "dashArray": "6 4",
                        "fillOpacity": 0.0},
}
_TOOLTIPS = {"OSM": ["class", "osm_type", "osm_id"], "Predictions": ["class", "score", "area_m2"],
             "Candidates (missing from OSM)": ["class", "score", "area_m2", "iou",
                                               "osm_overlap"],
             "Unsupported OSM": ["class", "osm_type", "osm_id", "support"],
             "Quality grid (tile IoU)": ["tile", "iou", "osm", "predicted", "candidates"]}


def _leaflet_inline() -> tuple[str, str]:
    """(css, js) of the vendored Leaflet, control icons as data URIs."""
    css = (LEAFLET / "leaflet.css").read_text()
    for name in ("layers.png", "layers-2x.png"):
        data = base64.b64encode((LEAFLET / name).read_bytes()).decode()
        css = css.replace(f"url(images/{name})", f"url(data:image/png;base64,{data})")
    return css, (LEAFLET / "leaflet.js").read_text().replace("</script", "<\\/script")


def _grid_style(feature: dict[str, Any]) -> dict[str, Any]:
    iou = feature["properties"].get("iou")
    colour = "#999999" if not isinstance(iou, int | float) else ("#1a9850" if iou >= 0.6 else
                                            "#fee08b" if iou >= 0.3 else "#d73027")
    return {"color": colour, "weight": 0.5, "fillColor": colour, "fillOpacity": 0.25}


def review_html(layers: dict[str, tuple[np.ndarray, list[dict[str, Any]]]], imagery_url: str,
                zoom: int, title: str = "mapgap review") -> str:
    """A self-contained Leaflet page: imagery + toggleable vector layers.

    Every text shown (title, layer names, tooltip values) is HTML-escaped here:
    folium's tooltips and Leaflet's layer list assign HTML strings to innerHTML,
    and label files come from anyone (an ``osm_type`` of ``<img onerror=...>``
    must show as text, not run)."""
    import folium
    from branca.element import Element

    bounds = _bounds([g for g, _ in layers.values()]) or (0.0, 0.0, 0.0, 0.0)
    w, s, e, n = bounds
    # The imagery exists at one zoom only: far below it Leaflet would request (and
    # the browser choke on) millions of scaled tiles, so it is hidden there.
    lowest = max(0, zoom - 5)
    fmap = folium.Map(location=[(s + n) / 2, (w + e) / 2], zoom_start=max(lowest, zoom - 2),
                      tiles=None, control_scale=True, prefer_canvas=True)
    fmap.default_js, fmap.default_css = [], []
    css, js = _leaflet_inline()
    header = fmap.get_root().header
    header.add_child(Element(f"<title>{html.escape(title)}</title>"), name="title")
    header.add_child(Element(f"<style>{css}</style>"), name="leaflet_css")
    header.add_child(Element(f"<script>{js}</script>"), name="leaflet_js")
    folium.TileLayer(imagery_url, attr="imagery", name="Imagery", max_native_zoom=zoom,
                     min_native_zoom=zoom, min_zoom=lowest, max_zoom=zoom + 2,
                     overlay=False).add_to(fmap)
    for name, (geoms, props) in layers.items():
        if name == "Quality grid (tile IoU)":
            style = _grid_style
        else:
            fixed = _STYLES[name]
            style = lambda _f, s=fixed: s  # noqa: E731 - folium wants a callable
        fields = [f for f in _TOOLTIPS[name] if props and all(f in p for p in props)]
        folium.GeoJson(_collection(geoms, props), name=html.escape(f"{name} ({len(geoms)})"),
                       style_function=style, show=name != "Quality grid (tile IoU)",
                       tooltip=folium.GeoJsonTooltip(fields) if fields else None).add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    if e > w:
        # Keep the data clear of the (expanded) layer list in the top-right corner.
        fmap.fit_bounds([[s, w], [n, e]], max_zoom=zoom + 1, padding_top_left=(20, 20),
                        padding_bottom_right=(300, 20))
    return fmap.get_root().render()


def _collection(geoms: np.ndarray, props: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": json.loads(g), "properties": _plain(p)}
        for g, p in zip(shapely.to_geojson(np.asarray(geoms, dtype=object)), props,
                        strict=True)]}


def _plain(props: dict[str, Any]) -> dict[str, Any]:
    """Tooltips show scalars; lists and dicts become short strings; every string is
    HTML-escaped, as the tooltip puts it into innerHTML."""
    out: dict[str, Any] = {}
    for k, v in props.items():
        if not isinstance(v, str | int | float | type(None)):
            v = json.dumps(v)[:200]
        out[k] = html.escape(v) if isinstance(v, str) else v
    return out


def _bounds(arrays: list[np.ndarray]) -> tuple[float, ...] | None:
    b = [shapely.total_bounds(a) for a in arrays if len(a)]
    if not b:
        return None
    arr = np.array(b)
    return (arr[:, 0].min(), arr[:, 1].min(), arr[:, 2].max(), arr[:, 3].max())


# --- all review files ----------------------------------------------------------------------

def _concat(uris: list[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    geoms, props = [], []
    for uri in uris:
        g, p = read_geojson(uri)
        geoms.append(g)
        props += p
    return (np.concatenate(geoms) if geoms else np.empty(0, dtype=object)), props


def write_review(layout: RunLayout, summaries: list[dict[str, Any]],
                 class_tags: dict[str, dict[str, str]], report: dict[str, Any],
                 imagery_url: str, zoom: int) -> dict[str, str]:
    """Merge the per-class dedup parts into the review files of the run dir."""
    out = {}
    layers: dict[str, tuple[np.ndarray, list[dict[str, Any]]]] = {}
    for filename, part in _PARTS.items():
        layers[filename] = _concat([s["parts"][part] for s in summaries])
        out[filename] = write_geojson(layout.output(filename), *layers[filename])
    cand, cand_props = layers["candidates.geojson"]
    out["candidates.osm"] = storage.write_text(layout.output("candidates.osm"), josm_xml(
        cand, [candidate_tags(class_tags[p["class"]]) for p in cand_props]))
    per_class = {s["class"]: {k: v for k, v in s.items() if k not in ("parts", "class")}
                 for s in summaries}
    totals = {k: sum(c[k] for c in per_class.values())
              for k in ("predictions", "osm", "candidates", "unsupported")}
    out["report.json"] = storage.write_json(layout.output("report.json"), {
        **report, "classes": per_class, "totals": totals,
        "outputs": {name: layout.output(name) for name in OUTPUTS}})
    html = review_html({
        "Quality grid (tile IoU)": layers["quality_grid.geojson"],
        "OSM": _concat([s["parts"]["osm"] for s in summaries]),
        "Predictions": read_geojson(layout.predictions),
        "Unsupported OSM": layers["unsupported_osm.geojson"],
        "Candidates (missing from OSM)": layers["candidates.geojson"],
    }, imagery_url, zoom, title=f"mapgap review: {report.get('run', '')}")
    out["review.html"] = storage.write_text(layout.output("review.html"), html)
    return out


@stage_task(name="review-outputs")
def review_task(run_uri: str, summaries: list[dict[str, Any]],
                class_tags: dict[str, dict[str, str]], report: dict[str, Any],
                imagery_url: str, zoom: int, inputs: str) -> dict[str, str]:
    """``inputs``: content digest of the dedup parts and predictions (cache key only)."""
    return write_review(RunLayout(run_uri), summaries, class_tags, report, imagery_url, zoom)
