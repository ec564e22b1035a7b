"""The round-trip ceiling of an autoencoder on the shapes grader: each prompt of `sdtorch eval shapes`' set (and
N teal prompts) rendered, encoded (the posterior's mode), decoded and read back; exact match per split.

    python scripts/autoencoder_ceiling.py runs/shapes-vae/vae [--n-teal 200]

A model's generations cannot score above this; a split near 0 (teal, for a palette-only autoencoder) means the
autoencoder cannot draw it at all, whatever the UNet does.
"""

import argparse
import json

import torch

from sdtorch.checkpoints import load_vae
from sdtorch.evaluation import autoencoder_roundtrip, shapes_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vae", help="an autoencoder folder (or a model folder's vae/)")
    p.add_argument("--n-seen", type=int, default=60)
    p.add_argument("--n-heldout", type=int, default=40)
    p.add_argument("--n-two", type=int, default=60)
    p.add_argument("--n-teal", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    vae = load_vae(a.vae).to(torch.float32).eval()
    items = shapes_prompts(a.seed, a.n_seen, a.n_heldout, a.n_two, a.n_teal)
    report = autoencoder_roundtrip(vae, items, seed=a.seed)
    print(json.dumps({split: {"exact": r["exact"], "color": r["color"]} for split, r in report["splits"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
