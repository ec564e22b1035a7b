"""VAE decode: sdtorch against diffusers and OpenVINO on the same weights, and a 1024 px decode untiled vs tiled.

    python benchmarks/vae_speed.py                    # SD 1.5: 1x4x64x64 -> 512x512, and 1x4x128x128 -> 1024x1024
    python benchmarks/vae_speed.py --dtype bf16       # the 1024 rows in bf16
    python benchmarks/vae_speed.py --preset tiny --latent 8 --big 24 --tile 16 --overlap 8 --no-openvino  # smoke

A randomly initialised model is written once as a diffusers folder (DIR/sd15-fp32); every row loads its VAE
from that folder's vae/ and decodes the same seeded latents (randn / scaling factor, as the sampler hands
them over), best of --repeats after a warm-up:

    sdtorch fp32 / bf16     sdtorch.checkpoints.load_vae(folder / "vae", dtype).decode(z)
    diffusers fp32 / bf16   AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=...).decode(z).sample
    OpenVINO bf16           the diffusers fp32 VAE decoder converted by openvino_ref.vae_decoder (bf16 hint)

The bf16 rows run only where `sdtorch.precision.native_bf16()` holds. PSNR is of images in [0, 1]
((x + 1) / 2, clamped, as sdtorch saves them). The 1024 rows (--big latents, in --dtype) run first, each in
its own fresh process (ru_maxrss never goes down, and a child starts from its parent's resident size):
one decode each (the process's first, so it includes oneDNN's one-time setup of each kernel), untiled
`vae.decode` and tiled `sdtorch.tiling.decode(vae, z, tile, overlap)`, with the process's peak RSS above
its baseline after imports (the VAE's weights included) and the PSNR of tiled vs untiled.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sdtorch.config import PRESETS
from sdtorch.precision import cpu_capability, native_bf16

warnings.filterwarnings("ignore")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_GOAL = 0.5  # sdtorch bf16 time / diffusers fp32 time
PSNR_GOAL = 30.0  # dB, bf16 decode against the fp32 decode

BUILD = "import sys, sdtorch; sdtorch.build(sys.argv[1]).save_diffusers(sys.argv[2])"

CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from sdtorch import checkpoints
mode, folder, dtype, side, tile, overlap, out = sys.argv[1:]
if mode == "tiled":
    from sdtorch import tiling
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
vae = checkpoints.load_vae(folder + "/vae", dtype=dtype).eval()
weights = sum(p.numel() * p.element_size() for p in vae.parameters())
torch.manual_seed(0)
z = (torch.randn(1, vae.config.latent_channels, int(side), int(side)) / vae.config.scaling_factor).to(dtype)
t0 = time.perf_counter()
with torch.inference_mode():
    image = vae.decode(z) if mode == "untiled" else tiling.decode(vae, z, int(tile), int(overlap))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.save(image.float(), out)
print(json.dumps({"seconds": seconds, "peak_above_base": (peak - base) * 1024, "peak": peak * 1024,
                  "weights": weights}))
"""


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two decodes in [-1, 1], compared as the [0, 1] images they become."""
    a, b = ((a.double() + 1) / 2).clamp(0, 1), ((b.double() + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def big_rows(folder: Path, args) -> None:
    """The --big decode untiled and tiled, each in its own process: time, peak RSS, PSNR."""
    side = args.big * PRESETS[args.preset].vae.downsampling
    print(f"\n{side}x{side} decode ({args.big}x{args.big} latents, {args.dtype}), one call in a fresh process each")
    modes = ["untiled"]
    if importlib.util.find_spec("sdtorch.tiling") is None:
        print("  tiled: sdtorch.tiling is not there yet: row left out")
    else:
        modes.append("tiled")
    print(f"{'':<36}{'seconds':>9}{'peak GB':>9}{'process GB':>12}")
    images, weights = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = str(Path(tmp) / f"{mode}.pt")
            proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), args.dtype, str(args.big),
                                   str(args.tile), str(args.overlap), out], capture_output=True, text=True)
            label = "vae.decode" if mode == "untiled" else f"tiling.decode(tile={args.tile}, overlap={args.overlap})"
            if proc.returncode:
                print(f"{label:<36} failed: {(proc.stderr.strip().splitlines() or ['killed?'])[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            images[mode], weights = torch.load(out), r["weights"]
            print(f"{label:<36}{r['seconds']:>9.2f}{r['peak_above_base'] / 1e9:>9.2f}{r['peak'] / 1e9:>12.2f}",
                  flush=True)
    print(f"  (peak GB: the process's peak RSS above its baseline after imports, VAE weights of "
          f"{weights / 1e9:.2f} GB included;\n   process GB: its whole peak RSS)")
    if len(images) == 2:
        print(f"PSNR tiled vs untiled: {psnr(images['tiled'], images['untiled']):.1f} dB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--latent", type=int, default=64, help="latent side of the speed rows (64: 512 px)")
    ap.add_argument("--big", type=int, default=128, help="latent side of the untiled/tiled rows (128: 1024 px)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the untiled/tiled rows")
    ap.add_argument("--tile", type=int, default=64, help="tile side in latent pixels (sdtorch.tiling.decode)")
    ap.add_argument("--overlap", type=int, default=16, help="tile overlap in latent pixels")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/sdtorch-bench")
    ap.add_argument("--no-openvino", action="store_true")
    args = ap.parse_args()

    folder = Path(args.dir) / f"{args.preset}-fp32"
    if not (folder / "model_index.json").exists():  # in a child, so that this process stays small (see CHILD)
        subprocess.run([sys.executable, "-c", BUILD, args.preset, str(folder)], check=True)
    bf16 = native_bf16()
    print(f"{args.preset} VAE decode, random weights from {folder}")
    print(f"CPU {cpu_capability()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    if args.dtype == "bf16" and not bf16:
        print("bf16 emulated on this CPU: the untiled/tiled rows run in fp32")
        args.dtype = "fp32"
    big_rows(folder, args)  # first: this process is still small

    from diffusers import AutoencoderKL

    from sdtorch import checkpoints

    cfg = PRESETS[args.preset].vae
    side = args.latent * cfg.downsampling
    torch.manual_seed(0)
    z = torch.randn(1, cfg.latent_channels, args.latent, args.latent) / cfg.scaling_factor
    print(f"\n{side}x{side} decode ({cfg.latent_channels}x{args.latent}x{args.latent} latents), best of "
          f"{args.repeats} after a warm-up")
    seconds, outputs = {}, {}

    def measure(label: str, fn, latents: torch.Tensor) -> None:
        with torch.inference_mode():
            outputs[label] = fn(latents).float()
            seconds[label] = best_of(lambda: fn(latents), args.repeats)
        print(f"{label:<24}{seconds[label]:>9.3f} s", flush=True)

    def theirs(dtype):
        return AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).eval()

    for name in ("fp32", "bf16") if bf16 else ("fp32",):
        dtype = DTYPES[name]
        ours, ref = checkpoints.load_vae(folder / "vae", dtype=dtype).eval(), theirs(dtype)
        measure(f"sdtorch {name}", ours.decode, z.to(dtype))
        measure(f"diffusers {name}", lambda latents: ref.decode(latents).sample, z.to(dtype))
    if not bf16:
        print("bf16 emulated on this CPU: skipped (sdtorch bf16, diffusers bf16, OpenVINO bf16)")
    else:
        import openvino_ref

        run, convert_s = openvino_ref.converted(lambda: theirs(torch.float32), openvino_ref.vae_decoder, z,
                                                skip=args.no_openvino)
        if run is None:
            print(convert_s)
        else:
            measure("OpenVINO bf16", run, z)
            print(f"  (OpenVINO conversion and compilation: {convert_s:.0f} s, not in the decode time)")

    print(f"\n{'ratio of decode times':<40}{'value':>7}  goal")
    for a, b, goal in [("sdtorch fp32", "diffusers fp32", None), ("sdtorch bf16", "diffusers fp32", BF16_GOAL),
                       ("sdtorch bf16", "diffusers bf16", None), ("sdtorch bf16", "OpenVINO bf16", None)]:
        if a in seconds and b in seconds:
            r = seconds[a] / seconds[b]
            verdict = "" if goal is None else f"<= {goal:.2f}  {'met' if r <= goal else 'MISSED'}"
            print(f"{a + ' / ' + b:<40}{r:>7.2f}  {verdict}")

    print("\nquality")
    fp32 = outputs["sdtorch fp32"]
    print(f"max |sdtorch fp32 - diffusers fp32|      {(fp32 - outputs['diffusers fp32']).abs().max():.2e}"
          f"   (decode mean {fp32.mean():.2f}, std {fp32.std():.2f})")
    for label in ("sdtorch bf16", "OpenVINO bf16"):
        if label in outputs:
            p = psnr(outputs[label], fp32)
            verdict = f"goal >= {PSNR_GOAL:.0f} dB  {'PASS' if p >= PSNR_GOAL else 'FAIL'}" if label[0] == "s" else ""
            print(f"PSNR {label} vs sdtorch fp32{'':<{13 - len(label)}}{p:>8.1f} dB  {verdict}")


if __name__ == "__main__":
    main()
