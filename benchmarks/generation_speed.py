"""Speed of the SD15 UNet and of a whole text-to-image run: sdtorch against diffusers, same weights.

A randomly initialised SD15 model is written once as a diffusers folder; diffusers'
StableDiffusionPipeline (DPMSolverMultistepScheduler, DPM++ 2M) and sdtorch (`dpmpp_2m`) then load
it and generate the same request. Prints seconds and the sdtorch / diffusers ratio of each.

    python benchmarks/generation_speed.py [--size 256] [--steps 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from sdtorch.precision import cpu_capability

warnings.filterwarnings("ignore")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/sdtorch-bench")
    args = ap.parse_args()

    import sdtorch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    folder = Path(args.dir) / "sd15-fp32"
    if not (folder / "model_index.json").exists():
        sdtorch.build("sd15").save_diffusers(folder)
    ours = sdtorch.load(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)

    latent = args.size // 8
    x, t, ctx = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.no_grad():
        ours.unet(x, t, ctx), theirs.unet(x, t, ctx)  # warm-up
        unet_ours = best_of(lambda: ours.unet(x, t, ctx), args.repeats)
        unet_theirs = best_of(lambda: theirs.unet(x, t, ctx), args.repeats)

    prompt, kw = "a red circle on a white background", dict(steps=args.steps, guidance=7.5)
    run_ours = best_of(lambda: ours.txt2img(prompt, width=args.size, height=args.size, seed=0,
                                            sampler="dpmpp_2m", **kw), args.repeats)
    run_theirs = best_of(lambda: theirs(prompt, width=args.size, height=args.size, num_inference_steps=args.steps,
                                        guidance_scale=7.5, generator=torch.Generator().manual_seed(0)),
                         args.repeats)

    print(f"SD15 (random weights), fp32, {torch.get_num_threads()} threads, CPU {cpu_capability()}, "
          f"best of {args.repeats}")
    print(f"{'':<40}{'sdtorch s':>11}{'diffusers s':>13}{'ratio':>8}")
    rows = [(f"UNet forward, batch 2, {latent}x{latent} latents", unet_ours, unet_theirs),
            (f"txt2img {args.size}px, {args.steps} steps, CFG, DPM++ 2M", run_ours, run_theirs)]
    for label, a, b in rows:
        print(f"{label:<40}{a:>11.2f}{b:>13.2f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
