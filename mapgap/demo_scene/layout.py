"""Procedural plan of a small equatorial town, in EPSG:3857 metres.

Near the equator one web-mercator unit is about one ground metre, so sizes here are metres and
the renderer can rasterize the plan straight onto the tile grid. Everything drawn in the imagery
is an object of this plan, so the OSM extract and the truth GeoJSON derive from one source.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry import box as axis_box
from shapely.geometry.polygon import orient

RGB = tuple[int, int, int]
XY = tuple[float, float]

HIGHWAY_WIDTH: dict[str, float] = {
    "primary": 10.0,
    "tertiary": 7.5,
    "residential": 6.0,
    "service": 4.5,
}
SHOULDER = 1.8  # sidewalk or dirt edge on each side of the carriageway
_EDGE_MARGIN = 8.0  # keeps buildings wholly inside the scene
_ROAD_NAMES = ("Ntinda Road", "Kigoowa Road", "Kulambiro Ring Road", "Bukoto Street",
               "Kisasi Road", "Mawanda Road", "Naguru Drive")

# Roof colours (RGB as seen from above), weighted; pitched = tiles or painted sheets.
_PITCHED_COLOURS: tuple[tuple[RGB, float], ...] = (
    ((170, 86, 60), 0.34),   # terracotta tiles
    ((142, 72, 56), 0.16),   # dark red-brown tiles
    ((138, 138, 136), 0.16),  # grey concrete tiles
    ((74, 76, 82), 0.14),    # dark / charcoal
    ((205, 200, 190), 0.08),  # white-ish
    ((66, 98, 78), 0.06),    # green painted
    ((62, 78, 112), 0.06),   # blue painted
)
_METAL_COLOURS: tuple[tuple[RGB, float], ...] = (
    ((128, 80, 54), 0.42),   # rusty corrugated iron
    ((172, 174, 172), 0.30),  # galvanised
    ((150, 60, 48), 0.14),   # red painted
    ((58, 70, 98), 0.14),    # blue painted
)
_FLAT_COLOURS: tuple[tuple[RGB, float], ...] = (
    ((214, 210, 200), 0.40),  # white-ish concrete
    ((160, 158, 152), 0.40),  # grey
    ((92, 92, 94), 0.20),    # dark bitumen
)
# Distractors deliberately share the roof palette.
_CONTAINER_COLOURS: tuple[RGB, ...] = (
    (142, 64, 46), (172, 88, 62), (212, 208, 200), (150, 150, 148), (48, 82, 136), (54, 102, 72),
)
_CAR_COLOURS: tuple[tuple[RGB, float], ...] = (
    ((222, 222, 220), 0.34), ((168, 170, 172), 0.2), ((34, 36, 40), 0.16),
    ((150, 32, 30), 0.1), ((40, 64, 130), 0.1), ((96, 98, 100), 0.1),
)


@dataclass(frozen=True)
class Box:
    """Oriented rectangle; the renderer shades roofs and vehicles in its local frame."""

    cx: float
    cy: float
    length: float  # along `angle`; the ridge of a pitched roof runs this way
    width: float
    angle: float  # radians, counter-clockwise from east

    def polygon(self) -> Polygon:
        c, s = math.cos(self.angle), math.sin(self.angle)
        hl, hw = self.length / 2, self.width / 2
        corners = ((-hl, -hw), (hl, -hw), (hl, hw), (-hl, hw))
        return Polygon([(self.cx + c * u - s * v, self.cy + s * u + c * v) for u, v in corners])


@dataclass(frozen=True)
class Road:
    nodes: tuple[int, ...]  # indices into Town.points, shared at junctions
    highway: str
    lanes: int | None
    name: str | None

    @property
    def width(self) -> float:
        return HIGHWAY_WIDTH[self.highway]


@dataclass(frozen=True)
class Building:
    id: int
    parts: tuple[Box, ...]  # roof sections, each with its own ridge
    courtyard: Box | None  # inner ring of a courtyard building
    footprint: Polygon
    tag: str  # value of building=*
    roof: str  # gable | hip | flat | metal
    colour: RGB
    height: float
    levels: int


@dataclass(frozen=True)
class ParkingLot:
    box: Box
    lines: tuple[Box, ...]  # painted bay separators


@dataclass(frozen=True)
class Court:
    box: Box  # whole paved area; the playing court is centred in it
    surface: str  # clay | hard


@dataclass(frozen=True)
class Prop:
    """A vehicle or shipping container: unmapped, elevated, often roof-coloured."""

    kind: str  # car | truck | container
    parts: tuple[Box, ...]
    colours: tuple[RGB, ...]
    height: float

    @property
    def footprint(self) -> Polygon:
        return shapely.union_all([p.polygon() for p in self.parts]).convex_hull


@dataclass(frozen=True)
class Tree:
    x: float
    y: float
    radius: float
    height: float
    crown: Polygon
    mapped: bool  # False inside a wood, which is mapped as an area instead


@dataclass(frozen=True)
class Patch:
    kind: str  # grass | soil | park | wood | industrial | track
    polygon: Polygon
    mapped: bool


@dataclass(frozen=True)
class Town:
    bounds: tuple[float, float, float, float]  # EPSG:3857 west, south, east, north
    points: tuple[XY, ...]
    roads: tuple[Road, ...]
    buildings: tuple[Building, ...]
    parkings: tuple[ParkingLot, ...]
    courts: tuple[Court, ...]
    props: tuple[Prop, ...]
    trees: tuple[Tree, ...]
    patches: tuple[Patch, ...]
    shadow: XY  # ground offset of a shadow per metre of height (sun direction)


def road_line(town: Town, road: Road) -> LineString:
    return LineString([town.points[i] for i in road.nodes])


def _polygons(geom: shapely.Geometry) -> list[Polygon]:
    return [g for g in shapely.get_parts(geom) if isinstance(g, Polygon) and not g.is_empty]


def _pick(rng: np.random.Generator, weighted: tuple[tuple[RGB, float], ...]) -> RGB:
    weights = np.array([w for _, w in weighted])
    return weighted[int(rng.choice(len(weighted), p=weights / weights.sum()))][0]


def _jitter(rng: np.random.Generator, colour: RGB, sd: float = 0.06) -> RGB:
    scale = 1 + rng.normal(0, sd) + rng.normal(0, sd / 3, 3)
    return tuple(int(np.clip(c * k, 0, 255)) for c, k in zip(colour, scale, strict=True))  # type: ignore[return-value]


def _in_frame(o: np.ndarray, t: np.ndarray, n: np.ndarray,
              a: float, b: float, w: float, d: float) -> Box:
    """Box spanning [a, a+w] along t and [b, b+d] along n from o; its length is the longer side."""
    c = o + t * (a + w / 2) + n * (b + d / 2)
    along = math.atan2(t[1], t[0])
    if w >= d:
        return Box(float(c[0]), float(c[1]), w, d, along)
    return Box(float(c[0]), float(c[1]), d, w, along + math.pi / 2)


def _edges(part: Polygon, min_len: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Street-facing edges of a buildable area as (start, direction, inward normal, length)."""
    simple = part.simplify(1.5)
    if not isinstance(simple, Polygon) or simple.is_empty:
        return []
    ring = np.asarray(orient(simple, 1.0).exterior.coords)
    out = []
    for a, b in itertools.pairwise(ring):
        length = float(np.hypot(*(b - a)))
        if length >= min_len:
            t = (b - a) / length
            out.append((a, t, np.array([-t[1], t[0]]), length))
    return out


