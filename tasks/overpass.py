"""Harvest labels from an Overpass API endpoint (overpy parses, httpx transports).

The AOI is split into sub-boxes; each box is one Overpass QL query built from
the classes' tag filters and one cached Prefect task, so a rerun re-asks only
the boxes that failed. Raw replies are cached under the run dir by a hash of
endpoint + query. Assembly then goes through the same
:class:`~mapgap.tasks.labels.Harvester` as the .pbf path.

Being a good citizen of public servers: every request carries a User-Agent,
waits for a free slot announced by ``<endpoint>/status``, backs off (bounded,
honouring ``Retry-After``) on 429/502/503/504, connection errors and cut-off
replies, and times out. A reply with a ``remark`` ("runtime error: Query timed
out", "out of memory", ...) is an error carrying that text, never an empty result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import overpy
import shapely
from shapely.geometry import LineString, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

from mapgap import storage
from mapgap.conf.labels import ClassSpec, OverpassConfig
from mapgap.layout import RunLayout
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.labels import (
    Harvester,
    HarvestResult,
    TagMatcher,
    aoi_from_wkb,
    check_aoi,
    write_outputs,
)
from mapgap.tasks.osm import AREA_RELATION_TYPES

RETRY_STATUS = (429, 502, 503, 504)
_STATUS_AVAILABLE = re.compile(r"(\d+) slots? available now")
_STATUS_WAIT = re.compile(r"Slot available after: \S+, in (-?\d+) seconds?")
_STATUS_LIMIT = re.compile(r"Rate limit: (\d+)")
_REMARK_XML = re.compile(r"<remark>(.*?)</remark>", re.S)
_HTML = re.compile(rb"<(!doctype\s+html|html)[\s>]", re.I)

LonLat = tuple[float, float]


class OverpassError(RuntimeError):
    """The server could not give a usable answer (after bounded retries)."""


class OverpassRuntimeError(OverpassError):
    """The reply carries a runtime remark: the result is incomplete, not empty."""


class OverpassReplyError(OverpassError):
    """The reply is not valid Overpass JSON/XML (cut off...): worth asking again."""


class OverpassNotOsmError(OverpassReplyError):
    """A complete reply that is not OSM data (an HTML page, other XML): the same
    request gets the same page, so it is not retried."""


# --- queries ------------------------------------------------------------------------------

def split_boxes(aoi: BaseGeometry, max_deg: float) -> list[tuple[float, float, float, float]]:
    """Equal sub-boxes of at most ``max_deg`` covering the AOI bbox, keeping only
    those that touch the AOI itself (a thin diagonal AOI asks for few boxes)."""
    w, s, e, n = aoi.bounds
    nx, ny = max(1, math.ceil((e - w) / max_deg)), max(1, math.ceil((n - s) / max_deg))
    dx, dy = (e - w) / nx, (n - s) / ny
    boxes = []
    for j in range(ny):
        for i in range(nx):
            b = (w + i * dx, s + j * dy, w + (i + 1) * dx, s + (j + 1) * dy)
            if aoi.intersects(box(*b)):
                boxes.append(tuple(round(v, 7) for v in b))
    return boxes


def _ql(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _regex(values: Iterable[str]) -> str:
    alternatives = "|".join(re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", v) for v in values)
    return f"^({alternatives})$"


def _filters(matcher: TagMatcher, key: str, allowed: frozenset[str] | None) -> str:
    """QL tag filters for one include key plus the excludes. Excludes with "*" are
    left to the Python side (ERE has no look-ahead for "any value but no")."""
    if allowed is None:
        out = f"[{_ql(key)}][{_ql(key)}!={_ql('no')}]"
    else:
        out = f"[{_ql(key)}~{_ql(_regex(sorted(allowed)))}]"
    for k, banned in matcher.exclude:
        if banned is not None:
            out += f"[{_ql(k)}!~{_ql(_regex(sorted(banned)))}]"
    return out


def build_query(specs: list[ClassSpec], bbox: tuple[float, float, float, float],
                timeout_s: int) -> str:
    """One query for all classes in one box; recursion ``>`` brings the nodes of
    ways and the member ways (and their nodes) of multipolygon relations."""
    w, s, e, n = bbox
    where = f"({s},{w},{n},{e})"
    area_types = _ql(_regex(AREA_RELATION_TYPES))
    statements: list[str] = []
    for spec in specs:
        matcher = TagMatcher.of(spec.tags)
        for key, allowed in matcher.include:
            f = _filters(matcher, key, allowed)
            if spec.geometry == "point":
                statements.append(f"node{f}{where};")
            else:
                statements.append(f"way{f}{where};")
            if spec.geometry == "polygon":
                statements.append(f"relation{f}[\"type\"~{area_types}]{where};")
    body = "\n  ".join(dict.fromkeys(statements))
    return f"[out:json][timeout:{timeout_s}];\n(\n  {body}\n);\n(._;>;);\nout body qt;\n"


def query_key(endpoint: str, query: str) -> str:
    return hashlib.sha256(f"{endpoint}\n{query}".encode()).hexdigest()[:24]


# --- transport ----------------------------------------------------------------------------

def status_url(endpoint: str) -> str:
    """``https://host/api/interpreter`` -> ``https://host/api/status``."""
    return endpoint.rstrip("/").rsplit("/", 1)[0] + "/status"


