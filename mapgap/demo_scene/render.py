"""Synthetic aerial imagery of a town plan.

The scene is drawn at SS times the tile resolution and area-averaged down, which gives the mixed
edge pixels of real imagery. Roofs, vehicles and crowns are shaded per pixel in each object's own
frame (ridges, sun-facing facets, eaves), shadows are swept away from the sun, and sensor blur
and noise come last. Roof-coloured containers, trucks and clay courts keep colour alone from
being enough to find buildings.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize
from shapely import affinity
from shapely.geometry import LineString, Polygon
from shapely.ops import substring

from mapgap.demo_scene.layout import SHOULDER, Box, Town, road_line

SS = 2  # supersampling factor
_MAX_SS_PX = 4096  # above this many pixels a side, draw at tile resolution (memory, time)

_ASPHALT = {"primary": (70, 72, 76), "tertiary": (82, 83, 86), "residential": (96, 95, 93),
            "service": (108, 106, 102)}
_ROAD_ORDER = ("service", "residential", "tertiary", "primary")
_GRASS, _DRY, _SOIL = (88, 112, 56), (136, 128, 86), (150, 112, 84)


@dataclass(frozen=True)
class Grid:
    """The scene raster: north-up EPSG:3857 pixels of the tile resolution."""

    west: float
    north: float
    res: float  # metres per pixel
    width: int
    height: int

    def transform(self, ss: int = 1) -> Affine:
        return Affine(self.res / ss, 0.0, self.west, 0.0, -self.res / ss, self.north)


Window = tuple[slice, slice]


class _Canvas:
    """Float RGB image plus helpers that rasterize and paint only the window a shape covers."""

    def __init__(self, grid: Grid, rng: np.random.Generator, ss: int = SS):
        self.rng = rng
        self.h, self.w = grid.height * ss, grid.width * ss
        self.px = grid.res / ss
        self.transform = grid.transform(ss)
        self.img = np.zeros((self.h, self.w, 3), np.float32)

    def window(self, geoms: Sequence[shapely.Geometry]) -> Window:
        minx, miny, maxx, maxy = shapely.total_bounds(np.asarray(geoms, dtype=object))
        x0, y0 = self.transform.c, self.transform.f
        c0 = int(np.clip(math.floor((minx - x0) / self.px) - 1, 0, self.w))
        c1 = int(np.clip(math.ceil((maxx - x0) / self.px) + 1, 0, self.w))
        r0 = int(np.clip(math.floor((y0 - maxy) / self.px) - 1, 0, self.h))
        r1 = int(np.clip(math.ceil((y0 - miny) / self.px) + 1, 0, self.h))
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def burn(self, shapes: Iterable[tuple[shapely.Geometry, int]], all_touched: bool = False,
             dtype: str = "uint8") -> tuple[np.ndarray, Window]:
        pairs = [(g, v) for g, v in shapes if not g.is_empty]
        if not pairs:
            return np.zeros((0, 0), dtype), (slice(0, 0), slice(0, 0))
        win = self.window([g for g, _ in pairs])
        shape = (win[0].stop - win[0].start, win[1].stop - win[1].start)
        if 0 in shape:
            return np.zeros(shape, dtype), win
        transform = self.transform @ Affine.translation(win[1].start, win[0].start)
        return rasterize(pairs, out_shape=shape, transform=transform, all_touched=all_touched,
                         dtype=dtype), win

    def mask(self, geoms: Iterable[shapely.Geometry],
             all_touched: bool = False) -> tuple[np.ndarray, Window]:
        m, win = self.burn(((g, 1) for g in geoms), all_touched)
        return m.astype(bool), win

    def noise(self, cell_m: float) -> np.ndarray:
        """Smooth ~N(0, 1) field with features about `cell_m` metres across."""
        cell = max(1, round(cell_m / self.px))
        small = self.rng.standard_normal((self.h // cell + 4, self.w // cell + 4), np.float32)
        big = cv2.resize(small, (small.shape[1] * cell, small.shape[0] * cell),
                         interpolation=cv2.INTER_CUBIC)[cell: cell + self.h, cell: cell + self.w]
        return big / max(float(big[::7, ::7].std()), 1e-6)

    def paint(self, mask: np.ndarray, win: Window, colour: Sequence[float],
              alpha: float | np.ndarray = 1.0, tex: np.ndarray | None = None) -> None:
        """Blend `colour`, optionally times a full-frame texture, into the masked window."""
        if mask.size == 0:
            return
        view = self.img[win]
        col = np.asarray(colour, np.float32)
        if tex is not None:
            col = col * tex[win][mask][:, None]
        a = alpha[mask][:, None] if isinstance(alpha, np.ndarray) else alpha
        view[mask] = view[mask] * (1 - a) + col * a

    def local(self, ids: np.ndarray, win: Window, boxes: Sequence[Box]) -> tuple[np.ndarray, ...]:
        """Pixels of an id raster in their box's frame: (flat index, box index, u, v)."""
        sub = np.flatnonzero(ids)
        k = ids.ravel()[sub] - 1
        rows, cols = np.divmod(sub, ids.shape[1])
        rows += win[0].start
        cols += win[1].start
        x = self.transform.c + (cols + 0.5) * self.px
        y = self.transform.f - (rows + 0.5) * self.px
        cx = np.array([b.cx for b in boxes])[k]
        cy = np.array([b.cy for b in boxes])[k]
        ang = np.array([b.angle for b in boxes])[k]
        ca, sa = np.cos(ang), np.sin(ang)
        dx, dy = x - cx, y - cy
        u = (dx * ca + dy * sa).astype(np.float32)
        return rows * self.w + cols, k, u, (dy * ca - dx * sa).astype(np.float32)

    def set_flat(self, flat: np.ndarray, rgb: np.ndarray) -> None:
        self.img.reshape(-1, 3)[flat] = rgb


