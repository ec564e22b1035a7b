"""`sdtorch generate | img2img | inpaint | outpaint | replay | samplers`: PNG files with A1111's parameters chunk.

Every argument, image and output name is checked before the model loads (`generation.resolve`,
`images.open_image`, `output_paths`), and images are written only after all of them were generated,
each through a temporary file renamed into place, so a failure leaves no partial output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import string
import sys
from pathlib import Path

from .. import infotext
from ..errors import SDTorchError
from ..fileio import check_file_destination, shown, write_all
from ..lora.prompt import applied_loras


def add_generation_flags(p: argparse.ArgumentParser, strength: bool = False) -> None:
    p.add_argument("--model", "-m", default="shapes",
                   help="a .safetensors/.ckpt file, a diffusers folder, or the built-in 'shapes' (default)")
    p.add_argument("--negative-prompt", "-n", default="",
                   help="what the images should not show (default: empty)")
    p.add_argument("--width", "-W", type=int, help="pixels, a multiple of 8 (default: the model's size, or the "
                   "source image's rounded down to a multiple of 8; the image is resized to it)")
    p.add_argument("--height", "-H", type=int, help="pixels, a multiple of 8 (default: as for --width)")
    p.add_argument("--steps", "-s", type=int, help="sampler steps (default: the model's, else 20); at most what the "
                   "model's schedule supports (999 of 1000 training steps, 998 for the DPM++ 2M samplers)")
    p.add_argument("--sampler", help="see `sdtorch samplers` (default: the model's, else dpmpp_2m)")
    p.add_argument("--karras", action="store_true", help="Karras et al. 2022 noise levels (default: off)")
    p.add_argument("--guidance", "--cfg", "-g", type=float,
                   help="classifier-free guidance scale, 0 to 100 (default: the model's, else 7.5)")
    p.add_argument("--seed", type=int, help="0 to 2**64 - 1; image i uses seed + i (default: random)")
    p.add_argument("--batch", "-b", type=int, default=1, help="number of images (default: 1)")
    p.add_argument("--batch-mode", choices=["per-image", "batched"], default="per-image",
                   help="per-image: each image denoised alone, bit-identical to a run of its seed alone; batched: "
                   "one network call a step for the whole batch, faster, the same images within float rounding "
                   "(default: per-image)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="encode and decode in overlapping 512 px tiles: far less memory for large images, close to "
                   "but not equal to an untiled decode (default: off)")
    p.add_argument("--clip-skip", type=int, default=1,
                   help="take the prompt from the text encoder's N-th layer from the end, 1 (the last) to the "
                   "number of layers (default: 1)")
    add_device_flags(p)
    p.add_argument("--output", "-o", default="sdtorch-{seed}.png",
                   help="PNG path; {seed} is replaced per image (a Python format field: {seed:06d} works; write "
                   "{{ and }} for braces), else -0, -1, ... are added for a batch (default: sdtorch-{seed}.png)")
    if strength:
        p.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 replaces it (default: 0.75)")
    add_lora_flags(p)


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE_OR_NAME[:SCALE]",
                   help="apply a LoRA: a file, or a name in the LoRA folder or among the built-in ones; SCALE "
                   "after the last ':' if it is a number (default 1); repeatable. A prompt may also name LoRAs as "
                   "A1111 does: <lora:NAME> or <lora:NAME:SCALE>")
    p.add_argument("--lora-dir", metavar="DIR", help="the folder where LoRA names are looked up (default: "
                   "$SDTORCH_LORAS, else ~/.local/share/sdtorch/loras)")
    p.add_argument("--lora-partial", action="store_true", help="load a LoRA that only partly matches the model, "
                   "with a warning, instead of failing (default: off)")


def output_paths(pattern: str, seeds: list[int]) -> list[Path]:
    """The PNG path of each image, every one checked as a destination and no two the same."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
        if names - {"seed"}:
            raise SDTorchError(f"output {shown(pattern)}: unknown field {{{sorted(names - {'seed'})[0]}}}; only "
                               "{seed} is replaced (write {{ and }} for braces)")
        if names:
            paths = [Path(pattern.format(seed=s)) for s in seeds]
        else:
            p = Path(pattern.format())
            paths = [p] if len(seeds) == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(len(seeds))]
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise SDTorchError(f"output {shown(pattern)}: not a valid name pattern ({e})") from None
    first: dict[str, int] = {}  # absolute path -> the first image written there
    for i, p in enumerate(paths):
        check_file_destination(p, (".png",))
        _check_name_length(p)
        j = first.setdefault(os.path.normcase(os.path.abspath(p)), i)
        if j != i:
            raise SDTorchError(f"output {shown(pattern)}: images {j} and {i} would both be written to {shown(p)}")
    return paths


