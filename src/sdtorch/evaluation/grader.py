"""Grading a model on the shapes world: generate an image for each of a seeded set of captions from the
grammar, read it back with the analyser (`sdtorch.evaluation.analyse`, no neural network) and count what came
out right, per split:

- seen: one object, colour-shape pairs that appear in training;
- heldout: one object, exactly the four held-out colour-shape pairs (compositional generalisation);
- two: two objects in two corners, seen pairs only (binding of attributes to objects);
- teal: one teal object (a colour the built-in model never saw; graded only when asked for, `n_teal`):
  whether a LoRA taught it the colour.
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..data.shapes import (BACKGROUNDS, COLORS, HELD_OUT, POSITIONS, SIZES, Obj, Scene, allowed, random_scene, render,
                          with_color_scene)
from ..fileio import atomic_folder, check_folder_destination
from .analyse import analyse, match

SPLITS = ("seen", "heldout", "two")  # always in a report
ASKED_SPLITS = ("teal",)  # in a report only where asked for
OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")  # counted per expected object
ATTRIBUTES = (*OBJECT_ATTRIBUTES, "background")  # background: counted per image


def shapes_prompts(seed: int = 0, n_seen: int = 60, n_heldout: int = 40, n_two: int = 60,
                   n_teal: int = 0) -> list[tuple[str, Scene]]:
    """(split, scene) pairs, deterministic for a seed; the held-out split cycles through the four pairs. The
    teal prompts come last, so asking for them leaves the other prompts (and their seeds) as they were."""
    rng = random.Random(seed)
    items = [("seen", random_scene(rng, two=False)) for _ in range(n_seen)]
    pairs = sorted(HELD_OUT)
    for i in range(n_heldout):
        color, shape = pairs[i % len(pairs)]
        background = rng.choice([b for b in BACKGROUNDS if allowed(color, shape, b, held_out=True)])
        obj = Obj(rng.choice(list(SIZES)), color, shape, rng.choice(list(POSITIONS)))
        items.append(("heldout", Scene((obj,), background)))
    items += [("two", random_scene(rng, two=True)) for _ in range(n_two)]
    items += [("teal", with_color_scene(rng, "teal", two=False)) for _ in range(n_teal)]
    return items


def check_shapes_eval(*, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                      seed: int = 0, n_seen: int = 60, n_heldout: int = 40, n_two: int = 60, n_teal: int = 0) -> None:
    """The grading settings, checked before the model loads: integer counts of 0 or more, not all 0, every
    prompt's seed (seed + i) in range, and a sampler, steps and guidance that a generation accepts
    (`Request.validate`; the bounds of the model's own schedule are checked when it generates)."""
    from ..errors import SDTorchError
    from ..generation import MAX_SEED, Request

    counts = {"--n-seen": n_seen, "--n-heldout": n_heldout, "--n-two": n_two, "--n-teal": n_teal}
    for name, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise SDTorchError(f"{name} must be an integer, 0 or more, got {n!r}")
    total = sum(counts.values())
    if total == 0:
        raise SDTorchError("--n-seen, --n-heldout, --n-two and --n-teal are all 0: there is nothing to grade")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - (total - 1):
        raise SDTorchError(f"--seed must be an integer from 0 to 2**64 - {total} (prompt i uses seed + i), "
                           f"got {seed!r}")
    given = {k: v for k, v in (("sampler", sampler), ("steps", steps), ("guidance", guidance)) if v is not None}
    Request(prompt="", seed=seed, **given).validate()


def evaluate_shapes(model, *, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                    seed: int = 0, n_seen: int = 60, n_heldout: int = 40, n_two: int = 60, n_teal: int = 0,
                    out_dir=None, progress: bool = True, roundtrip: bool = True) -> dict:
    """Generate one image per prompt (seed + i for the i-th), grade it, and summarise per split.

    sampler, steps and guidance left as None take the model's defaults (`model.default`).
    Returns {"settings", "overall", "splits": {split: summary}, "items": [one record per prompt]}; a summary
    holds n, exact and per-attribute {correct, total, accuracy}, plus missing and extra object counts. With
    `roundtrip`, also "autoencoder": the same summaries for each prompt's own render passed through the
    model's VAE (`autoencoder_roundtrip`), the ceiling the VAE sets on the generations' scores. With
    `out_dir`, also writes report.json and contact_sheet.png (green border: exact match, red: not) into that
    folder, whole or not at all (see `check_output_folder`, which runs first).
    """
    check_shapes_eval(sampler=sampler, steps=steps, guidance=guidance, seed=seed, n_seen=n_seen,
                      n_heldout=n_heldout, n_two=n_two, n_teal=n_teal)
    if out_dir is not None:
        check_output_folder(out_dir)
    from tqdm.auto import tqdm

    sampler, steps, guidance = (model.default(k) if v is None else v
                                for k, v in (("sampler", sampler), ("steps", steps), ("guidance", guidance)))
    side = model.config.sample_size
    items = shapes_prompts(seed, n_seen, n_heldout, n_two, n_teal)
    records, images = [], []
    for i, (split, scene) in enumerate(tqdm(items, desc="evaluate-shapes", disable=not progress)):
        prompt = scene.caption()
        image = model.txt2img(prompt, steps=steps, sampler=sampler, guidance=guidance, seed=seed + i,
                              width=side, height=side)[0]
        result = analyse(image)
        records.append({"index": i, "split": split, "prompt": prompt, "seed": seed + i, "read": result.caption(),
                        **match(scene, result)})
        images.append(image)
    report = {
        "settings": {"model": getattr(model, "name", ""), "sampler": sampler, "steps": steps, "guidance": guidance,
                     "seed": seed, "size": side, "n_seen": n_seen, "n_heldout": n_heldout, "n_two": n_two,
                     "n_teal": n_teal, "loras": _loras(model)},
        **summarise_splits(records),
        "items": records,
    }
    if roundtrip:
        report["autoencoder"] = autoencoder_roundtrip(model.vae, items, seed=seed, size=side)
    if out_dir is not None:
        with atomic_folder(out_dir) as tmp:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            contact_sheet(images, [r["prompt"] for r in records], [r["exact"] for r in records]).save(
                tmp / "contact_sheet.png")
    return report


def _loras(model) -> list[dict]:
    """The LoRAs loaded on `model` as the report records them (name, path, scale, A1111 hash)."""
    return [{"name": name, "path": str(Path(net.path).resolve()) if net.path else None, "scale": net.scale,
             "hash": net.hash} for name, net in getattr(model, "loras", {}).items()]


def check_output_folder(out_dir) -> Path:
    """`out_dir` can take an evaluation's folder (checked before any image is generated): it is written
    whole under a temporary name and renamed into place, replacing an empty folder or an earlier
    evaluation's (one holding report.json); any other existing folder is refused."""
    return check_folder_destination(out_dir, replaceable=lambda f: (f / "report.json").is_file(),
                                    what="an evaluation folder (no report.json)")


def autoencoder_roundtrip(vae, items: list[tuple[str, Scene]], seed: int = 0, size: int = 64) -> dict:
    """Render each (split, scene), encode it with `vae` (the posterior's mode), decode and grade it.

    What a generation can score at best if the UNet found the ideal latent: a VAE that cannot reproduce a
    scene (an unseen colour-shape pair, say) makes its prompt fail whatever the sampler does. The i-th
    render's jitter is seeded by seed + i. Returns {"overall", "splits"} summaries as in `evaluate_shapes`.
    """
    records = [{"split": split, **roundtrip(vae, scene, random.Random(seed + i), size)}
               for i, (split, scene) in enumerate(items)]
    return summarise_splits(records)


def roundtrip(vae, scene: Scene, rng: random.Random, size: int = 64) -> dict:
    """Render one scene (its jitter drawn from `rng`), encode it (the posterior's mode), decode it and
    grade the result against the scene: a `match` record."""
    import torch

    from ..generation import decode
    from ..images import to_pil, to_tensor

    p = next(vae.parameters())
    image = to_tensor(render(scene, size, rng)).to(p.device, p.dtype)
    with torch.no_grad():
        restored = decode(vae, vae.encode(image).mode())
    return match(scene, analyse(to_pil(restored)[0]))


def summarise_splits(records: list[dict]) -> dict:
    """{"overall": summary of all records, "splits": {split: summary of that split's records}}; the teal split
    only where it was asked for."""
    present = {r["split"] for r in records}
    names = [*SPLITS, *(n for n in ASKED_SPLITS if n in present)]
    return {"overall": summarise(records),
            "splits": {name: summarise([r for r in records if r["split"] == name]) for name in names}}


def summarise(records: list[dict]) -> dict:
    """Exact-match and per-attribute counts and accuracies over `match` records."""
    def count(correct: int, total: int) -> dict:
        return {"correct": correct, "total": total, "accuracy": correct / total if total else None}

    objects = [o for r in records for o in r["objects"]]
    summary = {"n": len(records), "exact": count(sum(r["exact"] for r in records), len(records))}
    for attr in OBJECT_ATTRIBUTES:
        summary[attr] = count(sum(o[attr] for o in objects), len(objects))
    summary["background"] = count(sum(r["background"] for r in records), len(records))
    summary["missing"] = sum(r["missing"] for r in records)
    summary["extra"] = sum(r["extra"] for r in records)
    return summary


def contact_sheet(images: list[Image.Image], captions: list[str], ok: list[bool], columns: int = 8,
                  tile: int = 128, border: int = 4) -> Image.Image:
    """A grid of images, each in a green (ok) or red frame with its caption in small text below."""
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    chars = max(8, int(tile / max(font.getlength("x"), 1)))
    wrapped = [textwrap.wrap(c, chars) for c in captions]
    text_h = line_h * max((len(w) for w in wrapped), default=1) + 4
    cell_w, cell_h = tile + 2 * border, tile + 2 * border + text_h
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (min(columns, max(1, len(images))) * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines, good) in enumerate(zip(images, wrapped, ok)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        draw.rectangle([x, y, x + cell_w - 1, y + tile + 2 * border - 1], fill=(40, 170, 60) if good else (220, 40, 40))
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x + border, y + border))
        for j, line in enumerate(lines):
            draw.text((x + border, y + tile + 2 * border + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def validate_analyser(n: int = 1000, seed: int = 0, size: int = 64) -> float:
    """The analyser's exact-match rate on `n` jittered renders of random scenes (every colour, teal and the
    held-out pairs included): how far its grades of generated images can be trusted."""
    rng = random.Random(seed)
    colors = (*COLORS, "teal")
    hits = 0
    for _ in range(n):
        scene = random_scene(rng, colors=colors, held_out=rng.random() < 0.25)
        hits += match(scene, analyse(render(scene, size, rng)))["exact"]
    return hits / n