def _sun(town: Town) -> np.ndarray:
    """Unit vector towards the sun (east, north); shadows point the other way."""
    s = -np.asarray(town.shadow)
    return s / np.hypot(*s)


def _soft(cv: _Canvas, geoms: Sequence[shapely.Geometry], sigma: float,
          all_touched: bool = False) -> tuple[np.ndarray, np.ndarray, Window]:
    """Blurred coverage of `geoms` for soft-edged painting: (mask, alpha, window)."""
    m, win = cv.mask(geoms, all_touched)
    if m.size == 0:
        return m, m.astype(np.float32), win
    pad = int(3 * sigma / cv.px) + 2
    rows = slice(max(0, win[0].start - pad), min(cv.h, win[0].stop + pad))
    cols = slice(max(0, win[1].start - pad), min(cv.w, win[1].stop + pad))
    full = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.float32)
    full[win[0].start - rows.start: win[0].stop - rows.start,
         win[1].start - cols.start: win[1].stop - cols.start] = m
    alpha = cv2.GaussianBlur(full, (0, 0), sigma / cv.px)
    return alpha > 0.01, alpha, (rows, cols)


def _ground(grid: Grid, town: Town, rng: np.random.Generator) -> np.ndarray:
    """Patchy grass, dry grass and shrubs, patches and dirt verges, at tile resolution.

    Everything here is soft-edged, so it is drawn without supersampling and upsampled.
    """
    cv = _Canvas(grid, rng, ss=1)
    dry = np.clip(0.45 + 0.3 * cv.noise(45) + 0.12 * cv.noise(10), 0, 1)[..., None]
    cv.img[:] = np.asarray(_GRASS, np.float32) * (1 - dry) + np.asarray(_DRY, np.float32) * dry
    cv.img *= (1 + 0.06 * cv.noise(4) + 0.05 * cv.noise(1.2))[..., None]
    full = (slice(0, cv.h), slice(0, cv.w))
    cv.paint(cv.noise(2.5) > 1.7, full, (52, 74, 38), 0.8)
    fine = 1 + 0.07 * cv.noise(1.5)
    colours = {"grass": (82, 122, 58), "park": (86, 126, 60), "soil": _SOIL,
               "industrial": (158, 124, 92), "wood": (56, 80, 40), "track": (170, 146, 112)}
    for kind in ("park", "grass", "industrial", "soil", "wood", "track"):
        geoms = [p.polygon for p in town.patches if p.kind == kind]
        if geoms:
            sel, alpha, win = _soft(cv, geoms, 1.2)
            cv.paint(sel, win, colours[kind], alpha * 0.9, fine)
    verges = [shapely.buffer(road_line(town, r), r.width / 2 + SHOULDER)
              for r in town.roads if r.highway in ("residential", "service")]
    if verges:
        sel, alpha, win = _soft(cv, verges, 0.9)
        cv.paint(sel, win, (162, 140, 110), alpha * 0.85, fine)
    return cv.img


