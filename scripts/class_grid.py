"""A grid of a class-conditional shapes model's images, one row per class, each framed green where the analyser
reads exactly one object of the class's colour and shape (red otherwise), as `sdtorch eval shapes` grades; or
of an unconditional model's, framed green where the image is a valid one-object scene.

    python scripts/class_grid.py runs/shapes-class/model docs/class-grid.png --guidance 2 --per-class 8
    python scripts/class_grid.py runs/shapes-uncond/model docs/uncond-grid.png --rows 4

Image k of class c uses seed c * 20 + k, the seed `eval shapes --n-per-class 20` gives it, and the
unconditional model's image i seed i, as `eval shapes --n-images` does: the grid shows the first images that
evaluation graded.
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

import sdtorch
from sdtorch.data.shapes import SEEN_PAIRS
from sdtorch.evaluation.classes import class_pairs, read_one

EVAL_PER_CLASS = 20  # scripts/eval_class_shapes.sh's --n-per-class, which fixes each image's seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--per-class", type=int, default=8, help="images per row")
    p.add_argument("--rows", type=int, default=4, help="rows of an unconditional model's grid")
    args = p.parse_args()
    model = sdtorch.load(args.model)
    if model.config.unet.conditioning == "none":
        return unconditional(model, args)
    pairs, side, frame, label_w = class_pairs(model), model.config.sample_size, 2, 96
    cell = side + 2 * frame
    grid = Image.new("RGB", (label_w + args.per_class * cell, len(pairs) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, pair in enumerate(pairs):
        draw.text((4, c * cell + cell // 2 - 6), model.class_name(c), fill="black")
        for k in range(args.per_class):
            image = model.txt2img(class_label=c, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                                  seed=c * EVAL_PER_CLASS + k, width=side, height=side)[0]
            x, y = label_w + k * cell, c * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1],
                           fill=(40, 170, 60) if read_one(image)["pair"] == pair else (220, 40, 40))
            grid.paste(image, (x + frame, y + frame))
    grid.save(args.output)
    print(f"wrote {args.output}")


def unconditional(model, args) -> None:
    side, frame, columns = model.config.sample_size, 2, args.per_class
    cell = side + 2 * frame
    grid = Image.new("RGB", (columns * cell, args.rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(args.rows * columns):
        image = model.txt2img(steps=args.steps, sampler=args.sampler, guidance=1.0, seed=i, width=side,
                              height=side)[0]
        got = read_one(image)
        x, y = (i % columns) * cell, (i // columns) * cell
        draw.rectangle([x, y, x + cell - 1, y + cell - 1],
                       fill=(40, 170, 60) if got["pair"] in SEEN_PAIRS and got["clean"] else (220, 40, 40))
        grid.paste(image, (x + frame, y + frame))
    grid.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