def _main_angle(part: Polygon) -> float:
    ring = np.asarray(part.minimum_rotated_rectangle.exterior.coords)
    d = max((ring[1] - ring[0], ring[2] - ring[1]), key=lambda v: float(np.hypot(*v)))
    return math.atan2(d[1], d[0])


class _Planner:
    """Accumulates the plan; one instance per scene, all randomness from one generator."""

    def __init__(self, bounds: tuple[float, float, float, float], rng: np.random.Generator):
        self.rng = rng
        self.bounds = bounds
        w, s, e, n = bounds
        m = _EDGE_MARGIN
        self.inset = axis_box(w + m, s + m, e - m, n - m)
        self.points: list[XY] = []
        self.roads: list[tuple[list[int], str, int | None, str | None]] = []
        self.buildings: list[Building] = []
        self.parkings: list[ParkingLot] = []
        self.courts: list[Court] = []
        self.props: list[Prop] = []
        self.trees: list[Tree] = []
        self.patches: list[Patch] = []
        self.hard: list[Polygon] = []  # where no tree may stand: lots, courts, props, service roads
        az = math.radians(rng.uniform(110, 160))  # sun in the south-east, shadows to the north-west
        k = rng.uniform(0.55, 0.75)  # 1 / tan(sun elevation)
        self.shadow: XY = (-math.sin(az) * k, -math.cos(az) * k)

    # ---- streets -------------------------------------------------------------------------

    def _point(self, x: float, y: float) -> int:
        self.points.append((float(x), float(y)))
        return len(self.points) - 1

    def _line(self, nodes: list[int]) -> LineString:
        return LineString([self.points[k] for k in nodes])

    def _spacing(self, half: float, lo: float, hi: float) -> list[float]:
        vals = [-half]
        while vals[-1] < half:
            vals.append(vals[-1] + self.rng.uniform(lo, hi))
        return vals

    def streets(self) -> tuple[list[LineString], shapely.Geometry]:
        """Jittered, gently warped grid; returns block edges and the no-build road corridor."""
        rng = self.rng
        w, s, e, n = self.bounds
        cx, cy = (w + e) / 2, (s + n) / 2
        half = 0.75 * max(e - w, n - s) + 150
        theta = rng.uniform(-0.3, 0.3)
        us, vs = self._spacing(half, 150, 200), self._spacing(half, 120, 165)
        amp, lam, phase = rng.uniform(4, 10), rng.uniform(500, 900), rng.uniform(0, 2 * math.pi)
        c, sn = math.cos(theta), math.sin(theta)
        grid = np.empty((len(us), len(vs)), dtype=int)
        for i, u in enumerate(us):
            for j, v in enumerate(vs):
                uu = u + rng.normal(0, 2.5)
                vv = v + rng.normal(0, 2.5) + amp * math.sin(2 * math.pi * uu / lam + phase)
                grid[i, j] = self._point(cx + c * uu - sn * vv, cy + sn * uu + c * vv)
        i_primary = int(np.argmin(np.abs(us)))
        j_tertiary = int(np.argmin(np.abs(np.asarray(vs) - rng.uniform(-150, 150))))
        lines: list[tuple[list[int], str]] = []
        for i in range(len(us)):
            cls = {i_primary: "primary", i_primary + 3: "tertiary"}.get(i, "residential")
            lines.append(([int(k) for k in grid[i, :]], cls))
        for j in range(len(vs)):
            cls = "tertiary" if j == j_tertiary else "residential"
            lines.append(([int(k) for k in grid[:, j]], cls))

        near = shapely.buffer(axis_box(*self.bounds), 25)
        names = list(_ROAD_NAMES)
        rng.shuffle(names)
        edges: list[LineString] = []
        for nodes, cls in lines:
            lanes = 2 if cls != "residential" or rng.random() < 0.3 else None
            name = names.pop() if cls != "residential" and names else None
            run: list[int] = []
            for a, b in itertools.pairwise(nodes):
                seg = LineString([self.points[a], self.points[b]])
                kept = cls != "residential" or rng.random() > 0.15
                if kept:
                    edges.append(seg)
                if kept and seg.intersects(near):
                    run = run or [a]
                    run.append(b)
                elif run:
                    self.roads.append((run, cls, lanes, name))
                    run = []
            if run:
                self.roads.append((run, cls, lanes, name))
        corridor = shapely.union_all([
            shapely.buffer(self._line(r), HIGHWAY_WIDTH[c] / 2 + SHOULDER + 0.8)
            for r, c, _, _ in self.roads
        ])
        return edges, corridor

    def _service_road(self, start: np.ndarray, direction: np.ndarray) -> LineString | None:
        """Dead-end service way from `start` out along `direction` to the nearest street."""
        ray = LineString([start, start + direction * 45])
        best: tuple[float, int, int, np.ndarray] | None = None
        for r, (nodes, cls, _, _) in enumerate(self.roads):
            if cls == "service":
                continue
            for k, (a, b) in enumerate(itertools.pairwise(nodes)):
                hit = ray.intersection(LineString([self.points[a], self.points[b]]))
                if isinstance(hit, Point):
                    dist = float(np.hypot(hit.x - start[0], hit.y - start[1]))
                    if best is None or dist < best[0]:
                        best = (dist, r, k, np.array([hit.x, hit.y]))
        if best is None:
            return None
        _, r, k, hit = best
        junction = self._point(*hit)
        self.roads[r][0].insert(k + 1, junction)
        self.roads.append(([junction, self._point(*start)], "service", None, None))
        line = LineString([hit, start])
        self.hard.append(shapely.buffer(line, HIGHWAY_WIDTH["service"] / 2 + 1))
        return line

    # ---- placement helpers ----------------------------------------------------------------

    def _hard_near(self, part: Polygon) -> list[Polygon]:
        if not self.hard:
            return []
        near = shapely.intersects(np.array(self.hard), part.envelope.buffer(10))
        return [h for h, keep in zip(self.hard, near, strict=True) if keep]

    @staticmethod
    def _clear(poly: Polygon, part: Polygon, obstacles: list[Polygon], gap: float) -> bool:
        if not poly.within(part):
            return False
        return not obstacles or not bool(shapely.dwithin(np.array(obstacles), poly, gap).any())

    def _free_box(self, part: Polygon, obstacles: list[Polygon], length: float, width: float,
                  gap: float, tries: int = 30) -> Box | None:
        rng = self.rng
        minx, miny, maxx, maxy = part.bounds
        base = _main_angle(part)
        for _ in range(tries):
            ang = base + (math.pi / 2 if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.03)
            b = Box(rng.uniform(minx, maxx), rng.uniform(miny, maxy), length, width, ang)
            if self._clear(b.polygon(), part, obstacles, gap):
                return b
        return None

    def _blob(self, part: Polygon, radius: float) -> Polygon | None:
        rng = self.rng
        minx, miny, maxx, maxy = part.bounds
        for _ in range(10):
            c = np.array([rng.uniform(minx, maxx), rng.uniform(miny, maxy)])
            if part.contains(Point(c)):
                break
        else:
            return None
        discs = [Point(c + rng.normal(0, radius * 0.7, 2)).buffer(radius * rng.uniform(0.5, 1.1), 8)
                 for _ in range(int(rng.integers(3, 6)))]
        blob = shapely.union_all(discs).buffer(3).buffer(-3).intersection(part)
        parts = sorted(_polygons(blob), key=lambda p: -p.area)
        return parts[0] if parts and parts[0].area > 30 else None

    # ---- objects ---------------------------------------------------------------------------

    def _building(self, parts: list[Box], courtyard: Box | None, tag: str, roof: str,
                  levels: int) -> Building:
        rng = self.rng
        shape = shapely.union_all([p.polygon() for p in parts])
        if courtyard is not None:
            shape = shape.difference(courtyard.polygon())
        footprint = orient(shapely.set_precision(shape, 0.01).simplify(0.02), 1.0)
        palette = {"flat": _FLAT_COLOURS, "metal": _METAL_COLOURS}.get(roof, _PITCHED_COLOURS)
        height = levels * rng.uniform(3.0, 3.6) + (0.0 if roof == "flat" else 1.2)
        return Building(len(self.buildings) + 1, tuple(parts), courtyard, footprint, tag, roof,
                        _jitter(rng, _pick(rng, palette)), height, levels)

    def _add_building(self, b: Building, obstacles: list[Polygon]) -> None:
        self.buildings.append(b)
        obstacles.append(b.footprint)

    def _house(self, part: Polygon, obstacles: list[Polygon], o: np.ndarray, t: np.ndarray,
               n: np.ndarray, a: float, w: float, d: float, b: float) -> Building | None:
        """Rectangle or L-shaped house on a street frontage."""
        rng = self.rng
        roof = str(rng.choice(["gable", "hip", "metal", "flat"], p=[0.34, 0.3, 0.26, 0.1]))
        main = _in_frame(o, t, n, a, b, w, d)
        parts = [main]
        if w >= 10 and rng.random() < 0.3:
            ww, wd = w * rng.uniform(0.35, 0.5), rng.uniform(4.0, 8.0)
            wa = a if rng.random() < 0.5 else a + w - ww
            parts = [_in_frame(o, t, n, wa, b + d - 0.5, ww, wd + 0.5), main]
        levels = 2 if rng.random() < 0.25 else 1
        tag = str(rng.choice(["house", "residential", "yes"], p=[0.6, 0.25, 0.15]))
        cand = self._building(parts, None, tag, roof, levels)
        if not isinstance(cand.footprint, Polygon):
            return None
        if not self._clear(cand.footprint, part, obstacles, 1.5):
            return None
        self._add_building(cand, obstacles)
        return cand

    def _commercial(self, part: Polygon, obstacles: list[Polygon], o: np.ndarray, t: np.ndarray,
                    n: np.ndarray, a: float, w: float, d: float, b: float,
                    roof: str | None = None) -> Building | None:
        """Large block, sometimes around a courtyard (mapped as a multipolygon)."""
        rng = self.rng
        box = _in_frame(o, t, n, a, b, w, d)
        courtyard = None
        if roof is None and min(w, d) >= 20 and rng.random() < 0.5:
            ring = rng.uniform(5.0, min(8.0, (box.width - 5) / 2))
            courtyard = Box(box.cx, box.cy, box.length - 2 * ring, box.width - 2 * ring, box.angle)
        roof = roof or ("flat" if courtyard else str(rng.choice(["flat", "metal", "hip"])))
        tag = str(rng.choice(["commercial", "yes"], p=[0.7, 0.3]))
        cand = self._building([box], courtyard, tag, roof, int(rng.integers(2, 5)))
        if not self._clear(cand.footprint, part, obstacles, 2.0):
            return None
        self._add_building(cand, obstacles)
        return cand

    def _prop(self, kind: str, c: np.ndarray, angle: float, obstacles: list[Polygon] | None,
              part: Polygon | None = None, size: float | None = None) -> Prop | None:
        rng = self.rng
        d = np.array([math.cos(angle), math.sin(angle)])
        if kind == "car":
            parts = (Box(c[0], c[1], rng.uniform(4.2, 4.9), rng.uniform(1.75, 1.95), angle),)
            colours = (_jitter(rng, _pick(rng, _CAR_COLOURS), 0.04),)
            height = 1.5
        elif kind == "container":
            length = size or (12.19 if rng.random() < 0.5 else 6.06)
            parts = (Box(c[0], c[1], length, 2.44, angle),)
            colours = (_jitter(rng, self._container_colour()),)
            height = 2.6
        else:
            cargo = rng.uniform(7.0, 11.0)
            total = cargo + 2.6
            cab_c = c + d * (total / 2 - 1.2)
            cargo_c = c - d * (total / 2 - cargo / 2)
            parts = (Box(cab_c[0], cab_c[1], 2.4, 2.45, angle),
                     Box(cargo_c[0], cargo_c[1], cargo, 2.55, angle))
            colours = (_jitter(rng, _pick(rng, _CAR_COLOURS)),
                       _jitter(rng, self._container_colour()))
            height = 3.8
        prop = Prop(kind, parts, colours, height)
        if obstacles is not None and part is not None:
            if not self._clear(prop.footprint, part, obstacles, 1.0):
                return None
            obstacles.append(prop.footprint)
        self.props.append(prop)
        self.hard.append(prop.footprint)
        return prop

    def _container_colour(self) -> RGB:
        return _CONTAINER_COLOURS[int(self.rng.integers(len(_CONTAINER_COLOURS)))]

    def _tree(self, x: float, y: float, radius: float, mapped: bool = True) -> Tree:
        rng = self.rng
        ang = np.linspace(0, 2 * math.pi, 15)[:-1] + rng.uniform(0, 0.4)
        rad = radius * (1 + rng.uniform(-0.14, 0.14, ang.size))
        crown = Polygon(np.column_stack([x + rad * np.cos(ang), y + rad * np.sin(ang)]))
        tree = Tree(float(x), float(y), float(radius), float(radius * rng.uniform(1.6, 2.4) + 2),
                    crown, mapped)
        self.trees.append(tree)
        return tree

    def _scatter_trees(self, part: Polygon, count: int, buildings: list[Polygon]) -> None:
        """Yard trees: crowns may overhang roofs but trunks stay outside buildings."""
        rng = self.rng
        minx, miny, maxx, maxy = part.bounds
        stand = shapely.union_all(buildings).buffer(1.0) if buildings else None
        hard = shapely.union_all(self._hard_near(part))
        for _ in range(count):
            p = Point(rng.uniform(minx, maxx), rng.uniform(miny, maxy))
            radius = rng.uniform(2.5, 4.5) * (1.5 if rng.random() < 0.2 else 1.0)
            if not part.contains(p) or (stand is not None and stand.contains(p)):
                continue
            if shapely.dwithin(hard, p, radius):
                continue
            self._tree(p.x, p.y, radius)

    # ---- block types -----------------------------------------------------------------------

    def residential(self, part: Polygon) -> None:
        rng = self.rng
        obstacles = self._hard_near(part)
        houses: list[Building] = []
        for o, t, n, length in _edges(part, 12):
            a = rng.uniform(0.5, 4)
            while a < length - 8:
                w, d, b = rng.uniform(10, 20), rng.uniform(9, 15), rng.uniform(1, 6)
                if a + w > length:
                    break
                if rng.random() > 0.56:
                    h = self._house(part, obstacles, o, t, n, a, w, d, b)
                    if h is not None:
                        houses.append(h)
                a += w + rng.uniform(14, 32)
        for _ in range(int(part.area / 9000)):
            box = self._free_box(part, obstacles, rng.uniform(9, 14), rng.uniform(8, 10), 3.0, 8)
            if box is not None:
                roof = str(rng.choice(["gable", "hip", "metal"]))
                b = self._building([box], None, "house", roof, 1)
                self._add_building(b, obstacles)
                houses.append(b)
        if rng.random() < 0.25:
            kind = "container" if rng.random() < 0.6 else "truck"
            box = self._free_box(part, obstacles, 12.5, 3.0, 1.5, 15)
            if box is not None:
                self._prop(kind, np.array([box.cx, box.cy]), box.angle, obstacles, part)
        for _ in range(int(rng.integers(0, 3))):
            blob = self._blob(part, rng.uniform(8, 16))
            if blob is not None:
                self.patches.append(Patch("grass", blob, bool(rng.random() < 0.5)))
        for _ in range(int(rng.integers(0, 2))):
            blob = self._blob(part, rng.uniform(6, 12))
            if blob is not None:
                self.patches.append(Patch("soil", blob, False))
        if rng.random() < 0.5:
            self._track(part, houses)
        self._overhanging_trees(houses, shapely.union_all(self._hard_near(part)))
        self._scatter_trees(part, int(part.area / 700), [h.footprint for h in houses])

    def _track(self, part: Polygon, houses: list[Building]) -> None:
        """An unmapped footpath worn across the block, skirting the houses."""
        rng = self.rng
        ring = part.exterior
        ends = [ring.interpolate(rng.uniform(0, ring.length)) for _ in range(2)]
        mid = np.array(part.centroid.coords[0]) + rng.normal(0, 15, 2)
        path = LineString([ends[0].coords[0], tuple(mid), ends[1].coords[0]])
        avoid = shapely.union_all([h.footprint for h in houses]).buffer(1.5)
        worn = path.buffer(rng.uniform(0.8, 1.3)).intersection(part).difference(avoid)
        self.patches += [Patch("track", p, False) for p in _polygons(worn) if p.area > 20]

    def _overhanging_trees(self, houses: list[Building], hard: shapely.Geometry) -> None:
        """Some crowns deliberately cover a roof corner, as in real imagery."""
        rng = self.rng
        for h in houses:
            if rng.random() < 0.12:
                corners = np.asarray(h.footprint.exterior.coords)[:-1]
                corner = corners[int(rng.integers(len(corners)))]
                centre = np.asarray(h.footprint.centroid.coords[0])
                out = (corner - centre) / max(float(np.hypot(*(corner - centre))), 1e-6)
                radius = rng.uniform(2.5, 4.5)
                p = corner + out * radius * rng.uniform(0.2, 0.6)
                if shapely.dwithin(hard, Point(p), radius):
                    continue
                self._tree(p[0], p[1], radius)

    def commercial(self, part: Polygon) -> None:
        rng = self.rng
        obstacles = self._hard_near(part)
        built: list[Polygon] = []
        for o, t, n, length in _edges(part, 20):
            a = rng.uniform(1, 4)
            while a < length - 16:
                courtyard = rng.random() < 0.35
                w = rng.uniform(20, 30) if courtyard else rng.uniform(14, 30)
                d = rng.uniform(20, 28) if courtyard else rng.uniform(10, 22)
                if a + w > length:
                    w = length - a
                if w < 12:
                    break
                b = self._commercial(part, obstacles, o, t, n, a, w, d, rng.uniform(1, 4))
                if b is not None:
                    built.append(b.footprint)
                a += w + rng.uniform(4, 12)
        self._scatter_trees(part, int(part.area / 1500), built)

    def parking(self, part: Polygon) -> None:
        """A surface car park reached by a service road, then shops around it."""
        rng = self.rng
        edges = _edges(part, 30)
        if not edges:
            self.residential(part)
            return
        o, t, n, length = max(edges, key=lambda e: e[3])
        lot_len = min(length - 6, rng.uniform(40, 70))
        a = rng.uniform(2, max(2.0, length - lot_len - 2))
        for modules in range(int(rng.integers(1, 4)), 0, -1):
            depth = modules * 18.0 + 1.0
            c = o + t * (a + lot_len / 2) + n * (2.0 + depth / 2)
            box = Box(float(c[0]), float(c[1]), lot_len, depth, math.atan2(t[1], t[0]))
            if box.polygon().within(part):
                break
        else:
            self.residential(part)
            return
        self._fill_lot(box, modules)
        self._service_road(o + t * (a + lot_len / 2) + n * 2.0, -n)
        self.commercial(part)

    def _fill_lot(self, box: Box, modules: int) -> None:
        """Bays in rows of 5 m facing 7 m aisles; most bays hold a car, some a truck or box."""
        rng = self.rng
        ca, sa = math.cos(box.angle), math.sin(box.angle)
        t, n = np.array([ca, sa]), np.array([-sa, ca])
        centre = np.array([box.cx, box.cy])
        n_bays = int((box.length - 3) // 2.6)
        u0 = -n_bays * 2.6 / 2
        lines: list[Box] = []
        rows: list[float] = []
        for m in range(modules):
            v0 = -box.width / 2 + 1.0 + m * 18.0
            rows += [v0 + 2.5, v0 + 15.5]
            if rng.random() < 0.7:
                c = centre + n * (v0 + 8.5) + t * rng.uniform(-box.length / 4, box.length / 4)
                self._prop("truck", c, box.angle + (math.pi if rng.random() < 0.5 else 0), None)
        for v in rows:
            for k in range(n_bays + 1):
                c = centre + t * (u0 + k * 2.6) + n * v
                lines.append(Box(c[0], c[1], 5.0, 0.15, box.angle + math.pi / 2))
            k = 0
            while k < n_bays:
                c = centre + t * (u0 + (k + 0.5) * 2.6) + n * v
                span = 3 if rng.random() < 0.5 else 5
                if k + span <= n_bays and rng.random() < 0.06:
                    mid = centre + t * (u0 + (k + span / 2) * 2.6) + n * v
                    self._prop("container", mid, box.angle, None, size=6.06 if span == 3 else 12.19)
                    k += span
                    continue
                if rng.random() < 0.65:
                    jitter = rng.normal(0, 0.12, 2)
                    angle = box.angle + math.pi / 2 + rng.normal(0, 0.03)
                    self._prop("car", c + jitter, angle, None)
                k += 1
        self.parkings.append(ParkingLot(box, tuple(lines)))
        self.hard.append(box.polygon())

    def park(self, part: Polygon) -> None:
        rng = self.rng
        self.patches.append(Patch("park", part, True))
        obstacles = self._hard_near(part)
        if rng.random() < 0.8:
            box = self._free_box(part, obstacles, 34.0, 17.5, 3.0, 40)
            if box is not None:
                self.courts.append(Court(box, "clay" if rng.random() < 0.5 else "hard"))
                self.hard.append(box.polygon())
                obstacles.append(box.polygon())
        for _ in range(int(rng.integers(1, 3))):
            self._wood(part)
        if rng.random() < 0.4:
            box = self._free_box(part, obstacles, rng.uniform(8, 11), rng.uniform(6, 8), 4.0)
            if box is not None:
                self._add_building(self._building([box], None, "yes", "metal", 1), obstacles)
        self._scatter_trees(part, int(part.area / 900), [])

    def _wood(self, part: Polygon) -> None:
        """A canopy cluster, mapped as natural=wood rather than as single trees."""
        rng = self.rng
        hard = shapely.union_all(self._hard_near(part))
        interior = part.buffer(-6)
        if interior.is_empty:
            return
        minx, miny, maxx, maxy = interior.bounds
        centre = np.array([rng.uniform(minx, maxx), rng.uniform(miny, maxy)])
        crowns = []
        for _ in range(int(rng.integers(12, 26))):
            p = centre + rng.normal(0, 10, 2)
            radius = rng.uniform(3.0, 5.5)
            if not interior.contains(Point(p)):
                continue
            if shapely.dwithin(hard, Point(p), radius):
                continue
            crowns.append(self._tree(p[0], p[1], radius, mapped=False).crown)
        if len(crowns) >= 4:
            area = shapely.union_all(crowns).buffer(1.5).buffer(-1.0)
            if not isinstance(area, Polygon):
                area = area.convex_hull
            self.patches.append(Patch("wood", orient(area.simplify(0.5), 1.0), True))

    def yard(self, part: Polygon) -> None:
        """Depot: bare soil, warehouses, rows of containers and parked trucks."""
        rng = self.rng
        self.patches.append(Patch("industrial", part, True))
        obstacles = self._hard_near(part)
        built = 0
        for o, t, n, length in _edges(part, 25):
            if built >= 2 + part.area // 4000 or rng.random() < 0.3:
                continue
            w = min(length - 4, rng.uniform(20, 30))
            b = self._commercial(part, obstacles, o, t, n, 2.0, w, rng.uniform(12, 20),
                                 rng.uniform(2, 5), roof="metal")
            built += b is not None
        for _ in range(int(np.clip(part.area / 1200, 2, 14))):
            count = int(rng.integers(3, 8))
            box = self._free_box(part, obstacles, 12.5, count * 3.1, 2.0, 40)
            if box is None:
                continue
            t = np.array([math.cos(box.angle), math.sin(box.angle)])
            n = np.array([-t[1], t[0]])
            for k in range(count):
                c = np.array([box.cx, box.cy]) + n * ((k - (count - 1) / 2) * 3.1)
                if rng.random() < 0.85:
                    self._prop("container", c + t * rng.normal(0, 0.3), box.angle, None)
            obstacles.append(box.polygon())
        for _ in range(int(np.clip(part.area / 2500, 1, 5))):
            box = self._free_box(part, obstacles, 14.0, 3.0, 2.0)
            if box is not None:
                self._prop("truck", np.array([box.cx, box.cy]), box.angle, obstacles, part)
        self._scatter_trees(part, int(part.area / 3000), [])

    def _along(self, classes: tuple[str, ...], offset: float, step: tuple[float, float]
               ) -> Iterator[tuple[Point, float]]:
        """Points (and road direction) every `step` metres, `offset` from chosen roads' edges."""
        rng = self.rng
        for nodes, cls, _, _ in list(self.roads):
            if cls not in classes:
                continue
            line = self._line(nodes)
            for side in (-1.0, 1.0):
                curve = line.offset_curve(side * (HIGHWAY_WIDTH[cls] / 2 + offset))
                if curve.is_empty or not isinstance(curve, LineString):
                    continue
                pos = rng.uniform(2, step[1])
                while pos < curve.length:
                    p, q = curve.interpolate(pos), curve.interpolate(min(pos + 1, curve.length))
                    if self.inset.contains(p):
                        yield p, math.atan2(q.y - p.y, q.x - p.x)
                    pos += rng.uniform(*step)

    def street_life(self) -> None:
        """Cars and trucks parked at the kerb, then avenue trees clear of everything built."""
        rng = self.rng
        built = shapely.union_all(self.hard + [b.footprint for b in self.buildings])
        shapely.prepare(built)
        junctions = shapely.MultiPoint(self.points)
        shapely.prepare(junctions)
        for p, angle in self._along(("residential", "tertiary"), -1.3, (20, 70)):
            if rng.random() < 0.35 and not shapely.dwithin(junctions, p, 14):
                kind = "truck" if rng.random() < 0.25 else "car"
                prop = self._prop(kind, np.array([p.x, p.y]), angle, None)
                if prop is not None and shapely.intersects(built, prop.footprint):
                    self.props.pop()
                    self.hard.pop()
        roads = [shapely.buffer(self._line(r), HIGHWAY_WIDTH[c] / 2 + 0.5)
                 for r, c, _, _ in self.roads]
        blocked = shapely.union_all([built, *roads, *self.hard])
        shapely.prepare(blocked)
        avenues = ("primary", "tertiary") + (("residential",) if rng.random() < 0.5 else ())
        for p, _ in self._along(avenues, 3.2, (9, 16)):
            radius = rng.uniform(2.3, 4.0)
            if rng.random() < 0.7 and not shapely.dwithin(blocked, p, radius * 0.8):
                self._tree(p.x, p.y, radius)

    def town(self) -> Town:
        roads = tuple(Road(tuple(nodes), cls, lanes, name)
                      for nodes, cls, lanes, name in self.roads)
        return Town(self.bounds, tuple(self.points), roads, tuple(self.buildings),
                    tuple(self.parkings), tuple(self.courts), tuple(self.props),
                    tuple(self.trees), tuple(self.patches), self.shadow)


_USES = ("park", "parking", "commercial", "yard", "parking", "commercial", "park", "commercial",
         "yard", "parking")


def plan_town(bounds: tuple[float, float, float, float], rng: np.random.Generator) -> Town:
    """Lay out streets, then give each block a land use and fill it."""
    planner = _Planner(bounds, rng)
    edges, corridor = planner.streets()
    parts: list[Polygon] = []
    for face in shapely.get_parts(shapely.polygonize(edges)):
        buildable = face.intersection(planner.inset).difference(corridor)
        parts += [orient(p, 1.0) for p in _polygons(buildable) if p.area > 250]
    big = [i for i, p in enumerate(parts) if p.area >= 2500]
    order = [big[int(k)] for k in rng.permutation(len(big))]
    uses = {i: _USES[k] for k, i in enumerate(order[: min(len(_USES), round(0.38 * len(big)))])}
    fill = {"park": planner.park, "parking": planner.parking, "commercial": planner.commercial,
            "yard": planner.yard}
    for i, part in enumerate(parts):
        fill.get(uses.get(i, "residential"), planner.residential)(part)
    planner.street_life()
    return planner.town()
