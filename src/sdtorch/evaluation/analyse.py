"""Read an image of the shapes world (`sdtorch.data.shapes`) back into a scene, without a neural network.

The reading follows the published specification: the background is the nearest of the three background
colours to the border pixels; objects are the connected regions that differ from it (specks removed, two
touching objects cut apart at the midline between them). For each object:

- colour: the nearest palette colour (teal included) to the median of its most saturated pixels;
- shape: a triangle (apex up) holds 3/4 of its mass in the lower half of its box, a circle or square 1/2;
  between those two, a square fills its bounding box (1) and a circle pi/4 of it;
- size: the side of a box that the covered area fills as the shape should (16 or 28 px at 64 px);
- position: the nearest of the five centres to the box centre.

Coverage is measured per pixel as where the pixel lies between the background and the object's colour,
so anti-aliased, blurred and noisy edges count by how much they are covered. Geometry is reported in the
specification's 64 px units whatever the image size. Thresholds sit halfway between the values they
separate, except where noted, so noisy or blurry generations are still read sensibly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEAL, Obj, Scene

PALETTE = {**COLORS, "teal": TEAL}
WORK_SIDE = 128  # larger images are box-filtered down to this side before reading (twice the spec's 64 px)
FOREGROUND = 40.0  # RGB distance from the background above which a pixel belongs to an object
# (the closest object/background pair, purple on gray, is 86 apart: a 47% edge pixel still counts)
MIN_AREA = 0.2 * SIZES["small"] ** 2  # components smaller than 20% of a small square are specks (64 px units)
SPLIT_SIDE = 40.0  # a component wider or taller than this (64 px units) holds two touching corner objects
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2  # 22 px: nearer small or nearer large
NOISE_FLOOR = 0.1  # coverage below this reads as background when measuring extents
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area over bounding-box area
# Mass in the lower half of the box minus the upper half, over all: 0.5 for a triangle, 0 for the others.
# Blur pushes a small triangle's down to about 0.3, while noise moves the others' by at most about 0.1.
TAPER_SPLIT = 0.2
FILL_SPLIT = (FILL["circle"] + FILL["square"]) / 2  # 0.89


@dataclass(frozen=True)
class Detection:
    """One object read from an image, with the measurements its labels were chosen from."""

    size: str
    color: str
    shape: str
    position: str
    rgb: tuple[int, int, int]  # median colour of its most saturated pixels
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in 64 px units
    area: float  # covered area in 64 px units (sum of per-pixel coverage); the size is read from it
    fill: float  # area / box area
    taper: float  # (lower-half mass - upper-half mass) / mass: 0 for circle and square, 0.5 for triangle

    def obj(self) -> Obj:
        return Obj(self.size, self.color, self.shape, self.position)


@dataclass(frozen=True)
class Analysis:
    """What `analyse` read: the background and the objects, in the order of POSITIONS."""

    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[Detection, ...]

    @property
    def scene(self) -> Scene:
        return Scene(tuple(d.obj() for d in self.objects), self.background)

    def caption(self) -> str:
        """The caption of what was read ("nothing on a ... background" when no object was found)."""
        return self.scene.caption() if self.objects else f"nothing on a {self.background} background"


# ---------------------------------------------------------------------------------------------------------
# Captions and grading


_OBJ = (rf"a ({'|'.join(SIZES)}) ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)}) "
        rf"in the ({'|'.join(POSITIONS)})")
_CAPTION = re.compile(rf"{_OBJ}(?: and {_OBJ})? on a ({'|'.join(BACKGROUNDS)}) background")


def parse_caption(caption: str) -> Scene:
    """The scene a caption of the grammar describes; ValueError for anything else."""
    m = _CAPTION.fullmatch(" ".join(caption.lower().split()).rstrip("."))
    if m is None:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    g = m.groups()
    objects = [Obj(*g[i:i + 4]) for i in (0, 4) if g[i] is not None]
    return Scene(tuple(objects), g[8])


def match(expected: Scene, result: Analysis | Scene) -> dict:
    """Per-attribute correctness of `result` against `expected`.

    Expected objects are paired with read objects at the same position first; any left over are paired
    with the nearest remaining read object (position then counts as wrong). Returns the background flag,
    one dict of color/shape/size/position flags per expected object, the counts of missing and extra
    objects, and `exact`: every attribute of every object and the background right, nothing extra.
    """
    found = list(result.scene.objects if isinstance(result, Analysis) else result.objects)
    pairs: list[Obj | None] = [None] * len(expected.objects)
    for i, e in enumerate(expected.objects):  # same position, preferring the most attributes in common
        same = [f for f in found if f.position == e.position]
        if same:
            best = max(same, key=lambda f: (f.color == e.color) + (f.shape == e.shape) + (f.size == e.size))
            pairs[i] = best
            found.remove(best)
    for i, e in enumerate(expected.objects):  # the rest: nearest remaining centre
        if pairs[i] is None and found:
            best = min(found, key=lambda f: _distance(POSITIONS[f.position], POSITIONS[e.position]))
            pairs[i] = best
            found.remove(best)
    objects = [{attr: f is not None and getattr(f, attr) == getattr(e, attr)
                for attr in ("color", "shape", "size", "position")}
               for e, f in zip(expected.objects, pairs)]
    background = result.background == expected.background
    missing = sum(f is None for f in pairs)
    exact = background and not found and all(all(o.values()) for o in objects)
    return {"background": background, "objects": objects, "missing": missing, "extra": len(found),
            "exact": exact}


def grade(image, caption: str | Scene) -> dict:
    """`match` of a caption (or scene) against what `analyse` reads from the image."""
    expected = parse_caption(caption) if isinstance(caption, str) else caption
    return match(expected, analyse(image))


def _distance(a, b) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


def _nearest(value, table: dict) -> str:
    """The key of `table` whose value (a number or a vector) is nearest to `value`."""
    v = np.asarray(value, np.float64)
    return min(table, key=lambda k: float(np.sum((v - np.asarray(table[k], np.float64)) ** 2)))


# ---------------------------------------------------------------------------------------------------------
# Reading an image


def analyse(image) -> Analysis:
    """Read an image (PIL, or an HxWx3 array of uint8 or floats in [0, 1]) back into background and objects."""
    a = _as_array(image)
    h, w, _ = a.shape
    sx, sy = w / 64, h / 64  # pixels per spec unit
    background, bg_rgb = _background(a, ring=max(1, round(2 * min(sx, sy))))
    dist = np.linalg.norm(a - bg_rgb, axis=-1)
    mask = dist > FOREGROUND
    cores = _split_touching(*_label(_opening(mask)), sx, sy)
    smooth = _box3(a)
    found = []
    for k in np.unique(cores[cores > 0]):
        core = cores == k
        if core.sum() < MIN_AREA * sx * sy:
            continue
        # Give back the thin tips (a triangle's apex) the opening took, but none of a neighbour's pixels;
        # the halo adds 2 spec px around, for the faint edges below the threshold.
        region = _dilate(core, 2) & mask & ((cores == 0) | core)
        halo = _dilate(region, max(1, round(2 * min(sx, sy)))) & ~_dilate((cores > 0) & ~core, 1)
        d = _measure(a, smooth, bg_rgb, region, halo, sx, sy)
        if d is not None:
            found.append(d)
    order = list(POSITIONS)
    found.sort(key=lambda d: (order.index(d.position), d.box))
    return Analysis(background, tuple(int(round(c)) for c in bg_rgb), tuple(found))


def _as_array(image) -> np.ndarray:
    """float64 HxWx3 in 0..255; sides above WORK_SIDE are box-filtered down to it."""
    if not isinstance(image, Image.Image):
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise ValueError(f"expected an HxWx3 image array, got shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(np.asarray(a, np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round()
        image = Image.fromarray(a[..., :3].astype(np.uint8))
    image = image.convert("RGB")
    scale = WORK_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BOX)
    return np.asarray(image, np.float64)


def _background(a: np.ndarray, ring: int) -> tuple[str, np.ndarray]:
    """Each border pixel votes for its nearest background colour; the winner's voters give its exact RGB."""
    border = np.concatenate([a[:ring].reshape(-1, 3), a[-ring:].reshape(-1, 3),
                             a[:, :ring].reshape(-1, 3), a[:, -ring:].reshape(-1, 3)])
    names = list(BACKGROUNDS)
    refs = np.array([BACKGROUNDS[n] for n in names], np.float64)
    votes = np.argmin(((border[:, None] - refs[None]) ** 2).sum(-1), axis=1)
    winner = int(np.bincount(votes, minlength=len(names)).argmax())
    return names[winner], np.median(border[votes == winner], axis=0)