def _roads(cv: _Canvas, town: Town) -> None:
    """Sidewalks, asphalt by class (bigger roads on top at junctions) and painted lines."""
    lines = {id(r): road_line(town, r) for r in town.roads}
    big = [r for r in town.roads if r.highway in ("primary", "tertiary")]
    fine = 1 + 0.03 * cv.noise(1.0)
    if big:
        sel, win = cv.mask([shapely.buffer(lines[id(r)], r.width / 2 + SHOULDER) for r in big])
        cv.paint(sel, win, (176, 172, 164), 1.0, fine)
    order = sorted(town.roads, key=lambda r: _ROAD_ORDER.index(r.highway))
    carriage = {id(r): shapely.buffer(lines[id(r)], r.width / 2) for r in order}
    ids, win = cv.burn((carriage[id(r)], _ROAD_ORDER.index(r.highway) + 1) for r in order)
    palette = np.array([(0, 0, 0)] + [_ASPHALT[h] for h in _ROAD_ORDER], np.float32)
    sel = ids > 0
    wear = (fine + 0.05 * cv.noise(6))[win][sel]
    cv.img[win][sel] = palette[ids[sel]] * wear[:, None]
    marks: list[shapely.Geometry] = []
    for r in big:
        others = shapely.union_all([carriage[id(o)] for o in order if o is not r]).buffer(1.0)
        line = lines[id(r)]
        paint = [_dashes(line, 3.0, 6.0)]
        if r.highway == "primary":
            paint += [line.offset_curve(s * (r.width / 2 - 0.5)) for s in (-1, 1)]
        marks.append(shapely.buffer(shapely.union_all(paint), 0.08, cap_style="flat")
                     .difference(others))
    if marks:
        cv.paint(*cv.mask(marks, all_touched=True), (226, 226, 220), 0.7)


def _dashes(line: LineString, on: float, off: float) -> shapely.Geometry:
    starts = np.arange(0.0, line.length - on, on + off)
    return shapely.union_all([substring(line, s, s + on) for s in starts])


def _paved(cv: _Canvas, town: Town) -> None:
    """Parking lots with bay lines, and tennis courts with their markings."""
    if town.parkings:
        tex = 1 + 0.05 * cv.noise(5) + 0.03 * cv.noise(1.0)
        cv.paint(*cv.mask([p.box.polygon() for p in town.parkings]), (122, 121, 118), 1.0, tex)
        lines = [b.polygon() for p in town.parkings for b in p.lines]
        cv.paint(*cv.mask(lines, all_touched=True), (228, 228, 224), 0.75)
    for court in town.courts:
        b = court.box
        outer, inner = ((176, 92, 66), (190, 102, 72)) if court.surface == "clay" else \
            ((58, 104, 82), (52, 86, 130))
        cv.paint(*cv.mask([b.polygon()]), outer)
        cv.paint(*cv.mask([Box(b.cx, b.cy, 23.77, 10.97, b.angle).polygon()]), inner)
        cv.paint(*cv.mask(_court_lines(b), all_touched=True), (235, 235, 230), 0.8)


def _court_lines(b: Box) -> list[Polygon]:
    c, s = math.cos(b.angle), math.sin(b.angle)

    def seg(u0: float, v0: float, u1: float, v1: float) -> Polygon:
        pts = [(b.cx + c * u - s * v, b.cy + s * u + c * v) for u, v in ((u0, v0), (u1, v1))]
        return shapely.buffer(LineString(pts), 0.06, cap_style="flat")

    hl, hw, sw = 23.77 / 2, 10.97 / 2, 8.23 / 2
    out = [seg(-hl, v, hl, v) for v in (-hw, hw, -sw, sw)]
    out += [seg(u, -hw, u, hw) for u in (-hl, hl)]
    out += [seg(u, -sw, u, sw) for u in (-6.4, 6.4)]
    out += [seg(-6.4, 0, 6.4, 0), seg(0, -hw - 0.9, 0, hw + 0.9)]
    return out