@dataclass(frozen=True)
class SlotStatus:
    available: int | None  # None: the status text did not say
    waits_s: tuple[float, ...]  # seconds until each busy slot frees up
    unlimited: bool


def parse_status(text: str) -> SlotStatus:
    m = _STATUS_AVAILABLE.search(text)
    limit = _STATUS_LIMIT.search(text)
    return SlotStatus(
        available=int(m.group(1)) if m else None,
        waits_s=tuple(max(0.0, float(x)) for x in _STATUS_WAIT.findall(text)),
        unlimited=bool(limit) and int(limit.group(1)) == 0,
    )


def wait_for_slot(client: httpx.Client, endpoint: str, cfg: OverpassConfig) -> None:
    """Block until the server announces a free slot (bounded by max_slot_wait_s).
    A server without a readable /status is not waited for."""
    url = status_url(endpoint)
    deadline = time.monotonic() + cfg.max_slot_wait_s
    while True:
        try:
            reply = client.get(url, timeout=10)
        except httpx.HTTPError:
            return
        if reply.status_code != 200:
            return
        st = parse_status(reply.text)
        if st.unlimited or st.available is None and not st.waits_s or (st.available or 0) > 0:
            return
        wait = min(st.waits_s) if st.waits_s else cfg.status_poll_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OverpassError(f"{url}: no free slot within labels.overpass.max_slot_wait_s="
                                f"{cfg.max_slot_wait_s:g} s (next one in {wait:g} s)")
        get_logger().info("overpass: waiting %.0f s for a free slot at %s", wait, url)
        time.sleep(max(0.05, min(wait, remaining, cfg.status_poll_s)))


