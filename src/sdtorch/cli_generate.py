"""`sdtorch generate | img2img | inpaint | replay | samplers`: PNG files with A1111's parameters chunk.

Every argument is checked before the model loads, and images are written only after all of them
were generated (each through a temporary file and a rename), so a failure leaves no partial output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from . import infotext
from .errors import SDTorchError


def add_generation_flags(p: argparse.ArgumentParser, strength: bool = False) -> None:
    p.add_argument("--model", "-m", default="shapes",
                   help="a .safetensors/.ckpt file, a diffusers folder, or the built-in 'shapes' (default)")
    p.add_argument("--negative-prompt", "-n", default="")
    p.add_argument("--width", "-W", type=int, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--height", "-H", type=int, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--steps", "-s", type=int, help="default: the model's, else 20")
    p.add_argument("--sampler", help="see `sdtorch samplers` (default: the model's, else dpmpp_2m)")
    p.add_argument("--karras", action="store_true", help="Karras et al. 2022 noise levels")
    p.add_argument("--guidance", "--cfg", "-g", type=float,
                   help="classifier-free guidance scale (default: the model's, else 7.5)")
    p.add_argument("--seed", type=int, help="image i uses seed + i (default: random)")
    p.add_argument("--batch", "-b", type=int, default=1, help="number of images")
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="load in this dtype (default: the file's)")
    p.add_argument("--output", "-o", default="sdtorch-{seed}.png",
                   help="PNG path; {seed} is replaced per image, else -0, -1, ... are added for a batch")
    if strength:
        p.add_argument("--strength", type=float, default=0.75, help="img2img: 0 keeps the image, 1 replaces it")


def output_paths(pattern: str, seeds: list[int]) -> list[Path]:
    if "{seed}" in pattern:
        paths = [Path(pattern.format(seed=s)) for s in seeds]
    elif len(seeds) == 1:
        paths = [Path(pattern)]
    else:
        p = Path(pattern)
        paths = [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(len(seeds))]
    for p in paths:
        if p.suffix.lower() != ".png":
            raise SDTorchError(f"{p}: output must be a .png file")
        if not p.parent.is_dir():
            raise SDTorchError(f"{p}: folder {p.parent} does not exist")
    return paths


def _request(args, strength: float = 1.0):
    from .generation import Request, new_seed
    from .pipeline import GENERATION_DEFAULTS

    seed = new_seed() if args.seed is None else args.seed
    given = {k: getattr(args, k) for k in GENERATION_DEFAULTS if getattr(args, k) is not None}
    req = Request(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width or 512,
                  height=args.height or 512, seed=seed, batch_size=args.batch, karras=args.karras, strength=strength,
                  clip_skip=args.clip_skip, **given)
    req.validate()  # before the model loads; the model's size and defaults fill in what was not given later
    return req


def _save(images, paths, texts) -> None:
    from PIL.PngImagePlugin import PngInfo

    for image, path, text in zip(images, paths, texts):
        info = PngInfo()
        info.add_text("parameters", text)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
        print(f"wrote {path}")


def run(args, kind: str) -> None:
    from .images import open_image
    from .pipeline import GENERATION_DEFAULTS, load

    req = _request(args, getattr(args, "strength", 1.0))
    seeds = [req.seed + i for i in range(req.batch_size)]
    paths = output_paths(args.output, seeds)
    for name in ("image", "mask"):
        if getattr(args, name, None) is not None:
            open_image(getattr(args, name))  # fail on an unreadable image before the model loads
    model = load(args.model, dtype=args.dtype)
    req = dataclasses.replace(req, **{k: model.default(k) for k in GENERATION_DEFAULTS if getattr(args, k) is None})
    common = dict(negative_prompt=req.negative_prompt, width=args.width, height=args.height, steps=req.steps,
                  guidance=req.guidance, sampler=req.sampler, seed=req.seed, batch_size=req.batch_size,
                  karras=req.karras, clip_skip=req.clip_skip, progress=True)
    if kind == "txt2img":
        images = model.txt2img(req.prompt, **common)
    elif kind == "img2img":
        images = model.img2img(args.image, req.prompt, strength=req.strength, **common)
    elif kind == "outpaint":
        left, top, right, bottom = args.pad
        images = model.outpaint(args.image, req.prompt, left=left, top=top, right=right, bottom=bottom, **common)
    else:
        images = model.inpaint(args.image, args.mask, req.prompt, **common)
    digest = infotext.model_hash(args.model)
    texts = [infotext.build(req.prompt, req.negative_prompt, {
        "Steps": req.steps, "Sampler": infotext.A1111_NAMES[req.sampler],
        "Schedule type": "Karras" if req.karras else None, "CFG scale": req.guidance, "Seed": seed,
        "Size": f"{im.width}x{im.height}", "Model hash": digest, "Model": args.model,
        "Denoising strength": req.strength if kind == "img2img" else None,
        "Clip skip": req.clip_skip if req.clip_skip != 1 else None, "Mode": None if kind == "txt2img" else kind,
    }) for im, seed in zip(images, seeds)]
    _save(images, paths, texts)


def replay(args) -> None:
    """Read an image's parameters and make the text-to-image run again."""
    from .images import open_image

    open_image(args.image)
    from PIL import Image

    with Image.open(args.image) as im:
        text = im.info.get("parameters")
    if not text:
        raise SDTorchError(f"{args.image}: no 'parameters' text in this PNG (not made by sdtorch or A1111)")
    prompt, negative, f = infotext.parse(text)
    if f.get("Mode") or "Denoising strength" in f:
        raise SDTorchError(f"{args.image}: made by {f.get('Mode', 'img2img')}; replay reproduces text-to-image "
                           "runs only (rerun that command with its source image)")
    sampler_name, karras = f.get("Sampler", ""), f.get("Schedule type") == "Karras"
    if sampler_name.endswith(" Karras"):  # older A1111 infotexts name the schedule in the sampler
        sampler_name, karras = sampler_name[: -len(" Karras")], True
    if sampler_name not in infotext.SDTORCH_NAMES:
        raise SDTorchError(f"{args.image}: sampler {sampler_name!r} is not one sdtorch has "
                           f"({', '.join(infotext.A1111_NAMES.values())})")
    from .pipeline import builtin_path

    model_path = args.model or f.get("Model")
    if not model_path or not (Path(model_path).exists() or builtin_path(model_path)):
        raise SDTorchError(f"{args.image}: model {model_path!r} not found; pass --model")
    if f.get("Model hash") and infotext.model_hash(model_path) != f["Model hash"]:
        print(f"sdtorch: warning: {model_path} has hash {infotext.model_hash(model_path)}, the image was made "
              f"with {f['Model hash']}; the result will differ", file=sys.stderr)
    try:
        width, height = (int(v) for v in f["Size"].split("x"))
        args = argparse.Namespace(prompt=prompt, negative_prompt=negative, width=width, height=height,
                                  steps=int(f["Steps"]), guidance=float(f["CFG scale"]),
                                  sampler=infotext.SDTORCH_NAMES[sampler_name], seed=int(f["Seed"]), batch=1,
                                  karras=karras, clip_skip=int(f.get("Clip skip", 1)), dtype=None,
                                  model=model_path, output=args.output or str(Path(args.image).with_suffix(""))
                                  + "-replay.png")
    except (KeyError, ValueError) as e:
        raise SDTorchError(f"{args.image}: incomplete or malformed parameters ({e})") from None
    run(args, "txt2img")


