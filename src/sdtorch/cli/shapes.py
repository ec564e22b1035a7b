"""`sdtorch make-shapes` and `sdtorch eval shapes`: the shapes world and its prompt-adherence grader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import SDTorchError
from ..lora.prompt import applied_loras
from .generate import add_device_flags


def make_shapes(args) -> None:
    from ..data.shapes import make_shapes as write

    folder = write(args.folder, args.count, seed=args.seed, size=args.size, random_colors=args.random_colors,
                   with_color=args.with_color, classes=args.classes)
    print(f"wrote {folder} ({args.count} images)")


TEXT_COUNTS = {"n_seen": 60, "n_heldout": 40, "n_two": 60, "n_teal": 0}  # a text model's prompts per split
UNTEXTED_COUNTS = {"n_per_class": 20, "n_images": 200}  # a class model's images per class, an unconditional one's


def evaluate(args) -> None:
    from ..evaluation import check_output_folder, check_shapes_eval, evaluate_shapes
    from .generate import load_for

    out = Path(args.output)
    counts = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in TEXT_COUNTS.items()}
    check_shapes_eval(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed, **counts)
    check_output_folder(out)  # both before the model loads; the folder itself is written at the end
    refs = _lora_refs(args)
    model = load_for(args, args.model)
    if model.config.unet.conditioning != "text":
        return _evaluate_untexted(args, model, out, refs)
    given = [f"--{k.replace('_', '-')}" for k in UNTEXTED_COUNTS if getattr(args, k) is not None]
    if given:
        raise SDTorchError(f"{given[0]} is for a class-conditional or unconditional model; {args.model} is "
                           f"text-conditioned (use --n-seen, --n-heldout, --n-two, --n-teal)")
    with applied_loras(model, refs, args.lora_dir) as nets:
        for name, (_, match) in nets.items():
            print(f"LoRA {name}: {match.summary()}", file=sys.stderr)
        report = evaluate_shapes(model, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                 seed=args.seed, out_dir=out, **counts)
    ceiling = _exact(report["autoencoder"]["splits"])
    print(json.dumps({"exact": _exact(report["splits"]), "autoencoder round trip": ceiling}, indent=2))
    print(f"wrote {out / 'report.json'} and {out / 'contact_sheet.png'}")


def _evaluate_untexted(args, model, out: Path, refs: list) -> None:
    """`eval shapes` of a class-conditional model (exact colour and shape per class) or an unconditional one
    (the share of valid one-object scenes); the text splits' flags and LoRAs are refused."""
    from ..evaluation.classes import class_pairs, evaluate_classes, evaluate_unconditional, write_report

    kind = model.config.unet.conditioning
    given = [f"--{k.replace('_', '-')}" for k in TEXT_COUNTS if getattr(args, k) is not None]
    wrong = "--n-images" if kind == "class" and args.n_images is not None else \
        "--n-per-class" if kind == "none" and args.n_per_class is not None else None
    what = "class-conditional" if kind == "class" else "unconditional"
    refused = [*given, *([wrong] if wrong else []), *(["--lora"] if refs else [])]
    if refused:
        raise SDTorchError(f"{refused[0]} is not for a {what} model ({args.model}); it takes "
                           + ("--n-per-class" if kind == "class" else "--n-images"))
    n = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in UNTEXTED_COUNTS.items()}
    for key, value in n.items():
        if not isinstance(value, int) or value < 1:
            raise SDTorchError(f"--{key.replace('_', '-')} must be an integer, 1 or more, got {value!r}")
    sampler, steps = args.sampler or model.default("sampler"), args.steps or model.default("steps")
    if kind == "class":
        class_pairs(model)  # the classes are colour-shape pairs, before any image is drawn
        guidance = model.default("guidance") if args.guidance is None else args.guidance
        result = evaluate_classes(model, sampler=sampler, steps=steps, guidance=guidance, seed=args.seed,
                                  n_per_class=n["n_per_class"])
        summary = {"exact": result[0]["overall"]["exact"]["accuracy"],
                   "per class": {c: r["accuracy"] for c, r in result[0]["classes"].items()},
                   "autoencoder round trip": result[0]["autoencoder"]["exact"]["accuracy"]}
    else:
        if args.guidance not in (None, 1.0):
            raise SDTorchError(f"--guidance {args.guidance:g}: an unconditional model has nothing to guide by (1)")
        result = evaluate_unconditional(model, sampler=sampler, steps=steps, seed=args.seed, n_images=n["n_images"])
        summary = {"valid": result[0]["overall"]["valid"]["accuracy"],
                   "pairs drawn": result[0]["overall"]["pairs_drawn"],
                   "autoencoder round trip": result[0]["autoencoder"]["valid"]["accuracy"]}
    write_report(out, *result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'report.json'} and {out / 'contact_sheet.png'}")