def _shadow_parts(poly: Polygon, offset: np.ndarray) -> list[Polygon]:
    """Pieces whose union is `poly` swept along `offset`: its shadow on flat ground."""
    parts = [poly, affinity.translate(poly, *offset)]
    for ring in (poly.exterior, *poly.interiors):
        pts = np.asarray(ring.coords)
        parts += [Polygon([a, b, b + offset, a + offset]) for a, b in itertools.pairwise(pts)]
    return parts


def _shadows(cv: _Canvas, town: Town) -> None:
    vec = np.asarray(town.shadow)
    geoms: list[Polygon] = []
    for b in town.buildings:
        geoms += _shadow_parts(b.footprint, vec * b.height)
    for p in town.props:
        geoms += _shadow_parts(p.footprint, vec * p.height)
    geoms += [affinity.translate(t.crown, *(vec * t.height * 0.85)) for t in town.trees]
    if not geoms:
        return
    _sel, alpha, win = _soft(cv, geoms, 0.5)
    tint = np.asarray((0.46, 0.5, 0.6), np.float32)
    cv.img[win] *= 1 - alpha[..., None] * (1 - tint)


def _props(cv: _Canvas, town: Town) -> None:
    """Cars, trucks and containers: windows on cars, ribs and edge shading on boxes."""
    boxes, colours, kinds = [], [], []
    for p in town.props:
        for i, (b, col) in enumerate(zip(p.parts, p.colours, strict=True)):
            boxes.append(b)
            colours.append(col)
            kinds.append({"car": 0, "container": 2}.get(p.kind, 1 if i == 0 else 2))
    if not boxes:
        return
    ids, win = cv.burn(((b.polygon(), i + 1) for i, b in enumerate(boxes)), dtype="int32")
    flat, k, u, v = cv.local(ids, win, boxes)
    hl = np.array([b.length / 2 for b in boxes], np.float32)[k]
    hw = np.array([b.width / 2 for b in boxes], np.float32)[k]
    kind = np.array(kinds)[k]
    un = u / hl
    light = 1 + 0.05 * cv.rng.standard_normal(flat.size).astype(np.float32)
    glass = (kind == 0) & (((un > 0.18) & (un < 0.5)) | ((un < -0.45) & (un > -0.7)))
    glass |= (kind == 1) & (un > 0.05)
    edge = np.minimum(hl - np.abs(u), hw - np.abs(v)) < 0.18
    ribs = (kind == 2) & (np.mod(u, 1.2) < 0.3)
    light = light * np.where(edge, 0.78, 1.0) * np.where(ribs, 0.9, 1.0)
    out = np.array(colours, np.float32)[k] * light[:, None]
    out[glass] = np.asarray((38, 42, 48), np.float32) * light[glass, None]
    cv.set_flat(flat, out)


