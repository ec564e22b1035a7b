"""Is PLMS's few-step collapse on the built-in model sdtorch's or the method's? Runs the same prompts and
seeds through sdtorch's `plms` and through diffusers' own StableDiffusionPipeline with PNDMScheduler (the
scheduler the shipped folder names: skip_prk_steps, leading spacing), grades both with the analyser, and
prints exact-match accuracy and how far the two sets of images are apart.

    python scripts/plms_check.py [--steps 5 10 20] [--n 32]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--n", type=int, default=32, help="prompts: 3/8 seen, 1/4 held-out, 3/8 two-object")
    args = ap.parse_args()
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    import sdtorch
    from sdtorch.evaluation.analyse import analyse, match
    from sdtorch.evaluation import shapes_prompts
    from sdtorch.pipeline import builtin_path

    model = sdtorch.load("shapes")
    guidance = model.default("guidance")
    n_seen, n_held = args.n * 3 // 8, args.n // 4
    items = shapes_prompts(0, n_seen, n_held, args.n - n_seen - n_held)
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path("shapes"), local_files_only=True,
                                                   torch_dtype=torch.float32, safety_checker=None)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    pipe.set_progress_bar_config(disable=True)
    print(f"guidance {guidance}, {len(items)} prompts")
    print("| steps | sdtorch plms | diffusers PNDM | mean abs pixel difference (0-255) |")
    print("| ---: | ---: | ---: | ---: |")
    for steps in args.steps:
        ours = theirs = 0
        diffs = []
        for i, (_, scene) in enumerate(items):
            prompt = scene.caption()
            a = model.txt2img(prompt, steps=steps, sampler="plms", guidance=guidance, seed=i)[0]
            b = pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(i)).images[0]
            ours += match(scene, analyse(a))["exact"]
            theirs += match(scene, analyse(b))["exact"]
            diffs.append(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())
        print(f"| {steps} | {ours / len(items):.0%} | {theirs / len(items):.0%} | {np.mean(diffs):.2f} |")


if __name__ == "__main__":
    main()
