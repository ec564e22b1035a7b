"""Grading class-conditional and unconditional shapes models (`sdtorch eval shapes` on such a model).

A class model's classes are colour-shape pairs named as `data.shapes.class_name` does ("red-circle"). Each
class is drawn `n_per_class` times; an image is right ("exact") when the analyser reads exactly one object
whose colour and shape are the class's (size, position and background are the model's free choice).

An unconditional model is drawn `n_images` times; an image is "valid" when it reads as a scene of the world
with one object: exactly one object, drawn cleanly (its colour within `CLEAN_RGB` of the palette colour it
reads as, so a muddy mix of two colours does not count), and a colour-shape pair the training data shows.
The report also counts which pairs came out, to show whether the model covers them all.

Both reports carry the same criterion applied to the training data's own renders passed through the
model's autoencoder ("autoencoder"): the ceiling the autoencoder sets.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np

from ..data.shapes import SEEN_PAIRS, class_name, class_scene, parse_class_name, render
from ..errors import SDTorchError
from ..fileio import atomic_folder
from .analyse import PALETTE, analyse

CLEAN_RGB = 40.0  # RGB distance: FOREGROUND's bound, half the closest palette pair (purple and blue, 93 apart)
GRID_COLUMNS = 10  # images per row of a class grid


def class_pairs(model) -> list[tuple[str, str]]:
    """(colour, shape) of each class of a class-conditional shapes model, label order; an SDTorchError if its
    classes are not named as colour-shape pairs."""
    names = model.class_names or []
    pairs = [parse_class_name(n) for n in names]
    if not names or None in pairs:
        raise SDTorchError(f"the model {model.name} does not name its classes as shapes-world colour-shape pairs "
                           f"(red-circle, ...): `eval shapes` cannot tell what each class should draw")
    return pairs


def read_one(image) -> dict:
    """What the analyser reads: the caption, the (colour, shape) when exactly one object is read (else None),
    and whether that object is drawn cleanly (`CLEAN_RGB`)."""
    result = analyse(image)
    if len(result.objects) != 1:
        return {"read": result.caption(), "pair": None, "clean": False}
    d = result.objects[0]
    distance = float(np.linalg.norm(np.subtract(d.rgb, PALETTE[d.color])))
    return {"read": result.caption(), "pair": (d.color, d.shape), "clean": distance <= CLEAN_RGB}


def _roundtrip(vae, color: str, shape: str, rng: random.Random, size: int):
    import torch

    from ..generation import decode
    from ..images import to_pil, to_tensor

    p = next(vae.parameters())
    image = to_tensor(render(class_scene(rng, color, shape), size, rng)).to(p.device, p.dtype)
    with torch.no_grad():
        return to_pil(decode(vae, vae.encode(image).mode()))[0]


def _rate(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


def evaluate_classes(model, *, sampler: str, steps: int, guidance: float, seed: int = 0, n_per_class: int = 20,
                     progress: bool = True) -> tuple[dict, list, list[str], list[bool]]:
    """Draw each class n_per_class times (image k of class c from seed + c * n_per_class + k) and grade them.
    Returns the report and, for the grid, the images, their captions and whether each was right."""
    from tqdm.auto import tqdm

    pairs, side = class_pairs(model), model.config.sample_size
    records, images = [], []
    todo = [(label, k) for label in range(len(pairs)) for k in range(n_per_class)]
    for label, k in tqdm(todo, desc="evaluate-classes", disable=not progress):
        s = seed + label * n_per_class + k
        image = model.txt2img(class_label=label, steps=steps, sampler=sampler, guidance=guidance, seed=s,
                              width=side, height=side)[0]
        got = read_one(image)
        records.append({"class": model.class_name(label), "seed": s, "read": got["read"],
                        "exact": got["pair"] == pairs[label]})
        images.append(image)
    classes = {}
    for label, pair in enumerate(pairs):
        mine = [r for r in records if r["class"] == model.class_name(label)]
        classes[model.class_name(label)] = _rate(sum(r["exact"] for r in mine), len(mine))
    ceiling = []  # the same criterion on renders of each class through the autoencoder
    for label, (color, shape) in enumerate(pairs):
        for k in range(n_per_class):
            s = seed + label * n_per_class + k
            ceiling.append(read_one(_roundtrip(model.vae, color, shape, random.Random(s), side))["pair"]
                           == (color, shape))
    report = {"settings": _settings(model, sampler, steps, guidance, seed) | {"n_per_class": n_per_class},
              "overall": {"exact": _rate(sum(r["exact"] for r in records), len(records))},
              "classes": classes, "autoencoder": {"exact": _rate(sum(ceiling), len(ceiling))}, "items": records}
    return report, images, [r["class"] for r in records], [r["exact"] for r in records]


def evaluate_unconditional(model, *, sampler: str, steps: int, seed: int = 0, n_images: int = 200,
                           progress: bool = True) -> tuple[dict, list, list[str], list[bool]]:
    """Draw n_images (seed + i) and grade each as a valid one-object scene of the training data's pairs."""
    from tqdm.auto import tqdm

    side, seen = model.config.sample_size, set(SEEN_PAIRS)
    records, images = [], []
    for i in tqdm(range(n_images), desc="evaluate-unconditional", disable=not progress):
        image = model.txt2img(steps=steps, sampler=sampler, guidance=1.0, seed=seed + i, width=side, height=side)[0]
        got = read_one(image)
        valid = got["pair"] in seen and got["clean"]
        records.append({"seed": seed + i, "read": got["read"], "valid": valid,
                        "pair": class_name(*got["pair"]) if got["pair"] else None})
        images.append(image)
    counts = Counter(r["pair"] for r in records if r["valid"])
    rng = random.Random(seed)
    ceiling = []
    for i in range(n_images):
        color, shape = SEEN_PAIRS[i % len(SEEN_PAIRS)]
        got = read_one(_roundtrip(model.vae, color, shape, rng, side))
        ceiling.append(got["pair"] == (color, shape) and got["clean"])
    report = {"settings": _settings(model, sampler, steps, 1.0, seed) | {"n_images": n_images},
              "overall": {"valid": _rate(sum(r["valid"] for r in records), len(records)),
                          "pairs_drawn": len(counts), "pairs_seen_in_training": len(SEEN_PAIRS)},
              "pairs": {class_name(*p): counts.get(class_name(*p), 0) for p in SEEN_PAIRS},
              "autoencoder": {"valid": _rate(sum(ceiling), len(ceiling))}, "items": records}
    return report, images, [r["read"] for r in records], [r["valid"] for r in records]


def _settings(model, sampler, steps, guidance, seed) -> dict:
    return {"model": getattr(model, "name", ""), "conditioning": model.config.unet.conditioning, "sampler": sampler,
            "steps": steps, "guidance": guidance, "seed": seed, "size": model.config.sample_size}


def write_report(out_dir, report: dict, images: list, captions: list[str], ok: list[bool]) -> None:
    """report.json and contact_sheet.png (green frame: right, red: not; a class's images in a row), whole."""
    from .grader import contact_sheet

    per_row = report["settings"].get("n_per_class", GRID_COLUMNS)
    with atomic_folder(out_dir) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        contact_sheet(images, captions, ok, columns=min(per_row, GRID_COLUMNS), tile=96).save(
            tmp / "contact_sheet.png")