def _check_name_length(path: Path) -> None:
    """The name, and the temporary name it is written under (`.NAME.XXXXXXXX.tmp`), fit the file system."""
    try:
        most = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        most = 255
    if len(os.fsencode(path.name)) + len("..XXXXXXXX.tmp") > most:
        raise SDTorchError(f"{shown(path)}: file name too long (at most {most - 14} bytes)")


def _options(args, seed: int, strength: float = 1.0) -> dict:
    """The generation options the flags give (None where a flag is left to the model's default)."""
    return dict(negative_prompt=args.negative_prompt, width=args.width, height=args.height, steps=args.steps,
                guidance=args.guidance, sampler=args.sampler, seed=seed, batch_size=args.batch, karras=args.karras,
                strength=strength, clip_skip=args.clip_skip, batch_mode=args.batch_mode,
                vae_tiling=args.vae_tiling, class_label=getattr(args, "class_label", None))


def _save(result, paths) -> None:
    """Write every PNG under a temporary name, then rename them all; on any failure none is left."""
    write_all([(path, result.png(i)) for i, path in enumerate(paths)])
    for path in paths:
        print(f"wrote {shown(path)}")


@dataclasses.dataclass
class LoraPlan:
    """The LoRAs of one run: the prompt to encode (tags cut out), what to load in order (prompt tags, then --lora
    flags), the prompt to record (flags added as tags) and the files named by path (the "Lora files" field)."""
    prompt: str
    refs: list
    recorded_prompt: str
    files: dict[str, str]


def lora_plan(args) -> LoraPlan:
    """Find every LoRA of the prompt and the --lora flags (one line if a name or file is missing, a scale is bad,
    or a recorded hash differs), before the model loads."""
    from ..lora.adapters import find_lora, lora_hash
    from ..lora.prompt import LoraRef, find_flag, lora_tag, split_lora_tags

    folder = getattr(args, "lora_dir", None)
    known_files = getattr(args, "lora_files", None) or {}
    clean, tags = split_lora_tags(args.prompt)
    refs, files, added = [], {}, []
    for name, scale in tags:
        path = Path(known_files[name]) if name in known_files else find_lora(name, folder)
        refs.append(LoraRef(name, path, scale))
        if name in known_files:
            files[name] = known_files[name]
    for text in getattr(args, "lora", None) or []:
        ref, needs_file = find_flag(text, folder)
        if needs_file:
            files[ref.name] = str(ref.source.resolve())
        refs.append(ref)
        added.append(lora_tag(ref.name, ref.scale))
    for name, want in (getattr(args, "lora_hashes", None) or {}).items():
        ref = next((r for r in refs if r.name == name), None)
        if ref is not None and lora_hash(ref.source) != want:
            raise SDTorchError(f"LoRA {name!r} ({shown(ref.source)}) has hash {lora_hash(ref.source)}, the image was "
                               f"made with {want}; replaying would not reproduce it")
    recorded = " ".join([args.prompt, *added]) if added else args.prompt
    return LoraPlan(clean, refs, recorded, files)


def _check_model_path(model: str) -> None:
    """A model path that exists is a regular file or a folder (a FIFO or device would block the reader)."""
    from ..pipeline import BUILTIN

    path = Path(model)
    if model in BUILTIN and not path.exists():
        return
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise SDTorchError(f"{shown(model)}: not a regular file or a folder, so not a model")


