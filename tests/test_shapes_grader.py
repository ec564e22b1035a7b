"""The shapes-world grader: the analyser reads the generator's own renders back exactly, survives mild noise
and blur, notices every wrong attribute; the evaluation runs end to end and counts correctly."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import sdtorch
from sdtorch.data.shapes import (BACKGROUNDS, COLORS, CORNERS, HELD_OUT, POSITIONS, SHAPES, SIZES, TEAL, Obj, Scene,
                                 random_scene, render)
from sdtorch.evaluation.analyse import analyse, grade, match, parse_caption
from sdtorch.evaluation import (ATTRIBUTES, SPLITS, autoencoder_roundtrip, evaluate_shapes, shapes_prompts,
                                validate_analyser)
from sdtorch.pipeline import GENERATION_DEFAULTS

ALL_COLORS = (*COLORS, "teal")


def scenes(n: int, seed: int):
    """Random scenes of every kind: one or two objects, teal and held-out pairs included."""
    rng = random.Random(seed)
    return [random_scene(rng, colors=ALL_COLORS, held_out=rng.random() < 0.25) for _ in range(n)]


def exact_rate(images_and_scenes) -> float:
    results = [match(scene, analyse(image))["exact"] for image, scene in images_and_scenes]
    return sum(results) / len(results)


# --------------------------------------------------------------------------------------------------------
# The generator's own renders


@pytest.mark.parametrize("size", [64, 128])
def test_validation_on_renders(size):
    assert validate_analyser(n=1000, seed=size, size=size) >= 0.99


def test_every_attribute_read_on_clean_renders():
    """Every colour, shape, size, position and background, without jitter, read exactly."""
    for i, (color, shape) in enumerate((c, s) for c in ALL_COLORS for s in SHAPES):
        for j, position in enumerate(POSITIONS):
            background = [b for b in BACKGROUNDS if BACKGROUNDS[b] != (TEAL if color == "teal" else COLORS[color])]
            scene = Scene((Obj(list(SIZES)[(i + j) % 2], color, shape, position),), background[(i + j) % 2])
            result = analyse(render(scene))
            assert result.scene == scene, (scene.caption(), result.caption())


def test_array_inputs_and_other_sizes():
    scene = Scene((Obj("large", "orange", "triangle", "top left"), Obj("small", "teal", "circle", "bottom right")),
                  "gray")
    image = render(scene, 64, random.Random(3))
    a = np.asarray(image)
    assert analyse(a).scene == analyse(a / 255.0).scene == analyse(image).scene == scene
    assert analyse(np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])).scene == scene  # RGBA
    for size in (48, 96, 256, 512):
        assert analyse(render(scene, size, random.Random(size))).scene == scene, size
    result = analyse(image)
    assert [d.box[0] < 32 for d in result.objects] == [True, False]  # geometry in 64 px units


# --------------------------------------------------------------------------------------------------------
# Robustness: generated images are noisy, blurry approximations


def add_noise(image: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(image, np.float64) + rng.normal(0, std, (image.height, image.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("size", [64, 128])
def test_survives_mild_noise_and_blur(size):
    rng, noise = random.Random(size), np.random.default_rng(size)
    items = [(render(s, size, rng), s) for s in scenes(300, seed=size + 1)]
    blur = ImageFilter.GaussianBlur(0.8 * size / 64)
    assert exact_rate((add_noise(im, 8, noise), s) for im, s in items) >= 0.98
    assert exact_rate((im.filter(blur), s) for im, s in items) >= 0.98
    assert exact_rate((add_noise(im.filter(blur), 8, noise), s) for im, s in items) >= 0.98


def test_specks_and_empty_images():
    rng, noise = random.Random(5), np.random.default_rng(5)
    items = []
    for scene in scenes(100, seed=6):
        image = render(scene, 64, rng)
        draw = ImageDraw.Draw(image)
        for _ in range(4):  # 2x2 specks of random colours: far below 20% of a small object
            x, y = (int(v) for v in noise.integers(0, 62, 2))
            draw.rectangle([x, y, x + 1, y + 1], fill=tuple(int(v) for v in noise.integers(0, 256, 3)))
        items.append((image, scene))
    assert exact_rate(items) >= 0.98
    for background, rgb in BACKGROUNDS.items():
        result = analyse(Image.new("RGB", (64, 64), rgb))
        assert result.background == background and result.objects == ()
        expected = Scene((Obj("small", "red", "circle", "center"),), background)
        m = match(expected, result)
        assert m["missing"] == 1 and not m["exact"] and not any(m["objects"][0].values())


# --------------------------------------------------------------------------------------------------------
# Wrong attributes are noticed


def vary(scene: Scene, attr: str, rng: random.Random) -> Scene:
    """The scene with one attribute changed (of a random object, or the background), still drawable."""
    objs = list(scene.objects)
    if attr == "background":
        used = {(TEAL if o.color == "teal" else COLORS[o.color]) for o in objs}
        return Scene(scene.objects, rng.choice([b for b in BACKGROUNDS if b != scene.background
                                                and BACKGROUNDS[b] not in used]))
    j = rng.randrange(len(objs))
    o = objs[j]
    if attr == "color":
        new = rng.choice([c for c in ALL_COLORS if c != o.color and BACKGROUNDS[scene.background] != (
            TEAL if c == "teal" else COLORS[c])])
    elif attr == "shape":
        new = rng.choice([s for s in SHAPES if s != o.shape])
    elif attr == "size":
        new = next(s for s in SIZES if s != o.size)
    else:
        taken = {p.position for p in objs}
        new = rng.choice([p for p in (CORNERS if len(objs) == 2 else POSITIONS) if p not in taken])
    objs[j] = Obj(**{**o.__dict__, attr: new})
    return Scene(tuple(objs), scene.background)


@pytest.mark.parametrize("attr", ATTRIBUTES)
def test_wrong_attribute_is_detected(attr):
    rng = random.Random(ATTRIBUTES.index(attr))
    for scene in scenes(40, seed=10 + ATTRIBUTES.index(attr)):
        drawn = vary(scene, attr, rng)
        m = grade(render(drawn, 64, rng), scene)
        assert not m["exact"], (scene.caption(), drawn.caption())
        flags = [("background", m["background"])] + [
            (k, v) for e, d, o in zip(scene.objects, drawn.objects, m["objects"]) for k, v in o.items()
            if getattr(e, k) != getattr(d, k) or k != attr]
        changed = [k for k, v in flags if not v]
        assert changed == [attr], (scene.caption(), drawn.caption(), m)
        assert grade(render(scene, 64, rng), scene.caption())["exact"]


def test_missing_and_extra_objects():
    two = Scene((Obj("large", "red", "square", "top left"), Obj("small", "blue", "circle", "bottom right")),
                "white")
    one = Scene(two.objects[:1], "white")
    m = grade(render(one), two)
    assert m["missing"] == 1 and m["extra"] == 0 and not m["exact"]
    assert m["objects"][0] == dict(color=True, shape=True, size=True, position=True)
    m = grade(render(two), one)
    assert m["extra"] == 1 and m["missing"] == 0 and not m["exact"] and m["background"]
    assert m["objects"] == [dict(color=True, shape=True, size=True, position=True)]


# --------------------------------------------------------------------------------------------------------
# Captions


def test_parse_caption_round_trips():
    for scene in scenes(500, seed=20):
        assert parse_caption(scene.caption()) == scene
    scene = parse_caption("  A Small TEAL circle in the center on a black background. ")
    assert scene == Scene((Obj("small", "teal", "circle", "center"),), "black")
    for bad in ["", "a red square", "a huge red square in the center on a white background",
                "a small red square in the middle on a white background",
                "a small red square in the center on a pink background",
                "a small red square in the center and on a white background"]:
        with pytest.raises(ValueError):
            parse_caption(bad)


# --------------------------------------------------------------------------------------------------------
# The evaluation


def test_prompt_splits():
    items = shapes_prompts(seed=3, n_seen=40, n_heldout=8, n_two=20)
    assert items == shapes_prompts(seed=3, n_seen=40, n_heldout=8, n_two=20)
    by_split = {name: [s for split, s in items if split == name] for name in SPLITS}
    assert [len(v) for v in by_split.values()] == [40, 8, 20]
    pair = lambda o: (o.color, o.shape)  # noqa: E731
    assert all(len(s.objects) == 1 and pair(s.objects[0]) not in HELD_OUT for s in by_split["seen"])
    assert sorted(pair(s.objects[0]) for s in by_split["heldout"]) == sorted(list(HELD_OUT) * 2)
    assert all(len(s.objects) == 2 and not {pair(o) for o in s.objects} & HELD_OUT for s in by_split["two"])
    assert all(o.color != "teal" for _, s in items for o in s.objects)
    with_teal = shapes_prompts(seed=3, n_seen=40, n_heldout=8, n_two=20, n_teal=6)
    assert with_teal[:len(items)] == items  # asking for teal prompts leaves the others (and their seeds) as they were
    teal = with_teal[len(items):]
    assert len(teal) == 6 and all(split == "teal" and len(s.objects) == 1 and s.objects[0].color == "teal"
                                  for split, s in teal)


def test_teal_split_only_where_asked_and_graded():
    model = Painter()
    report = evaluate_shapes(model, steps=2, n_seen=1, n_heldout=0, n_two=0, n_teal=3, progress=False, roundtrip=False)
    assert report["splits"]["teal"]["n"] == 3 and report["splits"]["teal"]["exact"]["accuracy"] == 1.0
    assert report["settings"]["n_teal"] == 3 and report["settings"]["loras"] == []
    report = evaluate_shapes(Painter(), steps=2, n_seen=1, n_heldout=0, n_two=0, progress=False, roundtrip=False)
    assert "teal" not in report["splits"]


def test_make_shapes_colour_options(tmp_path):
    from sdtorch.data.shapes import TEAL_RADIUS, _rgb, make_shapes, random_color_scene

    rng = random.Random(0)
    scenes = [random_color_scene(rng, two=i % 2 == 1) for i in range(400)]
    colours = [o.color for s in scenes for o in s.objects] + [s.background for s in scenes]
    randoms = [c for c in colours if c.startswith("#")]
    assert 0.3 < len(randoms) / len(colours) < 0.7  # even odds of palette and random colours
    assert all(sum((a - b) ** 2 for a, b in zip(_rgb(c), TEAL)) > TEAL_RADIUS ** 2 for c in randoms)  # teal unseen
    make_shapes(tmp_path / "teal", 6, seed=2, progress=False, with_color="teal")
    captions = [(tmp_path / "teal" / f"{i:06d}.txt").read_text() for i in range(6)]
    assert all(parse_caption(c).objects[0].color == "teal" for c in captions)
    assert [len(parse_caption(c).objects) for c in captions] == [1, 2] * 3
    for i, c in enumerate(captions):  # the images read back as their captions
        assert grade(Image.open(tmp_path / "teal" / f"{i:06d}.png"), c)["exact"], c


class Painter:
    """A stand-in model that draws each prompt exactly (or with every object teal, a colour never asked for)."""

    def __init__(self, wrong_color: bool = False):
        self.config = SimpleNamespace(sample_size=64)
        self.name, self.wrong_color, self.calls = "painter", wrong_color, []

    def default(self, key):
        return GENERATION_DEFAULTS[key]

    def txt2img(self, prompt, *, steps, sampler, guidance, seed, width, height):
        self.calls.append(dict(steps=steps, sampler=sampler, guidance=guidance, seed=seed, width=width))
        scene = parse_caption(prompt)
        if self.wrong_color:
            scene = Scene(tuple(Obj(o.size, "teal", o.shape, o.position) for o in scene.objects), scene.background)
        return [render(scene, width, random.Random(seed))]


def test_evaluation_counts():
    model = Painter()
    report = evaluate_shapes(model, steps=3, sampler="euler", guidance=2.0, seed=7, n_seen=5, n_heldout=4,
                             n_two=3, progress=False, roundtrip=False)
    assert model.calls[0] == dict(steps=3, sampler="euler", guidance=2.0, seed=7, width=64)
    assert [c["seed"] for c in model.calls] == list(range(7, 19))
    for name, n in zip(SPLITS, (5, 4, 3)):
        s = report["splits"][name]
        assert s["n"] == n and s["exact"]["accuracy"] == 1.0
        assert all(s[a]["accuracy"] == 1.0 for a in ATTRIBUTES)
    assert report["splits"]["two"]["color"]["total"] == 6 and report["overall"]["n"] == 12
    painter = Painter(wrong_color=True)
    report = evaluate_shapes(painter, n_seen=3, n_heldout=2, n_two=2, progress=False, roundtrip=False)
    assert painter.calls[0] == dict(steps=20, sampler="dpmpp_2m", guidance=7.5, seed=0, width=64)  # the defaults
    assert report["settings"]["guidance"] == 7.5
    o = report["overall"]
    assert o["exact"]["correct"] == 0 and o["color"]["correct"] == 0
    assert o["shape"]["accuracy"] == o["size"]["accuracy"] == o["position"]["accuracy"] == 1.0


def test_evaluate_tiny_model_end_to_end(tmp_path):
    model = sdtorch.build("tiny")
    report = evaluate_shapes(model, steps=2, n_seen=1, n_heldout=1, n_two=1, out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved) == {"settings", "overall", "splits", "items", "autoencoder"}
    assert set(saved["splits"]) == set(saved["autoencoder"]["splits"]) == set(SPLITS)
    assert saved["autoencoder"]["overall"]["n"] == 3
    for s in saved["splits"].values():
        assert s["n"] == 1 and {"exact", *ATTRIBUTES, "missing", "extra"} <= set(s)
        assert all({"correct", "total", "accuracy"} == set(s[k]) for k in ("exact", *ATTRIBUTES))
    assert len(saved["items"]) == 3
    assert {"prompt", "split", "seed", "read", "exact", "background", "objects"} <= set(saved["items"][0])
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.width >= 3 * 128 and sheet.height > 128


class ToyVAE(torch.nn.Module):
    """encode/decode as the identity, or a decoder that paints everything mid-gray (`blank`)."""

    def __init__(self, blank: bool = False):
        super().__init__()
        self.blank, self.anchor = blank, torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return SimpleNamespace(mode=lambda: x.clone())

    def decode(self, z):
        return torch.zeros_like(z) if self.blank else z


def test_autoencoder_roundtrip_is_the_vae_ceiling():
    items = shapes_prompts(seed=3, n_seen=4, n_heldout=4, n_two=4)
    perfect = autoencoder_roundtrip(ToyVAE(), items, seed=3)
    assert perfect["overall"]["exact"]["accuracy"] == 1.0
    assert {name: s["n"] for name, s in perfect["splits"].items()} == {"seen": 4, "heldout": 4, "two": 4}
    blank = autoencoder_roundtrip(ToyVAE(blank=True), items, seed=3)
    assert blank["overall"]["exact"]["correct"] == 0 and blank["overall"]["missing"] == 16