def _retry_after(reply: httpx.Response) -> float | None:
    try:
        return float(reply.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _error_text(page: str) -> str:
    """Overpass explains bad queries in an HTML page: keep its first sentence."""
    text = re.sub(r"<[^>]+>", " ", page)
    text = " ".join(text.split())
    m = re.search(r"Error: (.*?)(?:$|(?<=\.) )", text)
    return (m.group(1) if m else text)[:200]


def check_reply(data: bytes, url: str) -> str:
    """Validate a reply body; returns its format ("json" or "xml").

    Raises OverpassRuntimeError for remarks and OverpassReplyError for anything
    that does not parse (a cut-off transfer, an HTML error page)."""
    head = data.lstrip()[:1]
    if head == b"{":
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise OverpassReplyError(f"{url}: malformed JSON reply ({err})") from None
        if doc.get("remark"):
            raise OverpassRuntimeError(f"{url}: {' '.join(str(doc['remark']).split())}")
        if not isinstance(doc.get("elements"), list):
            raise OverpassReplyError(f"{url}: JSON reply without an 'elements' list")
        return "json"
    if head == b"<":
        text = data.decode("utf-8", "replace")
        m = _REMARK_XML.search(text)
        if m:
            raise OverpassRuntimeError(f"{url}: {' '.join(m.group(1).split())}")
        if _HTML.search(data[:2000]):  # an error page, a proxy's or captive portal's page
            raise OverpassNotOsmError(f"{url}: an HTML page, not OSM data: {_error_text(text)}")
        try:
            root = ET.fromstring(data)
        except ET.ParseError as err:
            raise OverpassReplyError(f"{url}: malformed XML reply ({err})") from None
        if root.tag != "osm":
            raise OverpassNotOsmError(f"{url}: XML reply is not OSM data (<{root.tag}>)")
        return "xml"
    raise OverpassReplyError(f"{url}: reply is neither JSON nor XML ({data[:40]!r})")


def cached_reply(cache_dir: str, key: str) -> str | None:
    for fmt in ("json", "xml"):
        uri = storage.join(cache_dir, f"{key}.{fmt}")
        if storage.exists(uri):
            return uri
    return None


def fetch(endpoint: str, query: str, cache_dir: str, cfg: OverpassConfig) -> str:
    """Run one query (or reuse its cached raw reply); returns the reply's URI."""
    key = query_key(endpoint, query)
    hit = cached_reply(cache_dir, key)
    if hit:
        return hit
    log = get_logger()
    headers = {"User-Agent": cfg.user_agent, "Accept": "application/json"}
    # the server gives up after timeout_s; allow it some time to say so
    timeout = httpx.Timeout(cfg.timeout_s + min(30.0, cfg.timeout_s), connect=15.0)
    failure = ""
    with httpx.Client(headers=headers, timeout=timeout) as client:
        for attempt in range(cfg.retries + 1):
            delay = min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt)
            wait_for_slot(client, endpoint, cfg)
            try:
                reply = client.post(endpoint, data={"data": query})
            except httpx.TransportError as err:  # timeouts, resets, refused connections
                failure = f"{type(err).__name__}: {err}".rstrip(": ")
            else:
                if reply.status_code == 200:
                    try:
                        fmt = check_reply(reply.content, endpoint)
                    except (OverpassRuntimeError, OverpassNotOsmError):
                        raise  # the same request would get the same answer
                    except OverpassReplyError as err:
                        failure = str(err)
                    else:
                        return storage.write_bytes(storage.join(cache_dir, f"{key}.{fmt}"),
                                                   reply.content)
                elif reply.status_code in RETRY_STATUS:
                    failure = f"HTTP {reply.status_code}"
                    after = _retry_after(reply)
                    delay = min(cfg.max_backoff_s, after) if after is not None else delay
                else:
                    raise OverpassError(f"{endpoint}: HTTP {reply.status_code}: "
                                        f"{_error_text(reply.text)}")
            if attempt < cfg.retries:
                log.warning("overpass: %s; retry %d/%d in %.1f s", failure, attempt + 1,
                            cfg.retries, delay)
                time.sleep(delay)
    raise OverpassError(f"{endpoint}: giving up after {cfg.retries + 1} attempts"
                        f" (labels.overpass.retries={cfg.retries}): {failure}")


# --- assembly -----------------------------------------------------------------------------

def parse_reply(uri: str) -> overpy.Result:
    data = storage.read_bytes(uri)
    fmt = check_reply(data, uri)
    api = overpy.Overpass()
    return api.parse_json(data) if fmt == "json" else api.parse_xml(data)


def _lonlat(points: Iterable[Any]) -> list[LonLat]:
    return [(float(p.lon), float(p.lat)) for p in points]


def way_coords(way: overpy.Way) -> list[LonLat] | None:
    """From ``out geom`` geometry or the way's nodes; None when nodes are missing."""
    geometry = way.attributes.get("geometry")
    if geometry:
        return [(float(p["lon"]), float(p["lat"])) for p in geometry]
    try:
        return _lonlat(way.get_nodes(resolve_missing=False))
    except overpy.exception.DataIncomplete:
        return None


