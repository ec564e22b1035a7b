"""Speed of the SD15 UNet and of a whole text-to-image run: sdtorch against diffusers, same weights.

A randomly initialised SD15 model is written once as a diffusers folder (DIR/sd15-fp32); diffusers'
StableDiffusionPipeline (DPMSolverMultistepScheduler, DPM++ 2M) and sdtorch (`dpmpp_2m`) then load
it and generate the same request (seed 0, guidance 7.5). sdtorch runs in --dtype, diffusers in
--reference-dtype (fp32: the reference of the goals).

    python benchmarks/generation_speed.py [--size 256] [--steps 10] [--repeats 2]

One process: both pipelines loaded side by side; prints the best-of-repeats seconds of one UNet forward
(batch 2) and of one txt2img call, and the sdtorch / diffusers ratio of each.

    python benchmarks/generation_speed.py --size 512 --steps 20 --dtype bf16 --processes [--quality]
    python benchmarks/generation_speed.py --size 1024 --steps 1 --dtype bf16 --processes   # fits in 24 GB?

--processes: each pipeline in its own fresh process, one after the other: load seconds, the wall time
of the generation after loading (best of --repeats, default 1: the process's first), and the process's
peak RSS above its baseline after imports (ru_maxrss, as load_memory.py) and in all. Goals: wall <= 0.45x
diffusers fp32, peak RSS <= 0.6x diffusers'. --quality (with a --dtype other than fp32): also an sdtorch
fp32 image of the same seed, in a process of its own (it doubles the sdtorch time), and the PSNR of the
--dtype image against it (goal >= 30 dB). --vae-tiling: both decode in tiles (sdtorch's vae_tiling,
diffusers' vae.enable_tiling()).

    python benchmarks/generation_speed.py --preset tiny --size 64 --steps 2 --dtype bf16 --processes --quality
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sdtorch.precision import cpu_capability, native_bf16

warnings.filterwarnings("ignore")
PROMPT = "a red circle on a white background"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WALL_GOAL, RSS_GOAL, PSNR_GOAL = 0.45, 0.6, 30.0

BUILD = "import sys, sdtorch; sdtorch.build(sys.argv[1]).save_diffusers(sys.argv[2])"

CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
kind, folder, dtype, device, size, steps, repeats, tiling, prompt, out = sys.argv[1:]
size, steps, repeats, tiling = int(size), int(steps), int(repeats), tiling == "1"
if kind == "sdtorch":
    import sdtorch
else:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if kind == "sdtorch":
    model = sdtorch.load(folder, dtype=dtype, device=device)
    extra = {"vae_tiling": True} if tiling else {}
    run = lambda: model.txt2img(prompt, width=size, height=size, steps=steps, guidance=7.5, sampler="dpmpp_2m",
                                seed=0, output_type="tensor", **extra)
else:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   torch_dtype=dtype).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if tiling:
        pipe.vae.enable_tiling()
    run = lambda: pipe(prompt, width=size, height=size, num_inference_steps=steps, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(0), output_type="pt").images.cpu()
load = time.perf_counter() - t0
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    image = run()
    times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.save(image.float().cpu(), out)
cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
print(json.dumps({"load": load, "wall": min(times), "peak_above_base": (peak - base) * 1024, "peak": peak * 1024,
                  "cuda_peak": cuda}))
"""


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(the best time of `repeats` calls, the last call's result)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def child(kind: str, folder: Path, dtype: str, args, repeats: int, out: Path) -> dict | str:
    """Run CHILD in a fresh process: its JSON result, or the last line of its error."""
    cmd = [sys.executable, "-c", CHILD, kind, str(folder), dtype, args.device, str(args.size), str(args.steps),
           str(repeats), "1" if args.vae_tiling else "0", PROMPT, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode} (killed for memory?)"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verdict(value: float, goal: float) -> str:
    return f"(goal <= {goal:.2f}: {'met' if value <= goal else 'MISSED'})"


def in_processes(folder: Path, args, tmp: Path) -> None:
    repeats = args.repeats or 1
    print(f"each pipeline in its own process; generation: best of {repeats}; GB: peak RSS above the baseline "
          "after imports / the whole process's")
    cuda = args.device.startswith("cuda")
    print(f"{'pipeline':<42}{'load s':>8}{'wall s':>9}{'peak GB':>9}{'process GB':>12}"
          + (f"{'cuda GB':>9}" if cuda else ""))
    results = {}
    for kind, dtype in (("sdtorch", args.dtype), ("diffusers", args.reference_dtype)):
        label = f"{kind} {dtype}" + (" (StableDiffusionPipeline)" if kind == "diffusers" else "")
        r = child(kind, folder, dtype, args, repeats, tmp / f"{kind}.pt")
        if isinstance(r, str):
            print(f"{label:<42} failed: {r}")
            continue
        results[kind] = r
        print(f"{label:<42}{r['load']:>8.1f}{r['wall']:>9.2f}{r['peak_above_base'] / 1e9:>9.2f}{r['peak'] / 1e9:>12.2f}"
              + (f"{r['cuda_peak'] / 1e9:>9.2f}" if cuda else ""), flush=True)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"this machine's memory: {memory / 1e9:.1f} GB")
    if len(results) == 2:
        a, b = results["sdtorch"], results["diffusers"]
        wall, rss = a["wall"] / b["wall"], a["peak_above_base"] / b["peak_above_base"]
        fp32 = args.reference_dtype == "fp32"
        print(f"wall: sdtorch / diffusers = {wall:.2f} "
              + (verdict(wall, WALL_GOAL) if fp32 else "(the goal is against diffusers fp32)"))
        print(f"peak RSS above baseline: sdtorch / diffusers = {rss:.2f} {verdict(rss, RSS_GOAL)}")