def _measure(a, smooth, bg_rgb, region, halo, sx, sy) -> Detection | None:
    """Colour, size, position and shape of one object from its pixels (`region`) and surroundings (`halo`)."""
    # Colour: the median of the 30% of pixels that differ most from the background, so that blur (which
    # mixes the background into the edges and into thin parts) does not pull it towards the background.
    # They are ranked on a 3x3-averaged copy, so that per-pixel noise does not choose them.
    dist = np.linalg.norm(smooth[region] - bg_rgb, axis=-1)
    rgb = np.median(a[region][dist >= np.quantile(dist, 0.7)], axis=0)
    # Per-pixel coverage: where the pixel sits between the background and the object's colour. The mass
    # sums it unclipped over the halo (the object, its blurred skirt and a margin of background), so that
    # noise averages out and blur, which spreads coverage but keeps its sum, changes nothing.
    axis = (rgb - bg_rgb) / max(float((rgb - bg_rgb) @ (rgb - bg_rgb)), 1e-6)
    alpha = ((a - bg_rgb) @ axis) * halo
    mass = float(alpha.sum())
    if mass < 1:
        return None
    # Extent along each axis from the projection profiles: the second-largest coverage in each column and
    # row, which weighs anti-aliased edges by their coverage. Coverage comes from the 3x3-averaged copy and
    # is stretched so that NOISE_FLOOR reads 0 and 1 - NOISE_FLOOR reads 1: symmetric about one half, so an
    # edge keeps its sum on average, while faint noise in the halo counts for nothing.
    cover = np.clip(((smooth - bg_rgb) @ axis - NOISE_FLOOR) / (1 - 2 * NOISE_FLOOR), 0, 1) * halo
    cols, rows = np.sort(cover, 0)[-2], np.sort(cover, 1)[:, -2]
    side_x, side_y = float(cols.sum()), float(rows.sum())
    if min(side_x, side_y) < 1:
        return None
    x, y = np.arange(len(cols)) + 0.5, np.arange(len(rows)) + 0.5
    cx, cy = float(cols @ x) / side_x, float(rows @ y) / side_y
    # Lower-half mass minus upper-half mass; a pixel straddling the middle line counts partly to each.
    taper = float((alpha.sum(1) * np.clip(2 * (y - cy), -1, 1)).sum()) / mass
    fill = mass / (side_x * side_y)
    shape = "triangle" if taper > TAPER_SPLIT else "square" if fill > FILL_SPLIT else "circle"
    # Size from the area the shape covers (blur moves coverage around but keeps its sum); a triangle
    # covers half its box, a circle pi/4.
    side = np.sqrt(mass / (sx * sy) / FILL[shape])
    return Detection(
        size="small" if side < SIZE_SPLIT else "large",
        color=_nearest(rgb, PALETTE),
        shape=shape,
        position=_nearest((cx / sx, cy / sy), POSITIONS),
        rgb=tuple(int(round(c)) for c in rgb),
        box=((cx - side_x / 2) / sx, (cy - side_y / 2) / sy, (cx + side_x / 2) / sx, (cy + side_y / 2) / sy),
        area=mass / (sx * sy), fill=fill, taper=taper)