def run(args, kind: str, digest: str | None = None) -> None:
    from .. import generation, images
    from ..infotext import Origin

    limits = generation.Limits.from_env()
    source = mask = size = None
    name = shown(getattr(args, "image", ""))
    if kind in ("img2img", "outpaint"):
        source = images.open_image(args.image, max_pixels=limits.max_image_pixels)
    elif kind == "inpaint":
        source, mask = images.open_pair(args.image, args.mask, limits.max_image_pixels)
    if source is not None:
        size = source.size
    if kind == "outpaint":
        size = images.check_padding(source.size, args.pad, limits.max_side)
        name = f"{name} padded by {tuple(args.pad)}"
        source, mask = images.pad_for_outpaint(source, *args.pad, max_side=limits.max_side)
    seed = generation.new_seed() if args.seed is None else args.seed
    unconditional = getattr(args, "unconditional", False)
    if unconditional and (args.prompt or getattr(args, "class_label", None) is not None):
        raise SDTorchError("--unconditional takes no prompt and no --class")
    options = _options(args, seed, getattr(args, "strength", 1.0) if kind == "img2img" else 1.0)
    req = generation.resolve(args.prompt, None, size, image_name=name, limits=limits, **options)  # before loading
    paths = output_paths(args.output, [req.seed + i for i in range(req.batch_size)])
    _check_model_path(args.model)
    plan = lora_plan(args)
    model = load_for(args, args.model)
    conditioning = model.config.unet.conditioning
    if unconditional and conditioning != "none":
        raise SDTorchError(f"--unconditional: the model {shown(args.model)} is {conditioning}-conditioned"
                           + ("; give --class" if conditioning == "class" else "; give a prompt"))
    origin = Origin(model=args.model, model_hash=digest or infotext.model_hash(args.model), mode=kind,
                    prompt=plan.recorded_prompt, lora_files=plan.files)
    folder, partial = getattr(args, "lora_dir", None), getattr(args, "lora_partial", False)
    with applied_loras(model, plan.refs, folder, partial) as nets:
        for lora_name, (_, report) in nets.items():
            print(f"LoRA {lora_name}: {report.summary()}", file=sys.stderr)
        req = generation.resolve(plan.prompt, model, size, image_name=name, limits=limits, **options)
        source_t = None if source is None else images.to_tensor(source)
        mask_t = None if mask is None else images.mask_to_tensor(mask)
        with generation.ProgressBar() as bar:
            result = generation.generate(model, req, source_t, mask_t, callback=bar, limits=limits, origin=origin)
    _save(result, paths)


def replay(args) -> None:
    """Read an image's parameters and make the text-to-image run again."""
    from ..generation import Limits
    from ..images import read_text_chunk
    from ..pipeline import builtin_path

    image = shown(args.image)
    Limits.from_env()  # a malformed limit is reported before the image is read
    text = read_text_chunk(args.image, "parameters")
    if not text:
        raise SDTorchError(f"{image}: no 'parameters' text in this PNG (not made by sdtorch or A1111)")
    try:
        prompt, negative, f = infotext.parse(text)
    except SDTorchError as e:
        raise SDTorchError(f"{image}: {e}") from None
    if f.get("Mode") or "Denoising strength" in f:
        raise SDTorchError(f"{image}: made by {shown(f.get('Mode', 'img2img'))}; replay reproduces text-to-image "
                           "runs only (rerun that command with its source image)")
    sampler_name, karras = f.get("Sampler", ""), f.get("Schedule type") == "Karras"
    if sampler_name.endswith(" Karras"):  # older A1111 infotexts name the schedule in the sampler
        sampler_name, karras = sampler_name[: -len(" Karras")], True
    if sampler_name not in infotext.SDTORCH_NAMES:
        raise SDTorchError(f"{image}: sampler {sampler_name!r} is not one sdtorch has "
                           f"({', '.join(infotext.A1111_NAMES.values())})")
    model_path = args.model or f.get("Model")
    if not model_path or not (Path(model_path).exists() or builtin_path(model_path)):
        raise SDTorchError(f"{image}: model {model_path!r} not found; pass --model")
    try:
        width, height = (int(v) for v in f["Size"].split("x"))
        numbers = dict(steps=int(f["Steps"]), guidance=float(f["CFG scale"]), seed=int(f["Seed"]),
                       clip_skip=int(f.get("Clip skip", 1)))
    except KeyError as e:
        raise SDTorchError(f"{image}: the parameters have no {e.args[0]!r} field") from None
    except ValueError as e:
        raise SDTorchError(f"{image}: malformed parameters ({e})") from None
    digest = infotext.model_hash(model_path)
    if f.get("Model hash") and digest != f["Model hash"]:
        print(f"sdtorch: warning: {shown(model_path)} has hash {digest}, the image was made with "
              f"{shown(f['Model hash'])}; the result will differ", file=sys.stderr)
    output = args.output or str(Path(args.image).with_suffix("")).replace("{", "{{").replace("}", "}}") + "-replay.png"
    try:
        loras = infotext.lora_records(f)
    except SDTorchError as e:
        raise SDTorchError(f"{image}: {e}") from None
    run(argparse.Namespace(prompt=prompt, negative_prompt=negative, width=width, height=height,
                           sampler=infotext.SDTORCH_NAMES[sampler_name], batch=1, karras=karras,
                           dtype=args.dtype or f.get("Precision", "fp32"),
                           device=args.device, compile=args.compile, batch_mode="per-image",
                           vae_tiling=f.get("VAE tiling") == "True", class_label=f.get("Class"),
                           model=model_path, output=output, lora_dir=args.lora_dir, **loras, **numbers),
        "txt2img", digest)



