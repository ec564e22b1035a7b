"""The shapes world: captioned images of coloured circles, squares and triangles, rendered exactly to a
published specification so that independent graders can read them back.

At the default 64 px: palette red (220,40,40), green (40,170,60), blue (40,80,220), yellow (240,210,40),
orange (245,140,30), purple (140,60,180), white (245,245,245), black (25,25,25); backgrounds white,
gray (128,128,128), black; small = 16 px and large = 28 px bounding boxes (±1 px jitter); centres at top
left (16,16), top right (48,16), bottom left (16,48), bottom right (48,48), center (32,32) (±2 px jitter).
Triangles are isosceles with the base at the bottom. Edges are anti-aliased (rendered at 4x, box-filtered).
A `size` other than 64 scales every coordinate. The held-out colour-shape pairs never appear in
training data; teal (0,150,150) is reserved and appears only when asked for.

A colour may also be written "#rrggbb" (any RGB colour): `make_shapes(..., random_colors=True)` renders the
autoencoder's data so, objects and backgrounds in uniformly random colours (none within `TEAL_RADIUS` of
teal) as well as the palette, so that the autoencoder is a general image codec and not a palette codec.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "orange": (245, 140, 30), "purple": (140, 60, 180), "white": (245, 245, 245), "black": (25, 25, 25)}
TEAL = (0, 150, 150)  # reserved: never in the built-in model's training data
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 16, "large": 28}
POSITIONS = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
             "center": (32, 32)}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
HELD_OUT = {("green", "triangle"), ("purple", "circle"), ("orange", "square"), ("yellow", "square")}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    size: str
    color: str
    shape: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} in the {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"


TEAL_RADIUS = 40  # random colours keep this Euclidean RGB distance from teal, so teal stays unseen


def _rgb(color: str) -> tuple[int, int, int]:
    if color.startswith("#"):
        return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    return TEAL if color == "teal" else COLORS[color]


def _background_rgb(background: str) -> tuple[int, int, int]:
    return _rgb(background) if background.startswith("#") else BACKGROUNDS[background]


def random_color(rng: random.Random) -> str:
    """A colour uniform in the RGB cube outside the ball of radius `TEAL_RADIUS` around teal, as "#rrggbb"."""
    while True:
        rgb = tuple(rng.randrange(256) for _ in range(3))
        if sum((a - b) ** 2 for a, b in zip(rgb, TEAL)) > TEAL_RADIUS ** 2:
            return "#%02x%02x%02x" % rgb


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw a scene; `rng` adds the allowed jitter (±1 px size, ±2 px position, at 64 px)."""
    k = size / 64 * SUPERSAMPLE
    img = Image.new("RGB", (round(64 * k),) * 2, _background_rgb(scene.background))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        side = SIZES[o.size] + (rng.randint(-1, 1) if rng else 0)
        cx, cy = POSITIONS[o.position]
        if rng:
            cx, cy = cx + rng.randint(-2, 2), cy + rng.randint(-2, 2)
        x0, y0, x1, y1 = ((cx - side / 2) * k, (cy - side / 2) * k, (cx + side / 2) * k, (cy + side / 2) * k)
        fill = _rgb(o.color)
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:  # isosceles, apex up, base along the bottom of the box
            draw.polygon([(cx * k, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def allowed(color: str, shape: str, background: str, held_out: bool = False) -> bool:
    """Whether an object may appear: never the background's colour; held-out pairs only when asked."""
    return BACKGROUNDS[background] != _rgb(color) and ((color, shape) in HELD_OUT) == held_out


def random_scene(rng: random.Random, two: bool | None = None, colors=tuple(COLORS), held_out: bool = False) -> Scene:
    """A scene from the grammar: one object anywhere, or two objects in two different corners."""
    background = rng.choice(list(BACKGROUNDS))
    two = rng.random() < 0.5 if two is None else two
    positions = rng.sample(CORNERS, 2) if two else [rng.choice(list(POSITIONS))]
    objects = []
    for p in positions:
        while True:
            color, shape = rng.choice(colors), rng.choice(SHAPES)
            if allowed(color, shape, background, held_out and not objects):
                break
        objects.append(Obj(rng.choice(list(SIZES)), color, shape, p))
    return Scene(tuple(objects), background)


def random_color_scene(rng: random.Random, two: bool | None = None) -> Scene:
    """A scene of the grammar's layout whose background and objects are each, with even odds, a palette
    colour or a `random_color`; an object is never within 48 (RGB distance) of its background."""
    background = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else random_color(rng)
    scene = random_scene(rng, two=two)
    objects = []
    for o in scene.objects:
        while True:
            color = rng.choice(list(COLORS)) if rng.random() < 0.5 else random_color(rng)
            if sum((a - b) ** 2 for a, b in zip(_rgb(color), _background_rgb(background))) > 48 ** 2:
                break
        objects.append(Obj(o.size, color, o.shape, o.position))
    return Scene(tuple(objects), background)


MIN_SIZE, MAX_SIZE = 16, 1024  # canvas side: a small shape is 4 px at 16; 1024 renders a 4096 px supersample


# The classes of a class-conditional shapes model: the colour-shape pairs training may show (the held-out ones
# never), each named "colour-shape" (its folder in `make_shapes(..., classes=True)`); 20 of them.
SEEN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT)


def class_name(color: str, shape: str) -> str:
    return f"{color}-{shape}"


def parse_class_name(name: str) -> tuple[str, str] | None:
    """(colour, shape) of a class named as `class_name` does, or None for another name."""
    color, _, shape = name.partition("-")
    return (color, shape) if color in COLORS and shape in SHAPES else None


def class_scene(rng: random.Random, color: str, shape: str) -> Scene:
    """One object of the given colour and shape, its size, position and background drawn from the grammar."""
    background = rng.choice([b for b in BACKGROUNDS if allowed(color, shape, b, (color, shape) in HELD_OUT)])
    return Scene((Obj(rng.choice(list(SIZES)), color, shape, rng.choice(list(POSITIONS))),), background)


def check_make_shapes(count, seed, size, random_colors: bool = False, with_color: str | None = None,
                      classes: bool = False) -> None:
    """make-shapes' numbers, before any file is written: integers, at least one image, a supported size."""
    from ..errors import SDTorchError

    for name, value in (("count", count), ("seed", seed), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise SDTorchError(f"--{name} must be an integer, got {value!r}")
    if count < 1:
        raise SDTorchError(f"--count must be at least 1, got {count}")
    if with_color is not None and with_color != "teal" and with_color not in COLORS:
        raise SDTorchError(f"--with-color must be teal or a palette colour ({', '.join(COLORS)}), got {with_color!r}")
    if with_color is not None and random_colors:
        raise SDTorchError("--with-color and --random-colors cannot be combined")
    if classes and (random_colors or with_color is not None):
        raise SDTorchError("--classes draws the palette's seen colour-shape pairs: it cannot be combined with "
                           "--random-colors or --with-color")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise SDTorchError(f"--size must be from {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")


def with_color_scene(rng: random.Random, color: str, two: bool | None = None) -> Scene:
    """A scene of the grammar whose first object is `color` (teal, say); a second object, if any, is drawn from
    the palette as usual. Backgrounds of the same colour are never drawn."""
    while True:
        scene = random_scene(rng, two=two)
        if _background_rgb(scene.background) != _rgb(color):
            first = scene.objects[0]
            return Scene((Obj(first.size, color, first.shape, first.position), *scene.objects[1:]), scene.background)


def make_shapes(folder, count: int, seed: int = 0, size: int = 64, progress: bool = True,
                random_colors: bool = False, with_color: str | None = None, classes: bool = False) -> Path:
    """Write `count` images with same-name caption files (the trainers' image-folder format): half with
    one object, half with two, no held-out pair, no teal. Deterministic for a seed. With `random_colors`,
    the scenes of `random_color_scene` (the autoencoder's data; captions name colours as "#rrggbb"). With
    `with_color` (a palette colour or "teal"), every scene's first object has that colour (`with_color_scene`):
    the data for teaching a model a colour, teal being the one its training never showed. With `classes`, the
    data of a class-conditional model: one object per image, the seen pairs in turn (`SEEN_PAIRS`), each in
    its class's folder (`class_name`; the ImageFolder layout) and with no caption files.

    The folder is built under a temporary name and renamed into place, whole or not at all. An existing
    `folder` is replaced as a whole only when it is empty or an earlier make-shapes dataset (files named
    NNNNNN.png and NNNNNN.txt alone); any other folder is refused before anything is rendered."""
    from tqdm.auto import tqdm

    from ..fileio import atomic_folder, check_folder_destination

    check_make_shapes(count, seed, size, random_colors, with_color, classes)
    folder = check_folder_destination(folder, replaceable=is_shapes_dataset,
                                      what="a make-shapes dataset (only NNNNNN.png and NNNNNN.txt files, or "
                                      "class folders of NNNNNN.png files)")
    rng = random.Random(seed)
    with atomic_folder(folder) as tmp:
        for i in tqdm(range(count), desc="make-shapes", disable=not progress):
            if classes:
                color, shape = SEEN_PAIRS[i % len(SEEN_PAIRS)]
                (tmp / class_name(color, shape)).mkdir(exist_ok=True)
                render(class_scene(rng, color, shape), size, rng).save(tmp / class_name(color, shape) / f"{i:06d}.png")
                continue
            if with_color:
                scene = with_color_scene(rng, with_color, two=i % 2 == 1)
            else:
                scene = (random_color_scene if random_colors else random_scene)(rng, two=i % 2 == 1)
            render(scene, size, rng).save(tmp / f"{i:06d}.png")
            (tmp / f"{i:06d}.txt").write_text(scene.caption() + "\n")
    return folder


def is_shapes_dataset(folder: Path) -> bool:
    """A folder `make_shapes` wrote: numbered images and captions, or class folders of numbered images."""
    def is_class_folder(p: Path) -> bool:
        return (p.is_dir() and parse_class_name(p.name) is not None
                and all(f.is_file() and re.fullmatch(r"\d{6}\.png", f.name) for f in p.iterdir()))
    return all((p.is_file() and re.fullmatch(r"\d{6}\.(png|txt)", p.name)) or is_class_folder(p)
               for p in folder.iterdir())
