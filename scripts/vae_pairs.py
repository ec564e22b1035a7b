"""Which single objects an autoencoder cannot reproduce: every colour-shape pair (held-out ones too),
at each size on each background it may appear on, rendered at the 5 positions with 2 jitter seeds,
encoded (the posterior's mode), decoded and graded. A pair that fails here fails its prompts whatever
the UNet does, so a candidate VAE is checked with this before a UNet is trained on it.

    python scripts/vae_pairs.py VAE [VAE ...]      # an AutoencoderKL folder, or a model's
"""

from __future__ import annotations

import argparse
import random

import torch

from sdtorch.checkpoints import load_vae
from sdtorch.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    allowed,
)
from sdtorch.evaluation import roundtrip

JITTERS = 2


def failing_pairs(vae) -> tuple[dict[str, int], int]:
    """{"size colour shape on background": renders read back exactly (of 5 x JITTERS)} for every case
    below full marks, and the number of cases checked."""
    failing, cases = {}, 0
    for background in BACKGROUNDS:
        for size in SIZES:
            for color in COLORS:
                for shape in SHAPES:
                    if not (allowed(color, shape, background) or allowed(color, shape, background, held_out=True)):
                        continue
                    cases += 1
                    correct = 0
                    for i, position in enumerate(POSITIONS):
                        for j in range(JITTERS):
                            scene = Scene((Obj(size, color, shape, position),), background)
                            correct += roundtrip(vae, scene, random.Random(100 * i + j))["exact"]
                    if correct < len(POSITIONS) * JITTERS:
                        failing[f"{size} {color} {shape} on {background}"] = correct
    return failing, cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", nargs="+")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in args.vae:
        failing, cases = failing_pairs(load_vae(path, torch.float32).eval())
        total = len(POSITIONS) * JITTERS
        detail = ", ".join(f"{k} {v}/{total}" for k, v in failing.items()) or "none"
        print(f"{path}: {cases - len(failing)} of {cases} cases read back {total}/{total}; below: {detail}")


if __name__ == "__main__":
    main()
