"""Speed of the built-in shapes model: one image after loading, images per second, and `sdtorch generate` cold.

Goals: one 64 px image in <= 0.15 s after the model is loaded; `sdtorch generate` (python -m sdtorch.cli
generate PROMPT --seed 0 -o FILE), process start included, in <= 2 s. Reference in the same run: the
same request through diffusers' StableDiffusionPipeline on the same weights (DPMSolverMultistepScheduler,
the model's default steps and guidance; both run the unconditional pass). With `--compile`, also one image
after `model.compile()` (Inductor with frozen weights), the compile timed apart. Images per second: one
txt2img call of batch 1 and of batch 8, in each batch mode ("per-image": one guided batch of 2 per image
and step; "batched": one guided batch of 2B per step). The model runs in --dtype (the CLI in its default).

    python benchmarks/shapes_speed.py [--repeats 5] [--dtype fp32|bf16] [--compile]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sdtorch.precision import cpu_capability

warnings.filterwarnings("ignore")
PROMPT = "a large red circle in the top left on a white background"
IMAGE_GOAL, CLI_GOAL = 0.15, 2.0  # seconds


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the model's dtype (not the CLI's)")
    ap.add_argument("--compile", action="store_true", help="also time one image after model.compile()")
    args = ap.parse_args()
    import sdtorch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from sdtorch.pipeline import builtin_path
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # no loading bars between the figures
    transformers_logging.disable_progress_bar()

    t0 = time.perf_counter()
    model = sdtorch.load("shapes", dtype=args.dtype)
    load_s = time.perf_counter() - t0
    model.txt2img(PROMPT, seed=0)  # warm-up
    ours = timed(lambda: model.txt2img(PROMPT, seed=0), args.repeats)
    per_second = {}
    for batch in (1, 8):
        for mode in ("per-image", "batched"):
            run = lambda: model.txt2img(PROMPT, seed=0, batch_size=batch, batch_mode=mode)  # noqa: E731
            run()
            per_second[batch, mode] = batch / timed(run, args.repeats if batch == 1 else max(1, args.repeats // 2))

    if args.compile:  # last of sdtorch's runs: the compiled UNet stays compiled
        eager_image = model.txt2img(PROMPT, seed=0, output_type="tensor")
        t0 = time.perf_counter()
        compiled_image = model.compile().txt2img(PROMPT, seed=0, output_type="tensor")
        compile_s = time.perf_counter() - t0
        compiled = timed(lambda: model.txt2img(PROMPT, seed=0), args.repeats)
        compiled_diff = (compiled_image - eager_image).abs().max().item()

    pipe = StableDiffusionPipeline.from_pretrained(builtin_path("shapes"), local_files_only=True,
                                                   torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    guidance, steps = model.default("guidance"), model.default("steps")
    assert model.default("sampler") == "dpmpp_2m", "the reference below is diffusers' DPM-Solver++(2M)"
    run = lambda: pipe(PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,  # noqa: E731
                       generator=torch.Generator().manual_seed(0))
    run()
    theirs = timed(run, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sdtorch.cli", "generate", PROMPT, "--seed", "0", "-o", str(Path(tmp) / "a.png")]
        subprocess.run(cmd, check=True, capture_output=True)  # warm the file cache
        cold = timed(lambda: subprocess.run(cmd, check=True, capture_output=True), max(3, args.repeats // 2))

    print(f"built-in shapes model, {args.dtype}, {steps} steps dpmpp_2m, CFG {guidance}, median")
    print(f"CPU {cpu_capability()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"load (sdtorch.load('shapes'))          {load_s:6.2f} s")
    print(f"one image, sdtorch                     {ours:6.3f} s   (goal <= {IMAGE_GOAL} s: "
          f"{'met' if ours <= IMAGE_GOAL else 'MISSED'})")
    if args.compile:
        print(f"one image, sdtorch compiled (frozen)   {compiled:6.3f} s   (goal: "
              f"{'met' if compiled <= IMAGE_GOAL else 'MISSED'}; {ours / compiled:.2f}x eager; first image "
              f"{compile_s:.0f} s with the compile; max pixel difference {compiled_diff:.1e})")
    print(f"one image, diffusers, same weights     {theirs:6.3f} s   ratio sdtorch/diffusers {ours / theirs:.2f}")
    print(f"sdtorch generate, new process          {cold:6.2f} s   (goal <= {CLI_GOAL:.0f} s: "
          f"{'met' if cold <= CLI_GOAL else 'MISSED'})")
    print(f"{'images per second':<37}{'per-image':>10}{'batched':>10}")
    for batch in (1, 8):
        print(f"{f'  batch {batch}':<37}{per_second[batch, 'per-image']:>10.2f}{per_second[batch, 'batched']:>10.2f}")


if __name__ == "__main__":
    main()