def _roofs(cv: _Canvas, town: Town, sun: np.ndarray) -> None:
    """Pitched facets lit by the sun, ridges and hips, flat roofs with parapets, rusty sheets."""
    bld = town.buildings
    if not bld:
        return
    boxes = [bx for b in bld for bx in b.parts]
    owner = np.array([n for n, b in enumerate(bld) for _ in b.parts])
    shapes = [(bx.polygon(), i + 1) for i, bx in enumerate(boxes)]
    shapes += [(b.courtyard.polygon(), 0) for b in bld if b.courtyard is not None]
    ids, win = cv.burn(shapes, dtype="int32")
    flat, k, u, v = cv.local(ids, win, boxes)
    own = owner[k]
    kind = np.array([("gable", "hip", "flat", "metal").index(b.roof) for b in bld])[own]
    hl = np.array([bx.length / 2 for bx in boxes], np.float32)[k]
    hw = np.array([bx.width / 2 for bx in boxes], np.float32)[k]
    ang = np.array([bx.angle for bx in boxes], np.float32)[k]
    sun_t = np.cos(ang) * sun[0] + np.sin(ang) * sun[1]
    sun_n = -np.sin(ang) * sun[0] + np.cos(ang) * sun[1]
    au, av = np.abs(u), np.abs(v)
    end = (kind == 1) & (au - (hl - hw) > av)
    facet = np.where(end, np.sign(u) * sun_t, np.sign(v) * sun_n)
    light = np.where(kind == 2, 1 + 0.05 * u / hl, 1 + 0.26 * facet)
    pitched = kind != 2
    ridge = pitched & (av < 0.22) & (au < np.where(kind == 1, hl - hw + 0.2, hl))
    hips = (kind == 1) & (np.abs(au - (hl - hw) - av) < 0.2)
    edge = np.minimum(hl - au, hw - av)
    holes = [b.courtyard or Box(0, 0, 0, 0, 0) for b in bld]
    chl = np.array([c.length / 2 for c in holes], np.float32)[own]
    chw = np.array([c.width / 2 for c in holes], np.float32)[own]
    inner = np.where(chl > 0, np.maximum(au - chl, av - chw), 99)
    parapet = (kind == 2) & ((edge < 0.45) | (inner < 0.45))
    light *= np.where(ridge | hips, 1.14, 1.0) * np.where(parapet, 1.12, 1.0)
    light *= np.where(pitched & (edge < 0.3), 0.8, 1.0)
    mottle = cv.noise(2.0).ravel()[flat]
    grain = cv.rng.standard_normal(flat.size).astype(np.float32)
    out = np.array([b.colour for b in bld], np.float32)[own]
    out *= (light * (1 + 0.05 * mottle + 0.035 * grain))[:, None]
    rust = (kind == 3) & (cv.noise(1.5).ravel()[flat] > 0.6)
    out[rust] = out[rust] * 0.5 + np.asarray((118, 66, 42), np.float32) * light[rust, None] * 0.5
    cv.set_flat(flat, out)
    tanks = [b.footprint.representative_point().buffer(0.8, 8)
             for b in bld if b.roof == "flat" and b.id % 3 == 0]
    if tanks:  # black water tanks, common on flat roofs in the region
        cv.paint(*cv.mask(tanks), (30, 32, 34))


def _trees(cv: _Canvas, town: Town, sun: np.ndarray) -> None:
    """Crowns lit from the sun side with a clumpy leaf texture; tall trees drawn last."""
    trees = sorted(town.trees, key=lambda t: t.height)
    if not trees:
        return
    ids, win = cv.burn(((t.crown, i + 1) for i, t in enumerate(trees)), dtype="int32")
    flat, k, u, v = cv.local(ids, win, [Box(t.x, t.y, 1.0, 1.0, 0.0) for t in trees])
    radius = np.array([t.radius for t in trees], np.float32)[k]
    g = cv.rng.uniform(0, 1, len(trees))
    base = np.column_stack([44 + 24 * g, 72 + 30 * g, 34 + 14 * g]).astype(np.float32)[k]
    du, dv = u / radius, v / radius
    light = 0.85 + 0.3 * (du * sun[0] + dv * sun[1]) - 0.2 * (du * du + dv * dv)
    light *= 1 + 0.18 * cv.noise(1.2).ravel()[flat]
    cv.set_flat(flat, base * np.clip(light, 0.35, 1.5)[:, None])


def render_scene(town: Town, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 image of the whole plan on `grid`."""
    big = max(grid.width, grid.height) * SS > _MAX_SS_PX  # e.g. zoom 19: already sharp enough
    cv = _Canvas(grid, rng, 1 if big else SS)
    sun = _sun(town)
    ground = _ground(grid, town, rng)
    cv.img[:] = cv2.resize(ground, (cv.w, cv.h), interpolation=cv2.INTER_LINEAR)
    _roads(cv, town)
    _paved(cv, town)
    _shadows(cv, town)
    _props(cv, town)
    _roofs(cv, town, sun)
    _trees(cv, town, sun)
    img = cv2.resize(cv.img, (grid.width, grid.height), interpolation=cv2.INTER_AREA)
    img = cv2.GaussianBlur(img, (0, 0), 0.55)
    img = img * 0.93 + np.asarray((14, 14, 18), np.float32)  # atmospheric haze
    img += rng.normal(0, 2.2, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
