"""Peak memory and time of loading a full-size SD15 checkpoint: sdtorch against diffusers, same run.

Writes a randomly initialised SD15 model as an original single file and as a diffusers folder (in the
chosen dtype), then loads each in a fresh subprocess and reports peak RSS above the interpreter's
baseline, divided by the size of the weights (1.0 = one copy of the weights, 2.0 = two copies).

    python benchmarks/load_memory.py [--dtype fp16|fp32] [--dir /tmp/sdtorch-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sdtorch.precision import cpu_capability

CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
kind, path, folder = sys.argv[1:4]
if kind.startswith("diffusers"):
    from diffusers import StableDiffusionPipeline
else:
    import sdtorch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if kind == "sdtorch":
    m = sdtorch.load(path)
    n = sum(p.numel() * p.element_size() for mod in m.modules.values() for p in mod.parameters())
elif kind == "sdtorch-folder":
    m = sdtorch.load(folder)
    n = sum(p.numel() * p.element_size() for mod in m.modules.values() for p in mod.parameters())
elif kind == "diffusers-folder":
    m = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    n = sum(p.numel() * p.element_size() for mod in (m.unet, m.vae, m.text_encoder) for p in mod.parameters())
else:
    m = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)
    n = sum(p.numel() * p.element_size() for mod in (m.unet, m.vae, m.text_encoder) for p in mod.parameters())
mods = (m.unet, m.vae, m.text_encoder)
dt = time.perf_counter() - t0
for mod in mods:  # touch every page: lazily mapped weights count once they are resident
    for p in mod.parameters():
        p.detach().reshape(-1)[::1024].float().sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_above_base_bytes": (peak - base) * 1024, "weight_bytes": n}))
"""

BUILD = r"""
import sys
import sdtorch
dtype, single, folder = sys.argv[1:4]
model = sdtorch.build("sd15")
model.save_single_file(single, dtype=dtype)
model.save_diffusers(folder, dtype=dtype)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--dir", default="/tmp/sdtorch-bench")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    single, folder = out / f"sd15-{args.dtype}.safetensors", out / f"sd15-{args.dtype}"
    if not single.exists() or not (folder / "model_index.json").exists():
        # in a child process: Linux keeps a process's peak RSS across fork and exec, so building the model
        # here (several GB) would raise every loader child's baseline above what loading adds
        subprocess.run([sys.executable, "-c", BUILD, args.dtype, str(single), str(folder)], check=True)
    print(f"SD15, {args.dtype} weights, CPU {cpu_capability()}; peak RSS above the interpreter's baseline / "
          "weight bytes")
    print("(seconds: the load call alone; peak: after touching every page of the loaded weights)")
    print(f"{'loader':<34}{'seconds':>9}{'peak GB':>9}{'x weights':>11}")
    results = {}
    for kind, label in (("sdtorch", "sdtorch.load(single file)"), ("diffusers", "diffusers from_single_file"),
                        ("sdtorch-folder", "sdtorch.load(diffusers folder)"),
                        ("diffusers-folder", "diffusers from_pretrained")):
        proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(single), str(folder)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{label:<34} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[kind] = r
        ratio = r["peak_above_base_bytes"] / r["weight_bytes"]
        print(f"{label:<34}{r['seconds']:>9.1f}{r['peak_above_base_bytes'] / 1e9:>9.2f}{ratio:>11.2f}")
    if "sdtorch" in results and "diffusers" in results:
        a, b = results["sdtorch"], results["diffusers"]
        print(f"single file: sdtorch peak / diffusers peak = "
              f"{a['peak_above_base_bytes'] / b['peak_above_base_bytes']:.2f}, "
              f"time ratio = {a['seconds'] / b['seconds']:.2f}")


if __name__ == "__main__":
    main()