def samplers(args) -> None:
    from .sampling import SAMPLERS

    for name, fn in SAMPLERS.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<14}{infotext.A1111_NAMES[name]:<14}{summary}")


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="text to image")
    p.add_argument("prompt")
    add_generation_flags(p)
    p.set_defaults(func=lambda a: run(a, "txt2img"))

    p = sub.add_parser("img2img", help="image to image")
    p.add_argument("image")
    p.add_argument("prompt")
    add_generation_flags(p, strength=True)
    p.set_defaults(func=lambda a: run(a, "img2img"))

    p = sub.add_parser("inpaint", help="repaint where the mask is white")
    p.add_argument("image")
    p.add_argument("mask")
    p.add_argument("prompt")
    add_generation_flags(p)
    p.set_defaults(func=lambda a: run(a, "inpaint"))

    p = sub.add_parser("outpaint", help="extend the canvas: pad the image, then inpaint the new area")
    p.add_argument("image")
    p.add_argument("prompt")
    p.add_argument("--pad", type=int, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"), required=True,
                   help="pixels to add on each side (the new size must stay a multiple of 8)")
    add_generation_flags(p)
    p.set_defaults(func=lambda a: run(a, "outpaint"))

    p = sub.add_parser("replay", help="regenerate a PNG from its parameters text, bit-identically on the CPU")
    p.add_argument("image")
    p.add_argument("--model", "-m", help="the model (default: the path recorded in the image)")
    p.add_argument("--output", "-o", help="default: IMAGE-replay.png")
    p.set_defaults(func=replay)

    p = sub.add_parser("samplers", help="list the samplers")
    p.set_defaults(func=samplers)