def _lora_refs(args) -> list:
    """The --lora flags as LoRAs to apply, every file found before the model loads."""
    from ..lora.prompt import find_flag

    return [find_flag(text, args.lora_dir)[0] for text in args.lora]


def _exact(splits: dict) -> dict:
    """{split: exact-match accuracy, 4 decimals} of a report's per-split summaries."""
    return {split: None if r["exact"]["accuracy"] is None else round(r["exact"]["accuracy"], 4)
            for split, r in splits.items()}


def add_commands(sub) -> None:
    p = sub.add_parser("make-shapes", help="render a captioned shapes-world image folder")
    p.add_argument("folder", help="the dataset folder, written whole; an existing one is replaced only if it is "
                   "empty or an earlier make-shapes dataset (NNNNNN.png and NNNNNN.txt files alone)")
    p.add_argument("--count", type=int, default=1000, help="images to render (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="the same seed renders the same images (default: 0)")
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels; every coordinate scales (default: 64)")
    p.add_argument("--random-colors", action="store_true", help="backgrounds and objects also in random RGB "
                   "colours (never near teal), captions naming them #rrggbb: data for an autoencoder that "
                   "must reproduce any colour (default: palette colours only)")
    p.add_argument("--with-color", metavar="COLOR", help="every image's first object in this colour: teal "
                   "(never in the built-in model's data, so the data for teaching it a colour) or a palette colour "
                   "(default: none)")
    p.add_argument("--classes", action="store_true", help="one object per image, in a folder per colour-shape "
                   "pair (red-circle/, ...; the ImageFolder layout of `sdtorch train --conditioning class`): the 20 "
                   "pairs training may show, in equal numbers, with no captions (default: captioned images)")
    p.set_defaults(func=make_shapes)

    p = sub.add_parser("eval", help="grade a model's prompt adherence")
    kinds = p.add_subparsers(dest="kind", required=True)
    e = kinds.add_parser("shapes", help="generate shapes-world prompts and read the images back")
    e.add_argument("--model", "-m", default="shapes", help="the model to grade (default: the built-in shapes)")
    add_device_flags(e)
    e.add_argument("--sampler", help="see `sdtorch samplers` (default: the model's, else dpmpp_2m)")
    e.add_argument("--steps", type=int, help="sampler steps per image (default: the model's, else 20)")
    e.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, else 7.5)")
    e.add_argument("--seed", type=int, default=0, help="seeds the prompt set; prompt i uses seed + i (default: 0)")
    e.add_argument("--n-seen", type=int, help="prompts of one object, a colour-shape pair seen in "
                   "training (default: 60)")
    e.add_argument("--n-heldout", type=int, help="prompts of one object, one of the four held-out "
                   "pairs (default: 40)")
    e.add_argument("--n-two", type=int, help="prompts of two objects, in two corners (default: 60)")
    e.add_argument("--n-teal", type=int, help="prompts of one teal object, a colour the built-in "
                   "model never saw: whether a LoRA taught it (default: 0)")
    e.add_argument("--n-per-class", type=int, help="for a class-conditional model: images of each class, graded "
                   "on exactly one object of the class's colour and shape (default: 20)")
    e.add_argument("--n-images", type=int, help="for an unconditional model: images, graded on reading as one "
                   "cleanly drawn object of a pair the training data shows (default: 200)")
    e.add_argument("--output", "-o", default="shapes-eval", help="folder for report.json and contact_sheet.png, "
                   "written whole; an existing one is replaced only if it is empty or an earlier evaluation's "
                   "(default: shapes-eval)")
    e.add_argument("--lora", action="append", default=[], metavar="FILE_OR_NAME[:SCALE]",
                   help="grade with this LoRA loaded (a file, or a name in the LoRA folder or built in; SCALE "
                   "after the last ':' if it is a number, default 1); repeatable; recorded in the report's settings")
    e.add_argument("--lora-dir", metavar="DIR", help="where LoRA names are looked up (default: $SDTORCH_LORAS, "
                   "else ~/.local/share/sdtorch/loras)")
    e.set_defaults(func=evaluate)
