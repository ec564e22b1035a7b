"""The README's teal grid: the first teal prompts of `sdtorch eval shapes --n-teal`, drawn by the built-in
model without the LoRA (top row) and with `--lora teal` (bottom row), each framed green where the analyser
reads the prompt back exactly, red otherwise.

    python scripts/teal_grid.py docs/teal-grid.png [--model shapes] [--lora teal] [--n 8]

Prompt i uses seed i, as `eval shapes --n-seen 0 --n-heldout 0 --n-two 0 --n-teal N` gives it, so the grid
shows the first images that evaluation graded, at the model's default sampler, steps and guidance.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import sdtorch
from sdtorch.evaluation import contact_sheet, shapes_prompts
from sdtorch.evaluation.analyse import analyse, match


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--model", default="shapes")
    p.add_argument("--lora", default="teal")
    p.add_argument("--n", type=int, default=8, help="prompts (columns)")
    args = p.parse_args()
    model = sdtorch.load(args.model)
    warnings.filterwarnings("ignore", message=".*does not know 'teal'")  # the top row asks for it on purpose
    scenes = [scene for _, scene in shapes_prompts(0, 0, 0, 0, n_teal=args.n)]
    images, captions, ok = [], [], []
    for with_lora in (False, True):
        if with_lora:
            model.load_lora(args.lora)
        for i, scene in enumerate(scenes):
            image = model.txt2img(scene.caption(), seed=i)[0]
            images.append(image)
            captions.append(scene.caption() if not with_lora else f"the same, with the LoRA {Path(args.lora).stem}")
            ok.append(match(scene, analyse(image))["exact"])
    contact_sheet(images, captions, ok, columns=args.n).save(args.output)
    n = args.n
    print(f"wrote {args.output}: exact {sum(ok[:n])}/{n} without the LoRA, {sum(ok[n:])}/{n} with it")


if __name__ == "__main__":
    main()