def _member_coords(relation: overpy.Relation) -> list[list[LonLat]] | None:
    """Coordinates of every member way, whatever its role (roles are often wrong:
    like osmium, nesting decides what is outer). None when a member is missing."""
    ways = []
    for m in relation.members:
        if not isinstance(m, overpy.RelationWay):
            continue
        if m.geometry:
            coords = _lonlat(m.geometry)
        else:
            try:
                coords = way_coords(m.resolve(resolve_missing=False))
            except overpy.exception.DataIncomplete:
                coords = None
        if coords is None:
            return None
        ways.append(coords)
    return ways


def ring_segments(ways: list[list[LonLat]]) -> list[tuple[LonLat, LonLat]] | None:
    """The member ways cut into segments. A segment present twice (two rings
    sharing an edge) cancels out, as in osmium's assembler; None when the rest
    does not close into rings (a node where an odd number of segments end)."""
    count: Counter[tuple[LonLat, LonLat]] = Counter()
    for coords in ways:
        for a, b in itertools.pairwise(coords):
            if a != b:
                count[(a, b) if a < b else (b, a)] += 1
    segments = [s for s, n in count.items() if n % 2]
    ends = Counter(p for s in segments for p in s)
    if not segments or any(n % 2 for n in ends.values()):
        return None
    return segments


def relation_polygon(relation: overpy.Relation) -> BaseGeometry | None:
    """The relation's area by the even-odd rule, as osmium assembles it: split
    ways are joined into rings, rings are nested by containment (even depth:
    outer, odd: hole), so an island in a hole is kept. None when a member is
    missing or a ring does not close."""
    ways = _member_coords(relation)
    segments = None if ways is None else ring_segments(ways)
    if segments is None:
        return None
    area = shapely.build_area(shapely.multilinestrings(segments))
    return None if area.is_empty else area


def harvest_overpass(reply_uris: list[str], specs: list[ClassSpec],
                     aoi: BaseGeometry) -> HarvestResult:
    """All classes from the cached replies of every sub-box (elements repeated
    across boxes are merged by id)."""
    aoi = check_aoi(aoi)
    result = overpy.Result()
    for uri in reply_uris:
        result.expand(parse_reply(uri))
    harvester = Harvester(specs)
    for node in result.nodes:
        cols = harvester.matching("point", node.tags) if node.tags else []
        for c, used in cols:
            c.add("node", node.id, used, Point(float(node.lon), float(node.lat)))
    for way in result.ways:
        polys = harvester.matching("polygon", way.tags)
        lines = harvester.matching("line", way.tags)
        if not (polys or lines):
            continue
        coords = way_coords(way)
        if coords is None or len(coords) < 2:
            for c, _ in polys + lines:
                c.skip("skipped_invalid")
            continue
        closed = len(coords) >= 4 and coords[0] == coords[-1]
        for c, used in polys:
            if closed:
                c.add("way", way.id, used, Polygon(coords))
            else:
                c.skip("skipped_geometry")
        for c, used in lines:
            c.add("way", way.id, used, LineString(coords))
    for rel in result.relations:
        if rel.tags.get("type") not in AREA_RELATION_TYPES:
            continue
        cols = harvester.matching("polygon", rel.tags)
        geom = relation_polygon(rel) if cols else None
        for c, used in cols:
            if geom is None:
                c.skip("skipped_invalid")
            else:
                c.add("relation", rel.id, used, geom)
    return harvester.finish(aoi)


# --- Prefect tasks ------------------------------------------------------------------------

@stage_task(name="overpass-box", task_run_name="overpass-box-{bbox}")
def fetch_box_task(endpoint: str, bbox: tuple[float, float, float, float], query: str,
                   cache_dir: str, overpass: OverpassConfig) -> str:
    """One sub-box: its own cached task, so a rerun re-asks only failed boxes."""
    return fetch(endpoint, query, cache_dir, overpass)


@stage_task(name="harvest-overpass")
def harvest_overpass_task(endpoint: str, reply_uris: list[str], classes: list[ClassSpec],
                          aoi_wkb: str, run_uri: str) -> dict[str, Any]:
    result = harvest_overpass(reply_uris, classes, aoi_from_wkb(aoi_wkb))
    return write_outputs(result, RunLayout(run_uri), endpoint)
