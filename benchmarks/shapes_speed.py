"""Speed of the built-in shapes model: one image after loading, and `sdtorch generate` from a cold start.

Targets (issue 5): one 64 px image in <= 0.5 s after the model is loaded; the CLI, process start
included, in <= 5 s. Reference in the same run: the same request through diffusers'
StableDiffusionPipeline on the same weights (DPMSolverMultistepScheduler, the model's default steps
and guidance; both run the unconditional pass).

    python benchmarks/shapes_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    import sdtorch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from sdtorch.pipeline import builtin_path

    t0 = time.perf_counter()
    model = sdtorch.load("shapes")
    load_s = time.perf_counter() - t0
    model.txt2img(PROMPT, seed=0)  # warm-up
    ours = timed(lambda: model.txt2img(PROMPT, seed=0), args.repeats)

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

    print(f"built-in shapes model, {torch.get_num_threads()} threads, CPU {cpu_capability()}, {steps} steps dpmpp_2m, "
          f"CFG {guidance}, median")
    print(f"load (sdtorch.load('shapes'))          {load_s:6.2f} s")
    print(f"one image, sdtorch                     {ours:6.3f} s   (target <= 0.5 s)")
    print(f"one image, diffusers, same weights     {theirs:6.3f} s   ratio sdtorch/diffusers {ours / theirs:.2f}")
    print(f"sdtorch generate, new process          {cold:6.2f} s   (target <= 5 s)")


if __name__ == "__main__":
    main()