def in_one_process(folder: Path, args) -> torch.Tensor:
    """The original benchmark, both pipelines in this process; returns sdtorch's image."""
    import sdtorch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # no loading bars between the figures
    transformers_logging.disable_progress_bar()
    repeats = args.repeats or 2
    ours = sdtorch.load(folder, dtype=args.dtype, device=args.device)
    ref_dtype = DTYPES[args.reference_dtype]
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                     torch_dtype=ref_dtype).to(args.device)
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    if args.vae_tiling:
        theirs.vae.enable_tiling()

    latent, cfg = args.size // 8, ours.config.unet
    x, t = torch.randn(2, cfg.in_channels, latent, latent), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, cfg.context_dim)
    ours_in = [v.to(args.device, DTYPES[args.dtype]) for v in (x, ctx)]
    theirs_in = [v.to(args.device, ref_dtype) for v in (x, ctx)]
    t = t.to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    with torch.no_grad():
        ours.unet(ours_in[0], t, ours_in[1]), theirs.unet(theirs_in[0], t, theirs_in[1])  # warm-up
        unet_ours = best_of(lambda: (ours.unet(ours_in[0], t, ours_in[1]), sync()), repeats)[0]
        unet_theirs = best_of(lambda: (theirs.unet(theirs_in[0], t, theirs_in[1]), sync()), repeats)[0]

    kw = dict(steps=args.steps, guidance=7.5)
    tiling = {"vae_tiling": True} if args.vae_tiling else {}
    run_ours, image = best_of(lambda: ours.txt2img(PROMPT, width=args.size, height=args.size, seed=0,
                                                   sampler="dpmpp_2m", output_type="tensor", **kw, **tiling), repeats)
    run_theirs = best_of(lambda: theirs(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps,
                                        guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                                        output_type="pt").images.cpu(), repeats)[0]

    print(f"both pipelines in this process, best of {repeats}")
    print(f"{'':<40}{'sdtorch s':>11}{'diffusers s':>13}{'ratio':>8}")
    rows = [(f"UNet forward, batch 2, {latent}x{latent} latents", unet_ours, unet_theirs),
            (f"txt2img {args.size}px, {args.steps} steps, CFG, DPM++ 2M", run_ours, run_theirs)]
    for label, a, b in rows:
        print(f"{label:<40}{a:>11.2f}{b:>13.2f}{a / b:>8.2f}")
    if args.reference_dtype == "fp32":
        ratio = run_ours / run_theirs
        print(f"txt2img sdtorch / diffusers fp32 = {ratio:.2f} {verdict(ratio, WALL_GOAL)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS of this process (both pipelines): {peak / 1e9:.2f} GB; use --processes for each one's")
    return image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, help="timed runs, best kept (default 2; with --processes 1)")
    ap.add_argument("--dir", default="/tmp/sdtorch-bench")
    ap.add_argument("--preset", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="sdtorch's dtype")
    ap.add_argument("--reference-dtype", default="fp32", choices=sorted(DTYPES), help="diffusers' dtype")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", action="store_true", help="each pipeline in its own process: wall time, peak RSS")
    ap.add_argument("--quality", action="store_true", help="PSNR of the --dtype image against an fp32 one")
    ap.add_argument("--vae-tiling", action="store_true", help="both pipelines decode in tiles")
    args = ap.parse_args()

    folder = Path(args.dir) / f"{args.preset}-fp32"
    if not (folder / "model_index.json").exists():  # in a child: a --processes child starts at this one's RSS
        subprocess.run([sys.executable, "-c", BUILD, args.preset, str(folder)], check=True)
    print(f"{args.preset} (random weights), sdtorch {args.dtype}, diffusers {args.reference_dtype}, "
          f"{args.size}px, {args.steps} steps, on {args.device}")
    print(f"CPU {cpu_capability()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    if args.device == "cpu" and "bf16" in (args.dtype, args.reference_dtype) and not native_bf16():
        print("bf16 emulated on this CPU: skipped (it would run ~100x slower than fp32)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.processes:
            in_processes(folder, args, tmp)
            image = torch.load(tmp / "sdtorch.pt") if (tmp / "sdtorch.pt").exists() else None
        else:
            image = in_one_process(folder, args)
        if args.quality and args.dtype != "fp32" and image is not None:
            r = child("sdtorch", folder, "fp32", args, 1, tmp / "fp32.pt")
            if isinstance(r, str):
                print(f"quality: the fp32 sdtorch run failed: {r}")
            else:
                p = psnr(image, torch.load(tmp / "fp32.pt"))
                print(f"PSNR sdtorch {args.dtype} vs sdtorch fp32, same seed: {p:.1f} dB "
                      f"(goal >= {PSNR_GOAL:.0f}: {'PASS' if p >= PSNR_GOAL else 'FAIL'})")


if __name__ == "__main__":
    main()