def add_device_flags(p, dtype_default: str | None = "auto") -> None:
    """--dtype, --device and --compile, for every command that loads a model to generate (replay: --dtype
    defaults to the one the image records)."""
    default = ("auto, the fastest that keeps the pictures: fp16 on a GPU; on a CPU, bf16 where it is native and "
               "the model is SD-sized, else fp32, as for the built-in model") if dtype_default else (
               "the image's recorded Precision, else fp32")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=dtype_default,
                   help=f"compute dtype (default: {default})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda where a GPU is visible, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="compile the UNet with torch.compile first, its weights frozen into the compiled code (the "
                   "first image waits, about 35 s for the built-in model, and again after each LoRA change; "
                   "measured: the built-in model's image 0.15 s against 0.23 s eager; default: off)")


def load_for(args, model_path):
    """The model `args` ask for: --dtype, --device (default: the GPU where there is one) and --compile."""
    from ..pipeline import load
    from ..precision import default_device

    model = load(model_path, dtype=args.dtype, device=args.device or default_device())
    return model.compile() if args.compile else model


def samplers(args) -> None:
    from ..sampling import SAMPLERS

    for name, fn in SAMPLERS.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<14}{infotext.A1111_NAMES[name]:<14}{summary}")


def add_commands(sub) -> None:
    from ..generation import ENV_HELP

    p = sub.add_parser("generate", help="text to image (or a class, or nothing, for such models)", epilog=ENV_HELP)
    p.add_argument("prompt", nargs="?", default="", help="what the image shows (none for a class-conditional or "
                   "unconditional model)")
    add_generation_flags(p)
    p.add_argument("--class", dest="class_label", metavar="NAME_OR_INDEX",
                   help="the class to draw, for a class-conditional model (default: none)")
    p.add_argument("--unconditional", action="store_true",
                   help="the model is unconditional: no prompt, no class, guidance 1 (default: off)")
    p.set_defaults(func=lambda a: run(a, "txt2img"))

    p = sub.add_parser("img2img", help="image to image", epilog=ENV_HELP)
    p.add_argument("image", help="the source image (PNG, JPEG, WebP, ...)")
    p.add_argument("prompt", help="what the new image shows")
    add_generation_flags(p, strength=True)
    p.set_defaults(func=lambda a: run(a, "img2img"))

    p = sub.add_parser("inpaint", help="repaint where the mask is white", epilog=ENV_HELP)
    p.add_argument("image", help="the source image (PNG, JPEG, WebP, ...)")
    p.add_argument("mask", help="an image of the same size: white is repainted, black kept")
    p.add_argument("prompt", help="what the repainted area shows")
    add_generation_flags(p)
    p.set_defaults(func=lambda a: run(a, "inpaint"))

    p = sub.add_parser("outpaint", help="extend the canvas: pad the image, then inpaint the new area",
                       epilog=ENV_HELP)
    p.add_argument("image", help="the source image (PNG, JPEG, WebP, ...)")
    p.add_argument("prompt", help="what the whole canvas shows")
    p.add_argument("--pad", type=int, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"), required=True,
                   help="pixels to add on each side, 0 or more (a new size that is not a multiple of 8 is rounded "
                   "down; required)")
    add_generation_flags(p)
    p.set_defaults(func=lambda a: run(a, "outpaint"))

    p = sub.add_parser("replay", help="regenerate a PNG from its parameters text, bit-identically on the CPU",
                       epilog=ENV_HELP)
    p.add_argument("image", help="a PNG made by sdtorch or AUTOMATIC1111, with its parameters text")
    p.add_argument("--model", "-m", help="the model (default: the path recorded in the image)")
    p.add_argument("--output", "-o", help="PNG path (default: IMAGE-replay.png beside the image)")
    p.add_argument("--lora-dir", metavar="DIR", help="where the LoRAs named in the prompt are looked up (default: "
                   "$SDTORCH_LORAS, else ~/.local/share/sdtorch/loras); each must have its recorded hash")
    add_device_flags(p, dtype_default=None)
    p.set_defaults(func=replay)

    p = sub.add_parser("samplers", help="list the samplers")
    p.set_defaults(func=samplers)

