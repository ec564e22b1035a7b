"""`sdtorch make-shapes` and `sdtorch eval shapes`: the shapes world and its prompt-adherence grader."""

from __future__ import annotations

import json
from pathlib import Path


def make_shapes(args) -> None:
    from .data.shapes import make_shapes as write

    folder = write(args.folder, args.count, seed=args.seed, size=args.size, random_colors=args.random_colors)
    print(f"wrote {folder} ({args.count} images)")


def evaluate(args) -> None:
    from .evaluation import check_output_folder, check_shapes_eval, evaluate_shapes
    from .pipeline import load

    out = Path(args.output)
    check_shapes_eval(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      n_seen=args.n_seen, n_heldout=args.n_heldout, n_two=args.n_two)
    check_output_folder(out)  # both before the model loads; the folder itself is written at the end
    model = load(args.model)
    report = evaluate_shapes(model, sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                             n_seen=args.n_seen, n_heldout=args.n_heldout, n_two=args.n_two, out_dir=out)
    ceiling = _exact(report["autoencoder"]["splits"])
    print(json.dumps({"exact": _exact(report["splits"]), "autoencoder round trip": ceiling}, indent=2))
    print(f"wrote {out / 'report.json'} and {out / 'contact_sheet.png'}")


def _exact(splits: dict) -> dict:
    """{split: exact-match accuracy, 4 decimals} of a report's per-split summaries."""
    return {split: round(r["exact"]["accuracy"], 4) for split, r in splits.items()}


def add_commands(sub) -> None:
    p = sub.add_parser("make-shapes", help="render a captioned shapes-world image folder")
    p.add_argument("folder", help="the dataset folder, written whole; an existing one is replaced only if it is "
                   "empty or an earlier make-shapes dataset (NNNNNN.png and NNNNNN.txt files alone)")
    p.add_argument("--count", type=int, default=1000, help="images to render (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="the same seed renders the same images (default: 0)")
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels; every coordinate scales (default: 64)")
    p.add_argument("--random-colors", action="store_true", help="backgrounds and objects also in random RGB "
                   "colours (never near teal), captions naming them #rrggbb: data for an autoencoder that "
                   "must reproduce any colour")
    p.set_defaults(func=make_shapes)

    p = sub.add_parser("eval", help="grade a model's prompt adherence")
    kinds = p.add_subparsers(dest="kind", required=True)
    e = kinds.add_parser("shapes", help="generate shapes-world prompts and read the images back")
    e.add_argument("--model", "-m", default="shapes", help="the model to grade (default: the built-in shapes)")
    e.add_argument("--sampler", help="see `sdtorch samplers` (default: the model's, else dpmpp_2m)")
    e.add_argument("--steps", type=int, help="sampler steps per image (default: the model's, else 20)")
    e.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, else 7.5)")
    e.add_argument("--seed", type=int, default=0, help="seeds the prompt set; prompt i uses seed + i (default: 0)")
    e.add_argument("--n-seen", type=int, default=60, help="prompts of one object, a colour-shape pair seen in "
                   "training (default: 60)")
    e.add_argument("--n-heldout", type=int, default=40, help="prompts of one object, one of the four held-out "
                   "pairs (default: 40)")
    e.add_argument("--n-two", type=int, default=60, help="prompts of two objects, in two corners (default: 60)")
    e.add_argument("--output", "-o", default="shapes-eval", help="folder for report.json and contact_sheet.png, "
                   "written whole; an existing one is replaced only if it is empty or an earlier evaluation's "
                   "(default: shapes-eval)")
    e.set_defaults(func=evaluate)