# ---------------------------------------------------------------------------------------------------------
# Binary morphology and connected components in numpy


def _neighbourhood(m: np.ndarray, r: int, pad_value: bool):
    """The (2r+1)^2 shifted copies of a boolean mask, padded with `pad_value`."""
    p = np.pad(m, r, constant_values=pad_value)
    h, w = m.shape
    return [p[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)]


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter of an HxWxC image (edges replicated)."""
    h, w = a.shape[:2]
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9


def _erode(m: np.ndarray, r: int = 1) -> np.ndarray:
    return np.logical_and.reduce(_neighbourhood(m, r, True))  # the image edge does not erode (clipped objects)


def _dilate(m: np.ndarray, r: int = 1) -> np.ndarray:
    return np.logical_or.reduce(_neighbourhood(m, r, False))


def _opening(m: np.ndarray) -> np.ndarray:
    """Erode then dilate with a 3x3 square: removes specks and one-pixel threads."""
    return _dilate(_erode(m))


def _label(m: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components: labels 1..n (0 = not in the mask) and n.

    Every pixel starts with its own flat index; each round takes the smallest index among itself and its
    four neighbours, then jumps to the label of the pixel its label names (pointer jumping), until stable.
    """
    h, w = m.shape
    none = h * w
    lab = np.where(m, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(lab, 1, constant_values=none)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(m, new, none)
        flat = new.ravel()
        new[m] = flat[flat[m.ravel()]]
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab, return_inverse=True)
    labels = labels.reshape(h, w) + 1
    labels[~m] = 0
    return labels, len(roots) - (1 if (~m).any() else 0)


def _split_touching(labels: np.ndarray, n: int, sx: float, sy: float) -> np.ndarray:
    """Cut components too wide (or tall) for one object into pieces at the canvas midlines.

    Two large objects in neighbouring corners can touch once jittered (and two diagonal ones at the very
    centre); they always lie on either side of a midline. A component too wide is cut at its thinnest
    column within 4 spec px of the vertical midline (ties go to the middle); one too wide and too tall is
    cut along both midlines.
    """
    out = labels.copy()
    next_id = n + 1
    for k in range(1, n + 1):
        comp = labels == k
        ys, xs = np.nonzero(comp)
        wide = (xs.max() - xs.min() + 1) / sx > SPLIT_SIDE
        tall = (ys.max() - ys.min() + 1) / sy > SPLIT_SIDE
        if not (wide or tall):
            continue
        cut = comp.copy()
        if wide:
            cut[:, _valley(comp.sum(0), 32 * sx, 0 if tall else 4 * sx)] = False
        if tall:
            cut[_valley(comp.sum(1), 32 * sy, 0 if wide else 4 * sy), :] = False
        parts, m = _label(_opening(cut))  # the opening drops thin slivers one object left across the cut
        out[comp] = 0
        for j in range(1, m + 1):
            out[parts == j] = next_id
            next_id += 1
    return out


def _valley(counts: np.ndarray, mid: float, reach: float) -> int:
    """The index within `reach` of `mid` with the smallest count, nearest `mid` among equals."""
    lo, hi = max(0, int(np.floor(mid - reach))), min(len(counts) - 1, int(np.ceil(mid + reach)))
    return min(range(lo, hi + 1), key=lambda c: (counts[c], abs(c + 0.5 - mid)))
